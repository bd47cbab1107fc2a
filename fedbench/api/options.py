"""Typed per-plug-in configs built from TOML tables or ``--methods name:key=value`` strings."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from fedbench.utils.checks import allowed_of, is_finite, number_problem


class OptionError(ValueError):
    """A bad method option; the message names the option and the valid choices."""


def _convert(value: Any, tp: Any, owner: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    literal_choices = typing.get_args(tp) if origin is typing.Literal else None
    if literal_choices is not None:
        if value not in literal_choices:
            choices = ", ".join(map(str, literal_choices))
            raise OptionError(f"option '{key}' of {owner} = {value!r} is invalid: choose one of {choices}")
        return value
    try:
        if origin is tuple:
            items = value.replace("+", ",").split(",") if isinstance(value, str) else list(value)
            (inner, *_rest) = typing.get_args(tp)
            return tuple(_convert(v.strip() if isinstance(v, str) else v, inner, owner, key) for v in items if v != "")
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            return str(value)
    except OptionError:
        raise
    except (TypeError, ValueError):
        name = getattr(tp, "__name__", str(tp))
        raise OptionError(f"option '{key}' of {owner} = {value!r} is invalid: expected {name}") from None
    return value


def build_config(cls: type, options: dict[str, Any], owner: str) -> Any:
    """Instantiate dataclass ``cls`` from ``options``; rejects unknown keys, converts strings, refuses
    a non-finite float (nan, inf, 1e400) in any float field, declared bound or not
    (:mod:`fedbench.utils.checks`), and then runs the dataclass's own ``__post_init__`` range checks (which
    raise ValueError)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        valid = ", ".join(fields) or "(none)"
        raise OptionError(f"unknown option '{unknown[0]}' for {owner}. Valid options: {valid}")
    hints = typing.get_type_hints(cls)
    values = {k: _convert(v, hints[k], owner, k) for k, v in options.items()}
    for key, value in values.items():
        if not is_finite(value):
            problem = number_problem(f"option '{key}' of {owner}", value, allowed_of(cls, key), given=options[key])
            raise OptionError(problem)
    try:
        return cls(**values)
    except ValueError as err:
        raise OptionError(f"{owner}: {err}") from None


def parse_method_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``name:key=value:key2=value2`` -> (name, {key: value}); a key given twice is refused (the
    last would silently win)."""
    name, *pairs = spec.split(":")
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"method option '{pair}' in '{spec}' must look like key=value")
        key = key.strip()
        if key in options:
            raise OptionError(
                f"method option '{key}' is given twice in '{spec}' ({key}={options[key]}, {key}={value.strip()}): "
                "give each option once"
            )
        options[key] = value.strip()
    return name.strip(), options
