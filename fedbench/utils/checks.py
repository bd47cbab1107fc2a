"""Input checks shared by the protocol loader, the method options and the data sources.

**Numbers.** Every float a user gives (a protocol field, a method option) must be finite: ``nan``,
``inf``, ``-inf`` and overflowing literals such as ``1e400`` (which read as ``inf``) are refused
before anything runs or is written, with one line naming the key, the value and the valid range
(:func:`number_problem`). Range checks written as ``v > 0`` hold for ``inf`` and never fail for
``nan``, so finiteness is checked here once, for every float field found by its annotation
(:func:`float_fields`), not by each range check: a new float field or option gets it for free.
A method option's range is declared once on its ``Options`` dataclass with :func:`bounded`
(a :class:`Bound` per field), which both the option parser (:func:`fedbench.api.options.build_config`,
before the dataclass's own ``__post_init__``) and the dataclass (:func:`check_bounds` in its
``__post_init__``) read; a float option without a declared bound must still be finite.

**Local path or hub id** (:func:`is_local_path`). A dataset source or a backbone path names a local
path when it exists, or when it cannot be a Hugging Face hub id (``OWNER/NAME``: exactly one ``/``,
each part starting with a letter or digit and made of letters, digits, ``_``, ``.`` and ``-``), or
when its ``OWNER`` part exists as a local directory (``data/VQAv2`` beside a ``data/`` folder). Any
other string is a hub id. A local path that does not exist is reported as such, never looked up on
the hub.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FINITE = "a finite number"


def is_finite(value: Any) -> bool:
    """False for a float (or a list / tuple holding one) that is nan or infinite; True otherwise."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(is_finite(v) for v in value)
    return True


def number_problem(
    what: str, value: Any, allowed: str, ok: Callable[[Any], bool] | None = None, given: Any = None
) -> str | None:
    """The one-line complaint about ``value`` (``what``: e.g. ``protocol field 'local.lr'``), or None.

    A non-finite value is refused first (every range check is meaningless for it), then ``ok(value)``
    (the range) is asked. ``allowed`` says what is valid, e.g. ``a number > 0``; ``given``: the value
    as the user wrote it, when that differs from the converted ``value`` (``'1e400'`` for ``inf``)."""
    shown = value if given is None else given
    if not is_finite(value):
        return f"{what} = {shown!r} is invalid: not a finite number; expected {allowed}"
    if ok is not None and not ok(value):
        return f"{what} = {shown!r} is invalid: expected {allowed}"
    return None


@dataclass(frozen=True)
class Bound:
    """A finite number's valid range: ``[lo, hi]``, either end open or absent (``None``)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not is_finite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            return f"a number in {left}{self.lo:g}, {self.hi:g}{right}"
        if self.lo is not None:
            return f"a number {'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"a number {'<' if self.hi_open else '<='} {self.hi:g}"
        return FINITE


POSITIVE = Bound(0, lo_open=True)
NON_NEGATIVE = Bound(0)
UNIT = Bound(0, 1)

_BOUNDS = "__fedbench_bounds__"


def bounded(**bounds: Bound) -> Callable[[type], type]:
    """Class decorator: declare the valid range of some float fields of a dataclass (inherited by
    subclasses, which may add or override their own)."""

    def declare(cls: type) -> type:
        setattr(cls, _BOUNDS, {**cls.__dict__.get(_BOUNDS, {}), **bounds})
        return cls

    return declare


def bounds_of(cls: type) -> dict[str, Bound]:
    """Every declared bound of ``cls`` and its bases (the most derived declaration wins)."""
    out: dict[str, Bound] = {}
    for klass in reversed(cls.__mro__):
        out.update(klass.__dict__.get(_BOUNDS, {}))
    return out


def _holds_float(tp: Any) -> bool:
    if tp is float:
        return True
    return any(_holds_float(arg) for arg in typing.get_args(tp) if arg is not Ellipsis)


def float_fields(cls: type) -> list[str]:
    """The fields of dataclass ``cls`` annotated with a float (``float``, ``tuple[float, ...]``,
    ``float | None``...)."""
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if _holds_float(hints[f.name])]


def allowed_of(cls: type, key: str) -> str:
    """What field ``key`` of ``cls`` accepts, in words (its bound, else any finite number)."""
    bound = bounds_of(cls).get(key)
    return str(bound) if bound is not None else FINITE


def check_bounds(obj: Any) -> None:
    """Every float field of dataclass instance ``obj`` finite and in its declared :class:`Bound`;
    raise ValueError (``key = value is invalid: ...``) naming the first that is not. Call it from
    ``__post_init__``."""
    bounds = bounds_of(type(obj))
    for key in float_fields(type(obj)):
        value = getattr(obj, key)
        bound = bounds.get(key)
        ok = (lambda v, b=bound: v in b) if bound is not None else None
        problem = number_problem(key, value, str(bound) if bound is not None else FINITE, ok)
        if problem is not None:
            raise ValueError(problem)


def dataclass_leaves(obj: Any, prefix: str = "", skip: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every field of a dataclass instance, nested dataclasses walked into
    (paths in ``skip`` are left out)."""
    for f in dataclasses.fields(obj):
        path = prefix + f.name
        if path in skip:
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from dataclass_leaves(value, path + ".", skip)
        else:
            yield path, value


# ------------------------------------------------------------------------------- local path or hub id

_HUB_PART = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
HUB_ID = re.compile(rf"{_HUB_PART}/{_HUB_PART}")


def is_local_path(source: str) -> bool:
    """True when ``source`` names a local path rather than a hub id (the rule in the module
    docstring): it exists, or it is not ``OWNER/NAME``, or its ``OWNER`` is a local directory."""
    path = Path(source).expanduser()
    if path.exists() or not HUB_ID.fullmatch(source):
        return True
    return Path(source.partition("/")[0]).is_dir()
