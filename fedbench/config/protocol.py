"""The fixed, recorded configuration that makes leaderboard rows comparable.

A protocol is one TOML file validated into frozen dataclasses on load; unknown keys and
out-of-range values are rejected with a message naming the field and what is allowed. Its
hash goes into every results record.

An optional ``[sweep]`` table runs the same method rows at several values of one field: each
value gives a *variant* (the protocol with that value substituted and no sweep), validated like
any protocol, with its own hash; :meth:`Protocol.variants` lists them. The sweep may give each
value its own seeds (``sweep.seeds``, one list per value), so that values run on disjoint seeds.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any

from fedbench.api.answer_side import ANSWER_SIDES
from fedbench.api.data import PartitionConfig
from fedbench.config.coerce import coerce
from fedbench.config.sections import (
    AMP_MODES,
    DEVICES,
    EVERY_CLIENT,
    RETIRED,
    VLM_CONNECTORS,
    VQA_METRICS,
    BackboneConfig,
    ClientsConfig,
    EvalConfig,
    FaultsConfig,
    LocalConfig,
    MethodEntry,
    ModelConfig,
    ProtocolError,
    ResourcesConfig,
    SweepConfig,
    VLMConfig,
    format_value,
)
from fedbench.utils.checks import FINITE, dataclass_leaves, is_finite, number_problem


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
    model: ModelConfig = field(default_factory=ModelConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    vlm: VLMConfig = field(default_factory=VLMConfig)
    sweep: SweepConfig | None = None

    def as_dict(self) -> dict[str, Any]:
        body = dataclasses.asdict(self)
        if body["sweep"] is None:  # a protocol without a sweep reads (and hashes) as before sweeps
            del body["sweep"]
        elif body["sweep"]["seeds"] is None:  # likewise a sweep without per-value seeds
            del body["sweep"]["seeds"]
        for key in ("sources", "natural_splits", "partitioner", "classes_per_client"):
            if not body["data"][key]:  # likewise the real-data fields at their defaults
                del body["data"][key]
        if not self.faults.active:  # a fault-free protocol reads (and hashes) as before faults
            del body["faults"]
        if self.vlm == VLMConfig():  # likewise one at the VLM family's defaults
            del body["vlm"]
        if not self.eval.sampled:  # likewise one that evaluates every client at every evaluated round
            del body["eval"]["clients"]
        return body

    @property
    def hash(self) -> str:
        """Hash of everything that changes a run's numbers; not the name, nor the list of seeds and
        method rows (each record carries its own seed and method), so adding a seed or a method
        row keeps the runs already made, nor the client resources of a Flower backend. A protocol
        with a sweep hashes its ``[sweep]`` table too, but runs nothing under that hash: each
        variant's records carry the variant's own hash. The ``[faults]`` table changes numbers and is
        hashed, except when it is the fault-free default: it is then left out, so every protocol
        written before faults existed keeps its hash (and its runs). Retired fields are hashed at the
        one value they could hold (``RETIRED``), so results recorded before a field's removal keep
        their run ids: resumed, skipped and swept as before. A sweep's per-value seeds
        (``sweep.seeds``) are left out like ``seeds``: adding or moving seeds keeps the hash."""
        body = self.as_dict()
        for key in ("name", "seeds", "methods", "resources"):
            body.pop(key)
        if "sweep" in body:
            body["sweep"].pop("seeds", None)
        for path, value in RETIRED.items():
            section, _, leaf = path.rpartition(".")
            body[section][leaf] = value
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def replace(self, **changes: Any) -> Protocol:
        proto = dataclasses.replace(self, **changes)
        validate(proto)
        return proto

    def variants(self) -> list[tuple[Any, Protocol]]:
        """(value, variant) per swept value, in the sweep's order; empty without a sweep. A variant is
        this protocol with the value substituted, the value's seeds (``sweep.seeds``, when given) as
        its ``seeds`` and no sweep (so its hash is that of the same protocol written without a
        ``[sweep]`` table), named ``<name>[<field>=<value>]``."""
        if self.sweep is None:
            return []
        return [(value, variant(self, value, i)) for i, value in enumerate(self.sweep.values)]


def variant(proto: Protocol, value: Any, index: int) -> Protocol:
    sweep = proto.sweep
    assert sweep is not None
    name = f"{proto.name}[{sweep.short}={format_value(value)}]"
    proto = dataclasses.replace(proto, name=name, seeds=sweep.seeds_of(index, proto.seeds), sweep=None)
    section, _, leaf = sweep.field.rpartition(".")
    if not section:
        return dataclasses.replace(proto, **{leaf: value})
    return dataclasses.replace(proto, **{section: dataclasses.replace(getattr(proto, section), **{leaf: value})})


# seeds are replicates; rows are the sweep's; data.sources names where data are, not a setting
_NOT_SWEPT = ("name", "seeds", "tasks", "methods", "resources", "sweep", "data.sources")


def sweep_fields() -> dict[str, Any]:
    """Field path -> type of every protocol field a sweep can vary (the scalar ones)."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(Protocol)
    for f in dataclasses.fields(Protocol):
        tp = hints[f.name]
        if f.name in _NOT_SWEPT:
            continue
        if dataclasses.is_dataclass(tp):
            inner = typing.get_type_hints(tp)
            fields = (g.name for g in dataclasses.fields(tp) if f"{f.name}.{g.name}" not in _NOT_SWEPT)
            out.update({f"{f.name}.{g}": inner[g] for g in fields})
        else:
            out[f.name] = tp
    return out


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
    "data.classes_per_client": (lambda v: v >= 0, "an integer >= 0 (labels per client, pathological partitioner)"),
    "clients.sample_fraction": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "local.steps": (lambda v: v >= 1, "an integer >= 1"),
    "local.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "local.lr": (lambda v: v > 0, "a number > 0"),
    "local.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "eval.every": (lambda v: v >= 0, "an integer >= 0"),
    "eval.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "eval.clients": (
        lambda v: v == EVERY_CLIENT or (type(v) is int and v >= 1) or (type(v) is float and 0 < v < 1),
        f'"{EVERY_CLIENT}", an integer >= 1 (clients scored per intermediate evaluation) or a fraction in (0, 1)',
    ),
    "model.answer_side": (lambda v: v in ANSWER_SIDES, "one of: " + ", ".join(ANSWER_SIDES)),
    "resources.num_cpus": (lambda v: v > 0, "a number > 0"),
    "resources.num_gpus": (lambda v: 0 <= v <= 1, "a number in [0, 1] (a fraction of one GPU per client)"),
    "resources.device": (lambda v: v in DEVICES or v.startswith("cuda:"), "one of: " + ", ".join(DEVICES) + ", cuda:N"),
    "resources.amp": (lambda v: v in AMP_MODES, "one of: " + ", ".join(AMP_MODES)),
    "vlm.connector": (lambda v: v in VLM_CONNECTORS, "one of: " + ", ".join(VLM_CONNECTORS)),
    "vlm.vqa_metric": (lambda v: v in VQA_METRICS, "one of: " + ", ".join(VQA_METRICS)),
    "faults.dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "faults.stragglers": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "faults.straggler_steps": (lambda v: 0 < v <= 1, "a fraction of local.steps in (0, 1]"),
    "faults.deadline": (lambda v: v >= 0, "a number >= 0 (in local steps of a full-speed client; 0 = none)"),
}


def validate(proto: Protocol) -> None:
    """Check every range; raise :class:`ProtocolError` naming the first bad field. Every number of the
    protocol is finite first (:mod:`fedbench.utils.checks`): nan, inf and 1e400 are refused in any field,
    with or without a range in ``_RANGES`` (the method rows' options are checked by their parser)."""
    for path, value in dataclass_leaves(proto, skip=("methods", "sweep")):
        if not is_finite(value):
            allowed = _RANGES[path][1] if path in _RANGES else FINITE
            raise ProtocolError(number_problem(f"protocol field '{path}'", value, allowed))
    for path, (check, allowed) in _RANGES.items():
        value: Any = proto
        for part in path.split("."):
            value = getattr(value, part)
        if not check(value):
            raise ProtocolError(f"protocol field '{path}' = {value!r} is invalid: expected {allowed}")
    if proto.data.tasks_per_client > len(proto.tasks):
        raise ProtocolError(
            f"protocol field 'data.tasks_per_client' = {proto.data.tasks_per_client} is invalid: expected an "
            f"integer in [0, {len(proto.tasks)}] (the protocol has {len(proto.tasks)} task(s); 0 = every task)"
        )
    clients = proto.eval.clients
    if type(clients) is int and clients > proto.data.num_clients:
        raise ProtocolError(
            f"protocol field 'eval.clients' = {clients!r} is invalid: expected at most data.num_clients = "
            f'{proto.data.num_clients} clients, "{EVERY_CLIENT}" or a fraction in (0, 1)'
        )
    real_only = [k for k in ("natural_splits", "partitioner", "classes_per_client") if getattr(proto.data, k)]
    if real_only and proto.data.suite != "real":
        raise ProtocolError(
            f"protocol field 'data.{real_only[0]}' = {getattr(proto.data, real_only[0])!r} is invalid: it applies "
            f"to suite 'real' only (this protocol's suite is '{proto.data.suite}'); remove it"
        )
    twice_seed = next((s for i, s in enumerate(proto.seeds) if s in proto.seeds[:i]), None)
    if twice_seed is not None:
        raise ProtocolError(
            f"protocol field 'seeds' lists the seed {twice_seed} twice: list each seed once "
            f"(seeds: {', '.join(map(str, proto.seeds))})"
        )
    twice_task = next((t for i, t in enumerate(proto.tasks) if t in proto.tasks[:i]), None)
    if twice_task is not None:
        raise ProtocolError(
            f"protocol field 'tasks' lists the task '{twice_task}' twice: list each task once "
            f"(tasks: {', '.join(proto.tasks)})"
        )
    labels = [m.label for m in proto.methods]
    twice = next((label for i, label in enumerate(labels) if label in labels[:i]), None)
    if twice is not None:
        raise ProtocolError(
            f"protocol field 'methods' lists the row '{twice}' twice: list each method row once "
            f"(rows: {', '.join(labels)})"
        )
    if proto.sweep is not None:
        _validate_sweep(proto)


def canonical_label(entry: MethodEntry) -> str:
    """The label of the configuration ``entry`` runs: its options parsed by the method (so ``rank=8``,
    ``rank=8.0`` and TOML's ``rank = 8`` agree), those at their default dropped, keys sorted. Two rows
    with one canonical label are one configuration (``fedavg-lora`` and ``fedavg-lora[rank=8]``).
    Raises the method's own one-line error for an unknown method or a bad option."""
    from fedbench.api.method import create_method

    method = create_method(entry.name, entry.options)
    options, default = method.options, type(method).Options()
    changed = {
        f.name: getattr(options, f.name)
        for f in dataclasses.fields(options)
        if getattr(options, f.name) != getattr(default, f.name)
    }
    return MethodEntry(entry.name, changed).label


def check_method_rows(proto: Protocol) -> None:
    """Every method row builds (unknown method or option: its one-line error) and no two rows are one
    configuration under two spellings (:func:`canonical_label`): one line naming both."""
    seen: dict[str, str] = {}
    for entry in proto.methods:
        canonical = canonical_label(entry)
        if canonical in seen:
            raise ProtocolError(
                f"method rows '{seen[canonical]}' and '{entry.label}' are one configuration ('{canonical}': "
                "options at their defaults dropped, keys sorted); list it once"
            )
        seen[canonical] = entry.label


def sweep_field_type(name: str) -> Any:
    fields = sweep_fields()
    if name not in fields:
        close = difflib.get_close_matches(name, list(fields), n=1)
        hint = f" Did you mean: {close[0]}?" if close else ""
        raise ProtocolError(
            f"protocol field 'sweep.field' = {name!r} is not a field a sweep can vary.{hint} "
            f"Choose one of: {', '.join(fields)}"
        )
    return fields[name]


def sweep_value(index: int, value: Any, name: str, tp: Any) -> Any:
    """The value as the field's type, or a one-line error naming it and what the field accepts."""
    try:
        return coerce(value, tp, name)
    except ProtocolError:
        allowed = _RANGES[name][1] if name in _RANGES else f"a {getattr(tp, '__name__', tp)}"
        raise ProtocolError(
            f"protocol field 'sweep.values[{index}]' = {value!r} is invalid: '{name}' expects {allowed}"
        ) from None


SWEEP_SEEDS = "a non-empty list of distinct integers >= 0"


def valid_seed_list(seeds: Any) -> bool:
    if not isinstance(seeds, (list, tuple)) or not seeds:
        return False
    return all(type(s) is int and s >= 0 for s in seeds) and len(set(seeds)) == len(seeds)


def _validate_sweep_seeds(sweep: SweepConfig) -> None:
    """``sweep.seeds``: one list per value, each a non-empty list of distinct integers >= 0. Lists of
    different values may overlap or not (disjoint lists are what the option is for)."""
    if sweep.seeds is None:
        return
    if len(sweep.seeds) != len(sweep.values):
        raise ProtocolError(
            f"protocol field 'sweep.seeds' has {len(sweep.seeds)} list(s) for {len(sweep.values)} value(s): "
            "expected one list of seeds per entry of sweep.values, in the same order"
        )
    for i, seeds in enumerate(sweep.seeds):
        if not valid_seed_list(seeds):
            shown = list(seeds) if isinstance(seeds, tuple) else seeds
            raise ProtocolError(
                f"protocol field 'sweep.seeds[{i}]' = {shown!r} is invalid: expected {SWEEP_SEEDS} "
                f"(the seeds of sweep.values[{i}])"
            )


def _validate_sweep(proto: Protocol) -> None:
    """The field exists and can vary, every value builds a variant that validates (``_RANGES``), no
    value (or results directory) twice, per-value seeds (if any) one valid list per value, and the
    reference is one of the method rows."""
    sweep = proto.sweep
    assert sweep is not None
    tp = sweep_field_type(sweep.field)
    if not sweep.values:
        raise ProtocolError("protocol field 'sweep.values' = [] is invalid: expected a non-empty list of values")
    _validate_sweep_seeds(sweep)
    seen: dict[str, int] = {}
    for i, value in enumerate(sweep.values):
        sweep_value(i, value, sweep.field, tp)
        try:
            validate(variant(proto, value, i))
        except ProtocolError:
            allowed = _RANGES[sweep.field][1] if sweep.field in _RANGES else "a valid value"
            finite = "" if is_finite(value) else "not a finite number; "
            raise ProtocolError(
                f"protocol field 'sweep.values[{i}]' = {value!r} is invalid: {finite}'{sweep.field}' expects {allowed}"
            ) from None
        name = sweep.dir_name(value)
        if name in seen:
            raise ProtocolError(
                f"protocol field 'sweep.values[{i}]' = {value!r} repeats sweep.values[{seen[name]}] "
                f"(both run into '{name}'); list each value once"
            )
        seen[name] = i
    labels = [m.label for m in proto.methods]
    if sweep.reference not in labels:
        raise ProtocolError(
            f"protocol field 'sweep.reference' = {sweep.reference!r} is not one of the protocol's method rows. "
            f"Choose one of: {', '.join(labels)}"
        )


# the sections are part of a protocol's public names: importable from here as from fedbench.config.sections
__all__ = [
    "AMP_MODES",
    "DEVICES",
    "EVERY_CLIENT",
    "BackboneConfig",
    "ClientsConfig",
    "EvalConfig",
    "FaultsConfig",
    "LocalConfig",
    "MethodEntry",
    "ModelConfig",
    "Protocol",
    "ProtocolError",
    "ResourcesConfig",
    "SweepConfig",
    "canonical_label",
    "check_method_rows",
    "sweep_fields",
    "validate",
    "variant",
]
