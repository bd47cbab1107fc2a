"""Typed values from a parsed TOML table: each value converted to its dataclass field's type, or a
one-line :class:`~fedbench.config.protocol.ProtocolError` naming the field."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from fedbench.config.sections import RETIRED, ProtocolError


def coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert a TOML value to the annotated type, or raise naming the field."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ProtocolError(f"protocol field '{path}' must be a table, got {value!r}")
        return build(tp, value, path + ".")
    if origin is tuple:
        (inner, *_rest) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ProtocolError(f"protocol field '{path}' must be a list, got {value!r}")
        return tuple(coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"protocol field '{path}' must be a table, got {value!r}")
        (_key, inner) = typing.get_args(tp)
        return {k: coerce(v, inner, f"{path}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    expected = getattr(tp, "__name__", str(tp))
    raise ProtocolError(f"protocol field '{path}' must be {expected}, got {value!r}")


def build(cls: type, table: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in [k for k in table if prefix + k in RETIRED and k not in names]:
        if table[key] != RETIRED[prefix + key]:
            raise ProtocolError(
                f"protocol field '{prefix}{key}' = {table[key]!r} is invalid: the field is retired "
                f"(only {RETIRED[prefix + key]!r} was ever run); remove it"
            )
        table = {k: v for k, v in table.items() if k != key}
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise ProtocolError(
            f"unknown protocol field '{prefix}{unknown[0]}'. Valid fields: {', '.join(prefix + n for n in names)}"
        )
    return cls(**{k: coerce(v, hints[k], prefix + k) for k, v in table.items()})
