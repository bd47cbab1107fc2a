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
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from fedbench.api.answer_side import ANSWER_SIDES
from fedbench.api.data import PartitionConfig
from fedbench.utils.checks import FINITE, dataclass_leaves, is_finite, number_problem


class ProtocolError(ValueError):
    """A protocol that does not validate; the message names the field and the valid values."""


@dataclass(frozen=True)
class ClientsConfig:
    """Client sampling per round."""

    sample_fraction: float = 0.5


@dataclass(frozen=True)
class LocalConfig:
    """Local training every sampled client runs, identical for all methods (AdamW, the one optimiser
    of ``ClientContext.train``)."""

    steps: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01


EVERY_CLIENT = "all"


@dataclass(frozen=True)
class EvalConfig:
    """When and on how much the harness evaluates.

    ``clients``: whom an intermediate evaluation (``every``) scores: ``"all"`` (default) every
    registered client; an integer k >= 1, a seeded sample of k clients drawn afresh each evaluated
    round; a fraction in (0, 1), that share of the clients (at least one). The last round always
    scores every client, so the leaderboard's figures never rest on a sample; only the per-round
    curves and the convergence flag read the sampled rounds. With the default the table is left out of
    the hash (protocols written before the option keep their runs)."""

    every: int = 0  # evaluate every N rounds (0: only after the last round)
    batch_size: int = 128
    clients: Any = EVERY_CLIENT  # "all" | an int >= 1 | a float in (0, 1)

    @property
    def sampled(self) -> bool:
        """True when intermediate evaluations score a sample of the clients."""
        return self.clients != EVERY_CLIENT

    def sample_size(self, num_clients: int) -> int:
        """How many of ``num_clients`` an intermediate evaluation scores."""
        if not self.sampled:
            return num_clients
        if isinstance(self.clients, float):
            return min(num_clients, max(1, round(self.clients * num_clients)))
        return min(num_clients, int(self.clients))


@dataclass(frozen=True)
class BackboneConfig:
    """Frozen CLIP towers: ``embedded`` or ``open_clip:MODEL:TAG_OR_PATH`` or ``hf:PATH``."""

    name: str = "embedded"


@dataclass(frozen=True)
class ModelConfig:
    """The answer side every method's client model carries (applied to every row alike).

    ``shared`` (default): one answer trunk for every task + a thin output per task, as a multimodal
    LLM's language model answers every task; ``per_task``: a full head per task, nothing shared
    across tasks on the answer side; ``frozen_trunk``: the shared trunk frozen at its seeded init
    (only the thin outputs train on the answer side), the setting in which task specialisation of
    the adapters before it matters.
    """

    answer_side: str = "shared"


DEVICES = ("auto", "cpu", "cuda")
AMP_MODES = ("auto", "off", "bf16")


@dataclass(frozen=True)
class ResourcesConfig:
    """Where clients run: the device (``auto``: CUDA when there is one, else the CPU), mixed precision
    on it, and what each client may use when a Flower backend runs it (Ray's client resources: CPUs,
    and a fraction of a GPU). Out of the hash: like the machine, it is recorded with every run (rows
    on other devices agree within their CIs, not bit for bit).

    ``amp``: ``auto`` runs the forward passes of training and evaluation under bfloat16 autocast on a
    CUDA device that supports it (the frozen-feature cache, the backward pass and the optimizer stay
    float32), and nothing on a CPU; ``off`` never; ``bf16`` asks for it (refused where unsupported).
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    device: str = "auto"
    amp: str = "auto"


@dataclass(frozen=True)
class FaultsConfig:
    """``[faults]``: what goes wrong in a federated round, drawn by the server loop from seeded streams
    (:func:`fedbench.runtime.faults.plan_faults`), the same for every method row and on every backend. The
    defaults are the fault-free protocol (a protocol without ``[faults]`` hashes as before faults).

    - ``dropout``: probability that a sampled client drops out of a round after its download was sent
      (it never replies; nothing of it is aggregated).
    - ``stragglers``: probability that a sampled client is a straggler, a device that runs at
      ``straggler_steps`` of full speed (a fraction in (0, 1]).
    - ``deadline``: how long the server waits for the replies of a round, in the time a full-speed
      client takes for one local step (0: no deadline). Without a deadline the round ends when the
      full-speed clients are done (``local.steps``), and a straggler sends what it finished by then:
      ``floor(straggler_steps * local.steps)`` steps, at least one. With a deadline, a client that
      needs longer than it for its ``local.steps`` (a straggler: ``local.steps / straggler_steps``)
      misses it and is dropped; one that makes it sends its full update.

    Faults hit the training rounds of federated rows (evaluation scores every client); a reference
    row that is not federated (``centralized``) has no clients to fault.
    """

    dropout: float = 0.0
    stragglers: float = 0.0
    straggler_steps: float = 0.5
    deadline: float = 0.0

    @property
    def active(self) -> bool:
        return self != FaultsConfig()


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


@dataclass(frozen=True)
class SweepConfig:
    """``[sweep]``: every method row runs at each of ``values`` of the protocol field ``field`` (a
    dotted path such as ``data.domain_task_coupling``); gains are paired differences to the row
    labelled ``reference``.

    ``seeds`` (optional): one list of seeds per value, in the order of ``values``; value i then runs
    ``seeds[i]`` instead of the protocol's ``seeds`` (e.g. disjoint seeds per value, so that the seed
    is the unit when pooling across values); a protocol file that gives them may leave out its
    top-level ``seeds``, which then lists every seed the sweep runs (a top-level list written beside
    them is not run). ``fedbench run --seeds`` replaces them: every value runs the given seeds. Left
    out (``None``), every value runs the protocol's ``seeds``, and the table reads, writes and hashes
    as before the option. Seeds are replicates, so like the protocol's ``seeds`` they stay out of
    every hash: a variant hashes the same with or without per-value seeds, and so does the sweep
    protocol itself."""

    field: str
    values: tuple[Any, ...]
    reference: str
    seeds: tuple[tuple[int, ...], ...] | None = None

    def seeds_of(self, index: int, default: tuple[int, ...]) -> tuple[int, ...]:
        """The seeds value ``index`` runs: its own list, or ``default`` (the protocol's seeds)."""
        return default if self.seeds is None else self.seeds[index]

    @property
    def short(self) -> str:
        """The field's last name: ``domain_task_coupling``."""
        return self.field.rpartition(".")[2]

    def dir_name(self, value: Any) -> str:
        """The results subdirectory of one value: ``domain_task_coupling=0.5``."""
        return re.sub(r"[^A-Za-z0-9._=+-]+", "_", f"{self.short}={_fmt(value)}")


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
    model: ModelConfig = field(default_factory=ModelConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
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
        one value they could hold (``_RETIRED``), so results recorded before a field's removal keep
        their run ids: resumed, skipped and swept as before. A sweep's per-value seeds
        (``sweep.seeds``) are left out like ``seeds``: adding or moving seeds keeps the hash."""
        body = self.as_dict()
        for key in ("name", "seeds", "methods", "resources"):
            body.pop(key)
        if "sweep" in body:
            body["sweep"].pop("seeds", None)
        for path, value in _RETIRED.items():
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
        return [(value, _variant(self, value, i)) for i, value in enumerate(self.sweep.values)]


def _variant(proto: Protocol, value: Any, index: int) -> Protocol:
    sweep = proto.sweep
    assert sweep is not None
    name = f"{proto.name}[{sweep.short}={_fmt(value)}]"
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


def _sweep_field_type(name: str) -> Any:
    fields = sweep_fields()
    if name not in fields:
        close = difflib.get_close_matches(name, list(fields), n=1)
        hint = f" Did you mean: {close[0]}?" if close else ""
        raise ProtocolError(
            f"protocol field 'sweep.field' = {name!r} is not a field a sweep can vary.{hint} "
            f"Choose one of: {', '.join(fields)}"
        )
    return fields[name]


def _sweep_value(index: int, value: Any, name: str, tp: Any) -> Any:
    """The value as the field's type, or a one-line error naming it and what the field accepts."""
    try:
        return _coerce(value, tp, name)
    except ProtocolError:
        allowed = _RANGES[name][1] if name in _RANGES else f"a {getattr(tp, '__name__', tp)}"
        raise ProtocolError(
            f"protocol field 'sweep.values[{index}]' = {value!r} is invalid: '{name}' expects {allowed}"
        ) from None


_SWEEP_SEEDS = "a non-empty list of distinct integers >= 0"


def _valid_seed_list(seeds: Any) -> bool:
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
        if not _valid_seed_list(seeds):
            shown = list(seeds) if isinstance(seeds, tuple) else seeds
            raise ProtocolError(
                f"protocol field 'sweep.seeds[{i}]' = {shown!r} is invalid: expected {_SWEEP_SEEDS} "
                f"(the seeds of sweep.values[{i}])"
            )


def _validate_sweep(proto: Protocol) -> None:
    """The field exists and can vary, every value builds a variant that validates (``_RANGES``), no
    value (or results directory) twice, per-value seeds (if any) one valid list per value, and the
    reference is one of the method rows."""
    sweep = proto.sweep
    assert sweep is not None
    tp = _sweep_field_type(sweep.field)
    if not sweep.values:
        raise ProtocolError("protocol field 'sweep.values' = [] is invalid: expected a non-empty list of values")
    _validate_sweep_seeds(sweep)
    seen: dict[str, int] = {}
    for i, value in enumerate(sweep.values):
        _sweep_value(i, value, sweep.field, tp)
        try:
            validate(_variant(proto, value, i))
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
        (_key, inner) = typing.get_args(tp)
        return {k: _coerce(v, inner, f"{path}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    expected = getattr(tp, "__name__", str(tp))
    raise ProtocolError(f"protocol field '{path}' must be {expected}, got {value!r}")


# fields a protocol no longer has -> the one value older protocol files (e.g. the committed results'
# protocol.toml) carry: accepted there and dropped on load; any other value is an error
_RETIRED: dict[str, Any] = {"local.optimizer": "adamw"}


def _build(cls: type, table: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in [k for k in table if prefix + k in _RETIRED and k not in names]:
        if table[key] != _RETIRED[prefix + key]:
            raise ProtocolError(
                f"protocol field '{prefix}{key}' = {table[key]!r} is invalid: the field is retired "
                f"(only {_RETIRED[prefix + key]!r} was ever run); remove it"
            )
        table = {k: v for k, v in table.items() if k != key}
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
    tp = _sweep_field_type(table["field"])
    values = tuple(_sweep_value(i, v, table["field"], tp) for i, v in enumerate(table["values"]))
    seeds = table.get("seeds")
    if seeds is None:
        return SweepConfig(table["field"], values, table["reference"])
    if not isinstance(seeds, list):
        raise ProtocolError(
            f"protocol field 'sweep.seeds' must be a list of seed lists (one per entry of sweep.values), got {seeds!r}"
        )
    for i, item in enumerate(seeds):
        if not _valid_seed_list(item):
            raise ProtocolError(
                f"protocol field 'sweep.seeds[{i}]' = {item!r} is invalid: expected {_SWEEP_SEEDS} "
                f"(the seeds of sweep.values[{i}])"
            )
    return SweepConfig(table["field"], values, table["reference"], tuple(tuple(s) for s in seeds))


def from_dict(table: dict[str, Any]) -> Protocol:
    """Build and validate a protocol from a parsed TOML table."""
    table = dict(table)
    methods = table.pop("methods", None)
    sweep = table.pop("sweep", None)
    proto = _build(Protocol, table)
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
