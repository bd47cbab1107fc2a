"""Every method row of a protocol over its seeds, with failure isolation: a row that raises is
recorded and the others run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedbench.config.protocol import MethodEntry, Protocol
from fedbench.runtime.backend import Backend, Progress, no_progress
from fedbench.runtime.faults import error_line
from fedbench.runtime.server import FATAL, Run
from fedbench.staging.prepare import Prepared, prepare
from fedbench.utils.records import read_jsonl

__all__ = ["RowFailure", "RowsFailed", "recorded_failures", "run_rows"]


@dataclass
class RowFailure:
    label: str
    seed: int
    error: str


class RowsFailed(RuntimeError):
    """Some method rows raised; every other row ran. The message lists each with its first error line."""

    def __init__(self, failures: list[RowFailure]) -> None:
        self.failures = failures
        lines = "; ".join(f"{f.label} (seed {f.seed}): {f.error}" for f in failures)
        super().__init__(f"{len(failures)} method row(s) failed: {lines}")


def recorded_failures(results: Path, protocol: Protocol) -> list[RowFailure]:
    """The failed rows of ``protocol`` that the records under ``results`` hold (a run that failed and
    did not complete since): what a ServerApp in another process left."""
    failures = []
    for path in sorted(Path(results).glob("runs/*/records.jsonl")):
        rows = read_jsonl(path)
        if any(r.get("kind") == "run" and r.get("completed") for r in rows):
            continue
        failures += [
            RowFailure(r["label"], r["seed"], r["error"])
            for r in rows
            if r.get("kind") == "failed" and r.get("protocol_hash") == protocol.hash
        ]
    return failures


def run_rows(
    protocol: Protocol,
    results: Path,
    progress: Progress = no_progress,
    *,
    backend: Callable[[Run], Backend],
    on_seed: Callable[[Prepared], None] | None = None,
    feature_cache: bool | Path = False,
) -> None:
    """Every method row of ``protocol`` over its seeds, each seed staged once for all its rows
    (``feature_cache``: frozen image features on disk, see :func:`fedbench.staging.prepare.prepare`).

    A row that raises is recorded (``kind="failed"``) and the other rows run; :class:`RowsFailed`
    is raised at the end. A row whose run directory another process holds (two ``fedbench run``
    into one results directory) is left for later and waited for once the others are done: the two
    processes share the rows and never write one run at once."""
    failures: list[RowFailure] = []

    def attempt(prep: Prepared, entry: MethodEntry, wait: bool) -> bool:
        try:
            done = Run(prep, entry, results, progress, backend=backend).execute(wait=wait) is not None
        except FATAL:
            raise
        except Exception as err:
            failures.append(RowFailure(entry.label, prep.seed, error_line(err)))
            progress("failed", {"label": entry.label, "seed": prep.seed, "error": error_line(err)})
            done = True
        if done:
            progress("row", {"label": entry.label, "seed": prep.seed})
        return done

    for seed in protocol.seeds:
        prep = prepare(protocol, seed, feature_cache=feature_cache)
        if on_seed is not None:
            on_seed(prep)
        busy = [entry for entry in protocol.methods if not attempt(prep, entry, wait=False)]
        for entry in busy:
            attempt(prep, entry, wait=True)
    if failures:
        raise RowsFailed(failures)
