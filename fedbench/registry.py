"""One generic registry for methods, tasks and backbones (lm-eval / fairseq style).

Plug-ins register with a decorator in the repo's ``methods/`` and ``tasks/`` folders, which are
discovered by importing every module not starting with ``_``, or through the Python entry-point
groups ``fedbench.methods``, ``fedbench.tasks`` and ``fedbench.backbones`` for third-party packages.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """An unknown registry key; its message names the bad value and the valid choices."""

    def __str__(self) -> str:  # KeyError quotes its message; we want the plain sentence
        return str(self.args[0])


class Registry(Generic[T]):
    """Name -> plug-in map with duplicate guards, base-class checks and lazy entry points."""

    def __init__(
        self,
        kind: str,
        base: type | None = None,
        entry_point_group: str | None = None,
        discover: Callable[[], None] | None = None,
    ) -> None:
        self.kind = kind
        self.base = base
        self.entry_point_group = entry_point_group
        self._discover = discover
        self._items: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str, obj: T) -> T:
        if name in self._items and self._items[name] is not obj:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        if self.base is not None and isinstance(obj, type) and not issubclass(obj, self.base):
            raise TypeError(f"{self.kind} '{name}' must subclass {self.base.__name__}, got {obj.__name__}")
        self._items[name] = obj
        return obj

    def decorator(self, name: str) -> Callable[[T], T]:
        def wrap(obj: T) -> T:
            return self.register(name, obj)

        return wrap

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self._discover is not None:
            self._discover()
        if self.entry_point_group:
            for ep in entry_points(group=self.entry_point_group):
                if ep.name not in self._items:
                    self.register(ep.name, ep.load())

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            raise UnknownNameError(self.unknown_message(name))
        return self._items[name]

    def unknown_message(self, name: str) -> str:
        names = self.names()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean: {close[0]}?" if close else ""
        return f"Unknown {self.kind} '{name}'.{hint} Available: {', '.join(names)}"

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def import_submodules(package: str) -> None:
    """Import every module of ``package`` whose name does not start with ``_`` (discovery)."""
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


METHODS: Registry = Registry(
    "method", entry_point_group="fedbench.methods", discover=lambda: import_submodules("fedbench.methods")
)
TASKS: Registry = Registry(
    "task", entry_point_group="fedbench.tasks", discover=lambda: import_submodules("fedbench.tasks")
)
SUITES: Registry = Registry(
    "suite", entry_point_group="fedbench.suites", discover=lambda: import_submodules("fedbench.tasks")
)
BACKBONES: Registry = Registry(
    "backbone",
    entry_point_group="fedbench.backbones",
    discover=lambda: import_submodules("fedbench.backbones"),
)


def register_task(name: str):
    """Decorator: register a task (a :class:`fedbench.tasks_api.TaskSpec` factory or instance)."""
    return TASKS.decorator(name)


def register_suite(name: str):
    """Decorator: register a suite builder ``fn(plans, config, tasks, seed) -> ExampleTable``."""
    return SUITES.decorator(name)


def register_backbone(name: str):
    """Decorator: register a backbone loader ``fn(spec: str, device) -> Backbone``."""
    return BACKBONES.decorator(name)
