"""One generic registry for methods, tasks, suites and backbones (lm-eval / fairseq style).

Plug-ins register with a decorator in the repo's ``methods/`` and ``tasks/`` folders, which are
discovered by importing every module not starting with ``_``, or through the Python entry-point
groups ``fedbench.methods``, ``fedbench.tasks``, ``fedbench.suites`` and ``fedbench.backbones`` for
third-party packages. Either way a plug-in is checked when it registers: a method must be a subclass
of :class:`fedbench.api.method.Method`, a task an instance of :class:`fedbench.api.task.TaskSpec`, a suite
or a backbone loader a callable; anything else is refused with a one-line error naming it.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """An unknown registry key; its message names the bad value and the valid choices."""

    def __str__(self) -> str:  # KeyError quotes its message; we want the plain sentence
        return str(self.args[0])


class Registry(Generic[T]):
    """Name -> plug-in map with duplicate guards, base-class checks and lazy entry points.

    ``base`` says what every plug-in must be: a class, or ``"module:Class"`` (imported at the first
    check, for a base whose module imports this one), that plug-ins subclass, or with ``instance``
    are instances of; None: any callable. Plug-ins from entry points are checked like the others.
    ``on_register(name, obj)`` runs when a plug-in not yet held under another name passes that check,
    from a decorator or an entry point alike (methods: the class takes the name it is registered under).
    """

    def __init__(
        self,
        kind: str,
        base: type | str | None = None,
        entry_point_group: str | None = None,
        discover: Callable[[], None] | None = None,
        instance: bool = False,
        on_register: Callable[[str, Any], None] | None = None,
    ) -> None:
        self.kind = kind
        self.base = base
        self.instance = instance
        self.entry_point_group = entry_point_group
        self._discover = discover
        self._on_register = on_register
        self._items: dict[str, T] = {}
        self._loaded = False

    def _base(self) -> type | None:
        if isinstance(self.base, str):
            module, _, name = self.base.partition(":")
            self.base = getattr(importlib.import_module(module), name)
        return self.base

    def expected(self) -> str:
        """What a plug-in must be, in words: ``a subclass of fedbench.api.method.Method``."""
        base = self._base()
        if base is None:
            return "a callable"
        return f"{'an instance' if self.instance else 'a subclass'} of {base.__module__}.{base.__qualname__}"

    def check(self, name: str, obj: Any, origin: str = "") -> None:
        """Raise a one-line TypeError unless ``obj`` is what this registry holds (``origin``: where it
        came from, e.g. an entry point)."""
        base = self._base()
        if base is None:
            ok = callable(obj)
        elif self.instance:
            ok = isinstance(obj, base)
        else:
            ok = isinstance(obj, type) and issubclass(obj, base)
        if not ok:
            raise TypeError(f"{self.kind} '{name}'{origin} must be {self.expected()}; got {_what(obj)}")

    def register(self, name: str, obj: T, origin: str = "") -> T:
        if name in self._items and self._items[name] is not obj:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self.check(name, obj, origin)
        if self._on_register is not None and not any(held is obj for held in self._items.values()):
            self._on_register(name, obj)
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
                    self.register(ep.name, ep.load(), f" (entry point '{ep.value}' in group '{ep.group}')")

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


def _what(obj: Any) -> str:
    """A plug-in as an error message names it: ``class mypkg.Thing``, ``function mypkg.load``, ``str 'x'``."""
    if inspect.isclass(obj) or inspect.isfunction(obj):
        return f"{'class' if inspect.isclass(obj) else 'function'} {obj.__module__}.{obj.__qualname__}"
    text = repr(obj)
    return f"{type(obj).__qualname__} {text if len(text) <= 40 else text[:37] + '...'}"


def _name_method(name: str, cls: Any) -> None:
    """A method class carries the name it is registered under (``cls.name``: its option errors, records
    and ``describe``), through an entry point as through :func:`fedbench.api.method.register_method`, not its
    parent's or ``""`` (a second name for a class already registered leaves its first one)."""
    cls.name = name


METHODS: Registry = Registry(
    "method",
    base="fedbench.api.method:Method",
    entry_point_group="fedbench.methods",
    discover=lambda: import_submodules("fedbench.methods"),
    on_register=_name_method,
)
TASKS: Registry = Registry(
    "task",
    base="fedbench.api.task:TaskSpec",
    instance=True,
    entry_point_group="fedbench.tasks",
    discover=lambda: import_submodules("fedbench.tasks"),
)
SUITES: Registry = Registry(
    "suite", entry_point_group="fedbench.suites", discover=lambda: import_submodules("fedbench.tasks")
)
FAMILIES: Registry = Registry(
    "task family",
    base="fedbench.api.family:TaskFamily",
    instance=True,
    entry_point_group="fedbench.families",
    discover=lambda: import_submodules("fedbench.tasks.families"),
)
BACKBONES: Registry = Registry(
    "backbone",
    entry_point_group="fedbench.backbones",
    discover=lambda: import_submodules("fedbench.backbones"),
)


def register_task(name: str):
    """Decorator / call: register a task, a :class:`fedbench.api.task.TaskSpec` instance."""
    return TASKS.decorator(name)


def register_family(name: str):
    """Decorator / call: register a task family, a :class:`fedbench.api.family.TaskFamily` instance."""
    return FAMILIES.decorator(name)


def register_suite(name: str):
    """Decorator: register a suite builder ``fn(plans, config, tasks, seed) -> ExampleTable``."""
    return SUITES.decorator(name)


def register_backbone(name: str):
    """Decorator: register a backbone loader ``fn(rest: str, spec: str) -> Backbone``."""
    return BACKBONES.decorator(name)
