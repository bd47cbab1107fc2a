"""Task-expert Mixture-of-Adapters machinery shared by ``pilot-ctmoa`` and ``mmrouter-moa``.

Both methods put the same modules on the frozen backbone's patch tokens and follow the same
two-stage schedule (Pilot, Xiong et al., AAAI 2025, arXiv 2501.13985):

- **task adapters** ``task_adapters.<task>``: one :class:`~fedbench.moa.Adapter` per task, shared
  and averaged only over the clients that hold the task (task-wise aggregation);
- a **client adapter** ``client_adapter``: local, trained in stage 1, frozen (still added) in stage 2;
- **adapters-on-adapters** ``aoa.<task>``: a small Adapter on a *foreign* task adapter's output,
  added to it, trained in stage 2 while the foreign adapter itself stays frozen;
- a **token router** ``router`` (stage 2): per-token logits over the experts, softmax (dense or
  top-k), with 0.1 × switch load-balance and 0.01 × z-loss;
- the task heads ("the LLM's part" here) aggregated per client by Pilot's distance-weighted rule.

The method file decides tags, which router and which extra experts (mmrouter's OCR expert), and
what goes up and down; everything else lives here once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fedbench.aggregate import weighted_mean
from fedbench.backbone import Backbone
from fedbench.method import ClientInfo, Method, Reply, holds
from fedbench.moa import (
    Adapter,
    distance_weighted,
    grouped_mean,
    load_balance_loss,
    mixture,
    orthogonality_penalty,
    route,
    router_z_loss,
)
from fedbench.model import ClientModel, Features
from fedbench.payload import Payload
from fedbench.task import TaskSpec

if TYPE_CHECKING:
    from fedbench.simulation import ClientContext

STAGE1, STAGE2 = 1, 2
TASK_ADAPTERS, AOA, CLIENT_ADAPTER, ROUTER, OCR_EXPERT, HEADS = (
    "task_adapters.",
    "aoa.",
    "client_adapter.",
    "router.",
    "ocr_expert.",
    "heads.",
)
STAGE1_FRACTION = 0.2  # default stage-1 length: the first 20% of the rounds, at least one


@dataclass(frozen=True)
class TaskExpertOptions:
    """Options common to the task-expert MoA methods (Pilot's defaults where it has them)."""

    bottleneck: int = 32  # task / client / OCR adapter width
    aoa_bottleneck: int = 8  # adapter-on-adapter width (a small adapter)
    stage1_rounds: int = -1  # rounds of stage 1; -1: max(1, round(0.2 × protocol rounds))
    top_k: int = 0  # 0: dense softmax routing; k: top-k, weights renormalised
    orth_weight: float = 0.1  # stage 1: orthogonality penalty (task vs client adapter)
    balance_weight: float = 0.1  # stage 2: switch load-balance loss
    z_weight: float = 0.01  # stage 2: router z-loss
    nearest: int = 3  # heads: Pilot's M nearest clients in the distance-weighted aggregation

    def __post_init__(self) -> None:
        for key in ("bottleneck", "aoa_bottleneck", "nearest"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} = {getattr(self, key)} must be >= 1")
        if self.stage1_rounds < -1:
            raise ValueError(f"stage1_rounds = {self.stage1_rounds} must be >= 0 (or -1: 20% of the rounds)")
        if self.top_k < 0:
            raise ValueError(f"top_k = {self.top_k} must be >= 0 (0: dense routing)")
        for key in ("orth_weight", "balance_weight", "z_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} = {getattr(self, key)} must be >= 0")


def stage1_length(option: int, rounds: int) -> int:
    """Number of stage-1 rounds: the option, or (-1) the first 20% of ``rounds``, at least one."""
    return max(1, round(STAGE1_FRACTION * rounds)) if option < 0 else option


def stage_of(round_: int, rounds: int, option: int) -> int:
    """Stage of 0-based round ``round_``: 1 for rounds < stage1 length, else 2."""
    return STAGE1 if round_ < stage1_length(option, rounds) else STAGE2


def task_of(name: str) -> str | None:
    """The task a per-task parameter belongs to (``task_adapters.<t>.*``, ``aoa.<t>.*``, ``heads.<t>.*``)."""
    for prefix in (TASK_ADAPTERS, AOA, HEADS):
        if name.startswith(prefix):
            return name[len(prefix) :].split(".", 1)[0]
    return None


class TokenRouter(nn.Module):
    """Pilot's router: Linear(token_dim → n_experts, no bias) on each image token."""

    def __init__(self, token_dim: int, n_experts: int) -> None:
        super().__init__()
        self.image = nn.Linear(token_dim, n_experts, bias=False)

    def forward(self, f: Features, ocr_available: bool = True) -> torch.Tensor:
        """Logits [B, L, n_experts]."""
        return self.image(f.tokens)


RouterFactory = Callable[[int, int, int, int], nn.Module]  # (token_dim, embed_dim, n_tasks, n_experts)


class TaskExpertModel(ClientModel):
    """Frozen towers -> task experts (+ client adapter) on the patch tokens -> task heads.

    Stage 1: tokens' = tokens + A_task(row)(tokens) + C(tokens) [+ O(tokens) on reading rows: OCR
    tokens present and a task whose head reads them, when the model has an OCR expert the client holds].
    Stage 2: tokens' = tokens + Σ_e w_e·E_e(tokens) + C(tokens), with E_t = A_t for the client's
    own tasks, E_t = A_t + AoA_t(A_t) for the others, E_ocr = O, and w the router's per-token weights.

    The harness builds one model before clients are known; :meth:`bind` tells it the stage, the
    client's tasks and whether it holds the OCR expert (the method's ``prepare_client``, which the
    harness calls whenever it loads a client, before training and before evaluation).
    """

    def __init__(
        self,
        backbone: Backbone,
        tasks: list[TaskSpec],
        options: TaskExpertOptions,
        make_router: RouterFactory,
        ocr_expert: bool = False,
    ) -> None:
        super().__init__(backbone, tasks)
        dt, de = backbone.token_dim, backbone.embed_dim
        self.options = options
        self.task_adapters = nn.ModuleDict({t: Adapter(dt, options.bottleneck) for t in self.task_names})
        self.aoa = nn.ModuleDict({t: Adapter(dt, options.aoa_bottleneck) for t in self.task_names})
        self.client_adapter = Adapter(dt, options.bottleneck)
        self.ocr_expert = Adapter(dt, options.bottleneck) if ocr_expert else None
        reads = torch.tensor([t.uses_ocr for t in tasks])  # per task id: does its head read OCR?
        self.register_buffer("reads_ocr", reads, persistent=False)
        self.expert_names = list(self.task_names) + (["ocr"] if ocr_expert else [])
        self.router = make_router(dt, de, len(self.task_names), len(self.expert_names))
        self.stage = STAGE1
        self.held: tuple[str, ...] = tuple(self.task_names)
        self.ocr_available = True
        self._aux: torch.Tensor | float = 0.0

    def bind(self, stage: int, held: Sequence[str], ocr_available: bool) -> None:
        self.stage, self.held, self.ocr_available = stage, tuple(held), bool(ocr_available)

    # --- experts ------------------------------------------------------------------------------
    def task_expert(self, task: str, x: torch.Tensor) -> torch.Tensor:
        """A_t(x), plus the adapter-on-adapter on its output when t is not one of the client's tasks."""
        out = self.task_adapters[task](x)
        return out if task in self.held else out + self.aoa[task](out)

    def n_available(self) -> int:
        """Experts this client routes over: the OCR expert (last) only where the client holds it."""
        return len(self.expert_names) - (self.ocr_expert is not None and not self.ocr_available)

    def _per_row(self, x: torch.Tensor, groups: Iterator[tuple[torch.Tensor, nn.Module]]) -> torch.Tensor:
        out = torch.zeros_like(x)
        for idx, module in groups:
            if len(idx):
                out = out.index_copy(0, idx, module(x[idx]))
        return out

    # --- forward ------------------------------------------------------------------------------
    def adapt(self, f: Features) -> Features:
        x = f.tokens
        client = self.client_adapter(x)
        if self.stage == STAGE1:
            self.routing = None
            task = self._per_row(
                x,
                (
                    (torch.nonzero(f.task_id == i).flatten(), self.task_adapters[t])
                    for i, t in enumerate(self.task_names)
                ),
            )
            self._aux = self.options.orth_weight * orthogonality_penalty(task, client)
            delta = task + client
            if self.ocr_expert is not None and self.ocr_available:  # reading rows: OCR text + a task that reads it
                rows = torch.nonzero(f.ocr_mask.any(1) & self.reads_ocr[f.task_id]).flatten()
                delta = delta + self._per_row(x, iter([(rows, self.ocr_expert)]))
            return replace(f, tokens=x + delta)
        logits = self.router(f, self.ocr_available)  # [B, L or 1, E]
        n = self.n_available()
        logits = logits[..., :n]
        weights = route(logits, self.options.top_k)
        experts = [self.task_expert(t, x) for t in self.task_names]
        if n > len(self.task_names):
            experts.append(self.ocr_expert(x))
        delta = mixture(experts, weights.expand(*x.shape[:2], n))
        o = self.options
        self._aux = o.balance_weight * load_balance_loss(weights) + o.z_weight * router_z_loss(logits)
        self.routing = F.pad(weights.mean(1), (0, len(self.expert_names) - n))  # token-averaged [B, E]
        return replace(f, tokens=x + delta + client)

    def extra_loss(self) -> torch.Tensor | float:
        return self._aux


@contextlib.contextmanager
def training_only(model: nn.Module, names: set[str]) -> Iterator[list[nn.Parameter]]:
    """Within the block only ``names`` require grad (the rest are frozen for this phase); yields them."""
    params = dict(model.named_parameters())
    was = {n: p.requires_grad for n, p in params.items()}
    try:
        for n, p in params.items():
            p.requires_grad_(was[n] and n in names)
        yield [params[n] for n in params if was[n] and n in names]
    finally:
        for n, p in params.items():
            p.requires_grad_(was[n])


# --- aggregation ------------------------------------------------------------------------------
def client_key(client: int, name: str) -> str:
    """Server-state key of client ``client``'s own aggregate of parameter ``name``."""
    return f"client{client}/{name}"


def is_client_entry(key: str) -> bool:
    return key.startswith("client") and "/" in key


def per_client_heads(replies: Sequence[Reply], nearest: int) -> Payload:
    """Pilot's per-client distance-weighted aggregation, applied task by task to the heads.

    For each task, among the replying clients that hold it: L2 distance between their flattened
    heads of that task, the ``nearest`` closest weighted ∝ 1/d (normalised to sum 1), mixed with
    the client's own head by example counts (:func:`fedbench.moa.distance_weighted`). Returns
    ``client<k>/heads.<task>.*`` entries.
    """
    out: Payload = {}
    tasks = dict.fromkeys(task_of(n) for r in replies for n in r.payload if n.startswith(HEADS))
    for task in tasks:
        prefix = f"{HEADS}{task}."
        members = [r for r in replies if any(n.startswith(prefix) for n in r.payload)]
        payloads = [{n: t for n, t in r.payload.items() if n.startswith(prefix)} for r in members]
        mixed = distance_weighted(payloads, [r.num_examples for r in members], nearest)
        for r, own in zip(members, mixed, strict=True):
            out.update({client_key(r.client.client, n): t for n, t in own.items()})
    return out


def aggregate_task_experts(
    server_state: Payload, replies: Sequence[Reply], nearest: int, group_of: Callable[[str], str]
) -> Payload:
    """The server step both methods share, a pure function of the replies.

    - every non-head tensor: example-weighted mean within its group (``group_of``); a client
      uploads only the tensors of its groups (its tasks' adapters; OCR tensors only from OCR
      clients), so each group is averaged over exactly its members;
    - heads: the plain example-weighted mean over the clients holding the task (``heads.*``: what a
      client never seen, or one asking for a task it does not hold, receives) and each replying
      client's own distance-weighted aggregate (``client<k>/heads.*``).
    """
    weights = [r.num_examples for r in replies]
    others = [{n: t for n, t in r.payload.items() if not n.startswith(HEADS)} for r in replies]
    heads = [{n: t for n, t in r.payload.items() if n.startswith(HEADS)} for r in replies]
    new: Payload = {}
    for group in grouped_mean(others, weights, group_of).values():
        new.update(group)
    new.update(weighted_mean(heads, weights))
    new.update(per_client_heads(replies, nearest))
    return {**server_state, **new}


class TaskExpertsMethod(Method):
    """Shared client/server logic; subclasses say which tensors are shared, sent and trained."""

    Options = TaskExpertOptions
    ocr_expert: bool = False

    # --- hooks for subclasses ------------------------------------------------------------------
    def make_router(self, token_dim: int, embed_dim: int, n_tasks: int, n_experts: int) -> nn.Module:
        return TokenRouter(token_dim, n_experts)

    def holds_ocr_expert(self, client: ClientInfo) -> bool:
        """Whether the client has (downloads) the OCR expert."""
        return False

    def sends(self, name: str, client: ClientInfo) -> bool:
        """Whether the server sends non-head shared tensor ``name`` to ``client``."""
        return name.startswith(TASK_ADAPTERS)  # all T task adapters go down to every client

    def uploads(self, name: str, client: ClientInfo) -> bool:
        """Whether ``client`` uploads non-head shared tensor ``name``."""
        return name.startswith(TASK_ADAPTERS) and task_of(name) in client.tasks

    def trains(self, name: str, client: ClientInfo, stage: int) -> bool:
        """Whether ``client`` trains parameter ``name`` in ``stage``."""
        task = task_of(name)
        if name.startswith((HEADS, TASK_ADAPTERS)):
            return task in client.tasks
        if name.startswith(CLIENT_ADAPTER):
            return stage == STAGE1
        if name.startswith(AOA):
            return stage == STAGE2 and task not in client.tasks
        if name.startswith(ROUTER):
            return stage == STAGE2
        if name.startswith(OCR_EXPERT):
            return client.has_ocr
        return True

    def group_of(self, name: str) -> str:
        """Aggregation group of a non-head tensor."""
        task = task_of(name)
        return f"task:{task}" if name.startswith(TASK_ADAPTERS) else name.split(".", 1)[0]

    # --- model / client ------------------------------------------------------------------------
    def build_model(self, backbone: Backbone, tasks: Sequence[TaskSpec]) -> ClientModel:
        return TaskExpertModel(backbone, list(tasks), self.options, self.make_router, self.ocr_expert)

    def stage(self, ctx: ClientContext) -> int:
        return stage_of(ctx.round, ctx.protocol.rounds, self.options.stage1_rounds)

    def prepare_client(self, model: TaskExpertModel, ctx: ClientContext) -> None:
        """The stage of this round, the client's tasks and whether it holds the OCR expert."""
        model.bind(self.stage(ctx), ctx.info.tasks, self.holds_ocr_expert(ctx.info))

    def local_update(self, model: TaskExpertModel, ctx: ClientContext) -> None:
        stage = self.stage(ctx)
        names = {n for n, p in model.named_parameters() if p.requires_grad and self.trains(n, ctx.info, stage)}
        with training_only(model, names) as params:
            ctx.train(model, params, phase=f"stage{stage}")

    # --- communication -------------------------------------------------------------------------
    def download(self, server_state: Payload, client: ClientInfo) -> Payload:
        """All T task adapters, the client's own head aggregates (plain mean where it has none),
        and whatever :meth:`sends` adds."""
        out: Payload = {}
        for name, tensor in server_state.items():
            if is_client_entry(name):
                continue
            if name.startswith(HEADS):
                if holds(client, name):
                    out[name] = server_state.get(client_key(client.client, name), tensor)
            elif self.sends(name, client):
                out[name] = tensor
        return out

    def upload(self, model: ClientModel, client: ClientInfo) -> Payload:
        tags = self.tags(model)
        return {
            n: p.detach().clone()
            for n, p in model.named_parameters()
            if tags.get(n) == "shared" and (holds(client, n) if n.startswith(HEADS) else self.uploads(n, client))
        }

    def aggregate(self, server_state: Payload, replies: Sequence[Reply]) -> Payload:
        return aggregate_task_experts(server_state, replies, self.options.nearest, self.group_of)
