"""The fixed, recorded configuration that makes leaderboard rows comparable.

A protocol is one TOML file validated into frozen dataclasses on load; unknown keys and
out-of-range values are rejected with a message naming the field and what is allowed. Its
hash goes into every results record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from fedbench.data import PartitionConfig


class ProtocolError(ValueError):
    """A protocol that does not validate; the message names the field and the valid values."""


@dataclass(frozen=True)
class ClientsConfig:
    """Client sampling per round."""

    sample_fraction: float = 0.5


@dataclass(frozen=True)
class LocalConfig:
    """Local training every sampled client runs, identical for all methods."""

    steps: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    optimizer: str = "adamw"


@dataclass(frozen=True)
class EvalConfig:
    """When and on how much the harness evaluates."""

    every: int = 0  # evaluate every N rounds (0: only after the last round)
    batch_size: int = 128


@dataclass(frozen=True)
class BackboneConfig:
    """Frozen CLIP towers: ``embedded`` or ``open_clip:MODEL:TAG_OR_PATH`` or ``hf:PATH``."""

    name: str = "embedded"


@dataclass(frozen=True)
class MethodEntry:
    """One leaderboard row: a registered method and its option overrides."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.options:
            return self.name
        inner = ",".join(f"{k}={_fmt(v)}" for k, v in sorted(self.options.items()))
        return f"{self.name}[{inner}]"


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class Protocol:
    """A whole benchmark configuration."""

    name: str = "custom"
    seeds: tuple[int, ...] = (0,)
    rounds: int = 10
    tasks: tuple[str, ...] = ("classification", "vqa", "grounding", "ocr_vqa")
    methods: tuple[MethodEntry, ...] = (MethodEntry("fedavg-lora"),)
    data: PartitionConfig = field(default_factory=PartitionConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def hash(self) -> str:
        """Hash of everything that changes a run's numbers; not the name, nor the list of seeds and
        method rows (each record carries its own seed and method), so adding a seed or a method
        row keeps the runs already made."""
        body = self.as_dict()
        for key in ("name", "seeds", "methods"):
            body.pop(key)
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def replace(self, **changes: Any) -> Protocol:
        proto = dataclasses.replace(self, **changes)
        validate(proto)
        return proto


# (field path) -> (check, description of the valid values)
_RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "rounds": (lambda v: v >= 1, "an integer >= 1"),
    "seeds": (lambda v: len(v) >= 1 and all(s >= 0 for s in v), "a non-empty list of integers >= 0"),
    "tasks": (lambda v: len(v) >= 1, "a non-empty list of task names"),
    "methods": (lambda v: len(v) >= 1, "a non-empty list of methods"),
    "data.num_clients": (lambda v: v >= 1, "an integer >= 1"),
    "data.train_images": (lambda v: v >= 1, "an integer >= 1"),
    "data.test_images": (lambda v: v >= 1, "an integer >= 1"),
    "data.global_test_images": (lambda v: v >= 1, "an integer >= 1"),
    "data.tasks_per_client": (lambda v: v >= 0, "an integer >= 0 (0 = every task)"),
    "data.dirichlet_alpha": (lambda v: v >= 0, "a number >= 0 (0 = IID labels)"),
    "data.quantity_skew": (lambda v: v >= 0, "a number >= 0"),
    "data.ocr_fraction": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "data.domain_task_coupling": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "data.image_size": (lambda v: v >= 16, "an integer >= 16"),
    "clients.sample_fraction": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "local.steps": (lambda v: v >= 1, "an integer >= 1"),
    "local.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "local.lr": (lambda v: v > 0, "a number > 0"),
    "local.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "local.optimizer": (lambda v: v in ("adamw",), "one of: adamw"),
    "eval.every": (lambda v: v >= 0, "an integer >= 0"),
    "eval.batch_size": (lambda v: v >= 1, "an integer >= 1"),
}


def validate(proto: Protocol) -> None:
    """Check every range; raise :class:`ProtocolError` naming the first bad field."""
    for path, (check, allowed) in _RANGES.items():
        value: Any = proto
        for part in path.split("."):
            value = getattr(value, part)
        if not check(value):
            raise ProtocolError(f"protocol field '{path}' = {value!r} is invalid: expected {allowed}")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert a TOML value to the annotated type, or raise naming the field."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ProtocolError(f"protocol field '{path}' must be a table, got {value!r}")
        return _build(tp, value, path + ".")
    if origin is tuple:
        (inner, *_rest) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ProtocolError(f"protocol field '{path}' must be a list, got {value!r}")
        return tuple(_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"protocol field '{path}' must be a table, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    expected = getattr(tp, "__name__", str(tp))
    raise ProtocolError(f"protocol field '{path}' must be {expected}, got {value!r}")


def _build(cls: type, table: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise ProtocolError(
            f"unknown protocol field '{prefix}{unknown[0]}'. Valid fields: {', '.join(prefix + n for n in names)}"
        )
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in table.items()})


def _method_entry(item: Any, index: int) -> MethodEntry:
    if isinstance(item, str):
        return MethodEntry(item)
    if isinstance(item, dict) and isinstance(item.get("name"), str):
        extra = sorted(set(item) - {"name", "options"})
        if extra:
            raise ProtocolError(f"unknown protocol field 'methods[{index}].{extra[0]}'. Valid fields: name, options")
        return MethodEntry(item["name"], dict(item.get("options", {})))
    raise ProtocolError(f"protocol field 'methods[{index}]' must be a method name or {{name, options}}, got {item!r}")


def from_dict(table: dict[str, Any]) -> Protocol:
    """Build and validate a protocol from a parsed TOML table."""
    table = dict(table)
    methods = table.pop("methods", None)
    proto = _build(Protocol, table)
    if methods is not None:
        if not isinstance(methods, list):
            raise ProtocolError(f"protocol field 'methods' must be a list, got {methods!r}")
        proto = dataclasses.replace(proto, methods=tuple(_method_entry(m, i) for i, m in enumerate(methods)))
    validate(proto)
    return proto


def preset_names() -> list[str]:
    files = resources.files("fedbench.presets")
    return sorted(p.name[: -len(".toml")] for p in files.iterdir() if p.name.endswith(".toml"))


def load(preset_or_path: str) -> Protocol:
    """Load a preset by name or a protocol TOML file by path."""
    if preset_or_path.endswith(".toml") or "/" in preset_or_path:
        path = Path(preset_or_path)
        if not path.is_file():
            raise ProtocolError(f"protocol file '{preset_or_path}' does not exist")
        text = path.read_text()
    else:
        names = preset_names()
        if preset_or_path not in names:
            raise ProtocolError(f"Unknown preset '{preset_or_path}'. Available: {', '.join(names)}")
        text = resources.files("fedbench.presets").joinpath(f"{preset_or_path}.toml").read_text()
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ProtocolError(f"malformed TOML in '{preset_or_path}': {err}") from None
    return from_dict(table)
