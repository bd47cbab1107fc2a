"""A protocol in and out of TOML: a preset by name or a file by path, read and validated; a protocol
written back as a file that reads to the same protocol (and hash)."""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from fedbench.config.coerce import build
from fedbench.config.protocol import (
    SWEEP_SEEDS,
    MethodEntry,
    Protocol,
    ProtocolError,
    SweepConfig,
    sweep_field_type,
    sweep_value,
    valid_seed_list,
    validate,
)


def _method_entry(item: Any, index: int) -> MethodEntry:
    if isinstance(item, str):
        return MethodEntry(item)
    if isinstance(item, dict) and isinstance(item.get("name"), str):
        extra = sorted(set(item) - {"name", "options"})
        if extra:
            raise ProtocolError(f"unknown protocol field 'methods[{index}].{extra[0]}'. Valid fields: name, options")
        options = item.get("options", {})
        if not isinstance(options, dict):
            raise ProtocolError(
                f"protocol field 'methods[{index}].options' must be a table of option = value, got {options!r}"
            )
        return MethodEntry(item["name"], dict(options))
    raise ProtocolError(f"protocol field 'methods[{index}]' must be a method name or {{name, options}}, got {item!r}")


def _sweep_config(table: Any) -> SweepConfig:
    """``[sweep]`` with its three keys and the optional ``seeds``; values converted to the swept
    field's type, per-value seeds to tuples (checked by :func:`_validate_sweep`)."""
    if not isinstance(table, dict):
        raise ProtocolError(f"protocol field 'sweep' must be a table (field, values, reference), got {table!r}")
    keys = ("field", "values", "reference")
    unknown = sorted(set(table) - {*keys, "seeds"})
    if unknown:
        raise ProtocolError(
            f"unknown protocol field 'sweep.{unknown[0]}'. Valid fields: sweep.field, sweep.values, sweep.reference, "
            "sweep.seeds"
        )
    missing = [k for k in keys if k not in table]
    if missing:
        raise ProtocolError(f"protocol table 'sweep' lacks '{missing[0]}': it needs field, values and reference")
    for key in ("field", "reference"):
        if not isinstance(table[key], str):
            raise ProtocolError(f"protocol field 'sweep.{key}' must be str, got {table[key]!r}")
    if not isinstance(table["values"], list):
        raise ProtocolError(f"protocol field 'sweep.values' must be a list, got {table['values']!r}")
    tp = sweep_field_type(table["field"])
    values = tuple(sweep_value(i, v, table["field"], tp) for i, v in enumerate(table["values"]))
    seeds = table.get("seeds")
    if seeds is None:
        return SweepConfig(table["field"], values, table["reference"])
    if not isinstance(seeds, list):
        raise ProtocolError(
            f"protocol field 'sweep.seeds' must be a list of seed lists (one per entry of sweep.values), got {seeds!r}"
        )
    for i, item in enumerate(seeds):
        if not valid_seed_list(item):
            raise ProtocolError(
                f"protocol field 'sweep.seeds[{i}]' = {item!r} is invalid: expected {SWEEP_SEEDS} "
                f"(the seeds of sweep.values[{i}])"
            )
    return SweepConfig(table["field"], values, table["reference"], tuple(tuple(s) for s in seeds))


def from_dict(table: dict[str, Any]) -> Protocol:
    """Build and validate a protocol from a parsed TOML table."""
    table = dict(table)
    methods = table.pop("methods", None)
    sweep = table.pop("sweep", None)
    proto = build(Protocol, table)
    if methods is not None:
        if not isinstance(methods, list):
            raise ProtocolError(f"protocol field 'methods' must be a list, got {methods!r}")
        proto = dataclasses.replace(proto, methods=tuple(_method_entry(m, i) for i, m in enumerate(methods)))
    if sweep is not None:
        proto = dataclasses.replace(proto, sweep=_sweep_config(sweep))
        if proto.sweep is not None and proto.sweep.seeds and "seeds" not in table:
            # left out beside per-value seeds: every seed the sweep runs (so a written protocol.toml names them)
            proto = dataclasses.replace(proto, seeds=tuple(sorted({s for ss in proto.sweep.seeds for s in ss})))
    validate(proto)
    return proto


def preset_names() -> list[str]:
    files = resources.files("fedbench.config.presets")
    return sorted(p.name[: -len(".toml")] for p in files.iterdir() if p.name.endswith(".toml"))


def load(preset_or_path: str) -> Protocol:
    """Load a preset by name or a protocol TOML file by path."""
    if preset_or_path.endswith(".toml") or "/" in preset_or_path:
        path = Path(preset_or_path)
        if not path.is_file():
            what = "is a directory, not a TOML file" if path.is_dir() else "does not exist"
            raise ProtocolError(f"protocol file '{preset_or_path}' {what}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ProtocolError(
                f"protocol file '{preset_or_path}' is not UTF-8 text (byte {err.start}: {err.reason}): "
                "a protocol is a TOML file"
            ) from None
        except OSError as err:
            raise ProtocolError(f"cannot read protocol file '{preset_or_path}': {err.strerror or err}") from None
    else:
        names = preset_names()
        if preset_or_path not in names:
            raise ProtocolError(f"Unknown preset '{preset_or_path}'. Available: {', '.join(names)}")
        text = resources.files("fedbench.config.presets").joinpath(f"{preset_or_path}.toml").read_text()
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ProtocolError(f"malformed TOML in '{preset_or_path}': {err}") from None
    return from_dict(table)


def to_toml(proto: Protocol) -> str:
    """The protocol as a TOML file that :func:`load` reads back to the same protocol (and hash)."""
    import tomli_w

    body = proto.as_dict()
    body["methods"] = [m["name"] if not m["options"] else m for m in body["methods"]]
    head = f"# protocol hash {proto.hash}\n"
    if proto.sweep is not None:
        head = (
            f"# sweep protocol (hash {proto.hash}): [sweep] values replace the {proto.sweep.field} below; each\n"
            "# variant's records carry its own hash, written in <field>=<value>/protocol.toml\n"
        )
    return head + tomli_w.dumps(body)
