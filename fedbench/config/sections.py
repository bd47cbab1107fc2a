"""The sections of a protocol (clients, local training, evaluation, backbone, model, resources,
faults), a method row and a sweep: frozen dataclasses, each field with its default."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


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


VLM_CONNECTORS = ("shared", "frozen")
VQA_METRICS = ("official", "normalized")


@dataclass(frozen=True)
class VLMConfig:
    """``[vlm]``: options of the generative-VLM backbone family (``backbone.name = "llava:/path"``), the
    same for every row. At their defaults a protocol reads (and hashes) as before the family existed;
    a CLIP-family protocol that sets them is refused (nothing is ignored).

    - ``connector``: ``shared`` (the connector trains in every row whose connector is not a method's
      own mixture, and is averaged as a shared tensor: LLaVA fine-tuning trains it, and FedVLMBench
      finds its tuning matters) or ``frozen`` (it keeps its pretrained weights).
    - ``vqa_metric``: how VQA accuracy treats generated answers. ``official`` is the VQA evaluation
      script bit for bit: it normalises punctuation, number words and articles only when the human
      answers are not all identical, so "Yes" against ten "yes" scores 0; ``normalized`` always
      normalises (lmms-eval). Default ``official``: the number a VQA paper reports, and the one
      published checkpoints are compared on; records carry which was used.
    - ``gradient_checkpointing``: recompute the LM's activations in the backward pass (a GPU memory
      option for large checkpoints; results are the same).
    """

    connector: str = "shared"
    vqa_metric: str = "official"
    gradient_checkpointing: bool = False


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
        inner = ",".join(f"{k}={format_value(v)}" for k, v in sorted(self.options.items()))
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
        return re.sub(r"[^A-Za-z0-9._=+-]+", "_", f"{self.short}={format_value(value)}")


def format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


# fields a protocol no longer has -> the one value older protocol files (e.g. the committed results'
# protocol.toml) carry: accepted there and dropped on load; any other value is an error
RETIRED: dict[str, Any] = {"local.optimizer": "adamw"}
