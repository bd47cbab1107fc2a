"""Package namespaces that name their public API without importing it: each name is imported from
its module on first access, so importing a package (``fedbench.reporting`` for a leaderboard) never
pulls torch or matplotlib in before a name that needs them is used."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, api: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``'s ``__init__``: ``api`` maps each public name
    to the module (dotted, under ``package``, or absolute with a leading ``fedbench.``) that defines it."""
    namespace = importlib.import_module(package).__dict__

    def module_of(name: str) -> str:
        where = api[name]
        return where if where.startswith("fedbench.") else f"{package}.{where}"

    def getattr_(name: str) -> Any:
        if name not in api:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module_of(name)), name)
        namespace[name] = value  # the next access is a plain attribute
        return value

    def dir_() -> list[str]:
        return sorted({*namespace, *api})

    return getattr_, dir_
