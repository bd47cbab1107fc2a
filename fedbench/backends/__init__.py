"""Backends: what moves the client step's messages. ``inprocess`` calls it directly; ``flower-sim``
and ``flower-deploy`` carry the same messages over Flower (``pip install -e ".[flower]"``)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedbench.config.protocol import Protocol

BACKENDS = ("inprocess", "flower-sim", "flower-deploy")


class BackendError(ValueError):
    """A backend that does not exist or cannot run here."""


def check_backend(name: str) -> None:
    """One-line refusal of an unknown backend, or of a Flower one without flwr installed."""
    if name not in BACKENDS:
        raise BackendError(f"backend '{name}' is unknown; choose one of: {', '.join(BACKENDS)}")
    if name.startswith("flower") and importlib.util.find_spec("flwr") is None:
        raise BackendError(f"backend '{name}' needs Flower: pip install -e \".[flower]\"")


def run_backend(
    name: str,
    protocol: Protocol,
    results: Path,
    progress: Callable[[str, dict[str, Any]], None],
    on_seed: Callable[[Any], None] | None = None,
    feature_cache: bool = False,
) -> None:
    """Every row x seed of ``protocol`` into ``results`` on backend ``name``. ``feature_cache``: frozen
    image features on disk (:mod:`fedbench.staging.feature_cache`); the Flower backends' nodes stage in memory."""
    check_backend(name)
    if name == "inprocess":
        from fedbench.backends.inprocess import in_process
        from fedbench.runtime.rows import run_rows

        run_rows(protocol, results, progress, backend=in_process, on_seed=on_seed, feature_cache=feature_cache)
    elif name == "flower-sim":
        from fedbench.backends.flower import run_flower_sim

        run_flower_sim(protocol, results, progress, on_seed)
    else:
        from fedbench.backends.flower_deploy import run_flower_deploy

        run_flower_deploy(protocol, results, progress, on_seed)
