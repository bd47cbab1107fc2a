"""Task-expert Mixture-of-Adapters machinery shared by ``pilot-ctmoa`` and ``mmrouter-moa``.

Both methods put the same modules where the backbone family lets them act (the models:
:mod:`fedbench.adapters.expert_models`; on the ``clip`` family the frozen tower's patch tokens, on the
``vlm`` family the connector) and follow the same two-stage schedule (Pilot, Xiong et al., AAAI 2025,
arXiv 2501.13985), per client: a client runs stage 1 on its first ``stage1_participations``
participations and stage 2 afterwards:

- **task adapters** ``task_adapters.<task>``: one :class:`~fedbench.adapters.moa.Adapter` per task, shared
  and averaged only over the clients that hold the task (task-wise aggregation);
- a **client adapter** ``client_adapter``: local, trained in stage 1, frozen (still added) in stage 2;
- **adapters-on-adapters** ``aoa.<task>``: a small Adapter on a *foreign* task adapter's output,
  added to it, trained in stage 2 while the foreign adapter itself stays frozen;
- a **token router** ``router`` (stage 2): per-token logits over the experts, softmax (dense or
  top-k), with 0.1 × switch load-balance and 0.01 × z-loss; or, as reference routing
  (``routing``), no router: ``oracle`` (each row to its own task's adapter, weight 1) or
  ``uniform`` (equal weights over the client's experts);
- the answer side ("the LLM's part"): Pilot's per-client distance-weighted rule, across all
  clients, on the shared answer trunk (``clip``; on each task's head among its holders with per-task
  heads; the thin task outputs averaged over the clients holding the task) or on the LM's LoRA
  (``vlm``: rank 8, alpha 16, dropout 0.05 on q and v, the LoRA rows' defaults).

Every shared tensor off the answer side belongs to an aggregation group that also says which
clients train it (:func:`in_group`); a client uploads exactly the tensors of its groups that its
stage trained (no router from a client in stage 1), so each is averaged over its trainers. The
method file decides tags, which router and which extra experts (mmrouter's OCR expert), the groups
and what goes down; everything else lives here once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

from fedbench.adapters.expert_models import (
    AOA,
    CLIENT_ADAPTER,
    OCR_EXPERT,
    ROUTER,
    STAGE1,
    STAGE2,
    TASK_ADAPTERS,
    TaskExpertModel,
    TaskExpertVLMModel,
    TokenRouter,
)
from fedbench.adapters.lora import LoRASpec, inject_lora
from fedbench.adapters.moa import distance_weighted, grouped_mean
from fedbench.api.aggregate import weighted_mean
from fedbench.api.answer_side import FROZEN_TRUNK
from fedbench.api.backbone import Backbone, backbone_family
from fedbench.api.method import ClientInfo, Method, Reply, holds
from fedbench.api.model import HEADS, LANGUAGE_MODEL, TRUNK, ClientModel, is_answer_side
from fedbench.api.payload import Payload
from fedbench.api.task import TaskSpec
from fedbench.utils.checks import NON_NEGATIVE, POSITIVE, bounded, check_bounds

if TYPE_CHECKING:
    from fedbench.api.context import ClientContext

ROUTINGS = ("learned", "oracle", "uniform")


@bounded(orth_weight=NON_NEGATIVE, balance_weight=NON_NEGATIVE, z_weight=NON_NEGATIVE, router_lr_scale=POSITIVE)
@dataclass(frozen=True)
class TaskExpertOptions:
    """Options common to the task-expert MoA methods (Pilot's defaults where it has them)."""

    bottleneck: int = 32  # task / client / OCR adapter width
    aoa_bottleneck: int = 8  # adapter-on-adapter width (a small adapter)
    stage1_participations: int = 1  # a client's first N participations are stage 1, later ones stage 2
    # stage-2 routing: the router (learned), or a reference without router: each row to its own
    # task's adapter with weight 1 (oracle), equal weights over the client's experts (uniform)
    routing: Literal["learned", "oracle", "uniform"] = "learned"
    # 0: dense softmax routing (Pilot's released script keeps every expert: num_selected = num_experts);
    # k >= 2: top-k, weights renormalised. 1 is refused: the one kept weight renormalises to 1, a
    # constant, so the router would learn nothing from the task loss nor the load balance (only the
    # z-loss, which just shrinks its logits). Shared by pilot-ctmoa and mmrouter-moa.
    top_k: int = 0
    orth_weight: float = 0.1  # stage 1: orthogonality penalty (task vs client adapter)
    balance_weight: float = 0.1  # stage 2: switch load-balance loss
    z_weight: float = 0.01  # stage 2: router z-loss
    router_lr_scale: float = 1.0  # the router's learning rate = this × the protocol's (local.lr)
    nearest: int = 3  # heads: Pilot's M nearest clients in the distance-weighted aggregation

    def __post_init__(self) -> None:
        for key in ("bottleneck", "aoa_bottleneck", "nearest"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} = {getattr(self, key)} must be >= 1")
        if self.stage1_participations < 0:
            raise ValueError(f"stage1_participations = {self.stage1_participations} must be >= 0")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing = {self.routing!r} must be one of {', '.join(ROUTINGS)}")
        if self.top_k < 0 or self.top_k == 1:
            raise ValueError(
                f"top_k = {self.top_k} is invalid: expected 0 (dense routing) or an integer >= 2 "
                "(top-1 renormalises the one kept weight to 1: the router would get no gradient from the loss)"
            )
        check_bounds(self)  # the float options: finite and in their declared bounds


def stage_of(participations: int, stage1_participations: int) -> int:
    """A client's stage given the local updates already in its state (``ClientContext.participations``):
    1 while it has done fewer than ``stage1_participations``, else 2. At training that is the stage of
    this participation; at evaluation after a round, the stage its next participation would run."""
    return STAGE1 if participations < stage1_participations else STAGE2


def task_of(name: str) -> str | None:
    """The task a per-task parameter belongs to (``task_adapters.<t>.*``, ``aoa.<t>.*``, ``heads.<t>.*``)."""
    for prefix in (TASK_ADAPTERS, AOA, HEADS):
        if name.startswith(prefix):
            return name[len(prefix) :].split(".", 1)[0]
    return None


# --- aggregation ------------------------------------------------------------------------------
def client_key(client: int, name: str) -> str:
    """Server-state key of client ``client``'s own aggregate of parameter ``name``."""
    return f"client{client}/{name}"


def is_client_entry(key: str) -> bool:
    return key.startswith("client") and "/" in key


def in_group(group: str, client: ClientInfo) -> bool:
    """Whether ``client`` trains (so uploads) the tensors of aggregation group ``group``: a group is
    ``+``-joined conditions, all of which must hold: ``task:<t>`` it holds task t, ``foreign:<t>`` it
    does not, ``ocr`` it has OCR; any other part (a module's name) holds for every client."""
    for part in group.split("+"):
        kind, _, task = part.partition(":")
        if (
            (kind == "task" and task not in client.tasks)
            or (kind == "foreign" and task in client.tasks)
            or (kind == "ocr" and not client.has_ocr)
        ):
            return False
    return True


def language_side_groups(replies: Sequence[Reply]) -> list[str]:
    """The name prefixes Pilot's distance rule runs on: a generative VLM's LM (its LoRA), the shared
    answer trunk (every client holds it), or, with per-task heads (no trunk), each task's head among
    the clients holding the task."""
    lm = next((n for r in replies for n in r.payload if LANGUAGE_MODEL in n), None)
    if lm is not None:
        return [lm[: lm.index(LANGUAGE_MODEL) + len(LANGUAGE_MODEL)]]
    if any(n.startswith(TRUNK) for r in replies for n in r.payload):
        return [TRUNK]
    tasks = dict.fromkeys(task_of(n) for r in replies for n in r.payload if n.startswith(HEADS))
    return [f"{HEADS}{t}." for t in tasks]


def per_client_language_side(replies: Sequence[Reply], nearest: int) -> Payload:
    """Pilot's per-client distance-weighted aggregation of its language side (the answer trunk here).

    For each group of :func:`language_side_groups`, among the replying clients that carry it: L2
    distance between their flattened tensors of the group, the ``nearest`` closest weighted ∝ 1/d
    (normalised to sum 1), mixed with the client's own by example counts
    (:func:`fedbench.adapters.moa.distance_weighted`). Returns ``client<k>/<name>`` entries.
    """
    out: Payload = {}
    for prefix in language_side_groups(replies):
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

    - every tensor off the answer side: example-weighted mean within its group (``group_of``); a
      client uploads only the tensors of its groups (its tasks' adapters; OCR tensors only from OCR
      clients), so each group is averaged over exactly its members;
    - answer side: the plain example-weighted mean (the trunk over all replying clients, a task's
      output over the clients holding the task: what a client never seen, or one asking for a task
      it does not hold, receives) and each replying client's own distance-weighted aggregate of the
      language side (``client<k>/trunk.*``; ``client<k>/heads.*`` with per-task heads).
    """
    weights = [r.num_examples for r in replies]
    others = [{n: t for n, t in r.payload.items() if not is_answer_side(n)} for r in replies]
    answer = [{n: t for n, t in r.payload.items() if is_answer_side(n)} for r in replies]
    new: Payload = {}
    for group in grouped_mean(others, weights, group_of).values():
        new.update(group)
    new.update(weighted_mean(answer, weights))
    new.update(per_client_language_side(replies, nearest))
    return {**server_state, **new}


class TaskExpertsMethod(Method):
    """Shared client/server logic; subclasses say which tensors are shared, sent and trained."""

    Options = TaskExpertOptions
    families = ("clip", "vlm")
    frozen_lm_form = True  # vlm with model.answer_side = "frozen_trunk": connector experts, no LoRA on the LM
    ocr_expert: bool = False

    # --- hooks for subclasses ------------------------------------------------------------------
    def make_router(self, token_dim: int, embed_dim: int, task_names: list[str], ocr_expert: bool) -> nn.Module:
        return TokenRouter(token_dim, len(task_names) + ocr_expert)

    def holds_ocr_expert(self, client: ClientInfo) -> bool:
        """Whether the client has (downloads) the OCR expert."""
        return False

    def sends(self, name: str, client: ClientInfo) -> bool:
        """Whether the server sends non-head shared tensor ``name`` to ``client``."""
        return name.startswith(TASK_ADAPTERS)  # all T task adapters go down to every client

    def uploads(self, name: str, client: ClientInfo) -> bool:
        """Whether ``client`` uploads shared tensor ``name`` off the answer side: exactly when it is a
        member of the tensor's aggregation group (it trains it), so each group is averaged over its
        trainers."""
        return in_group(self.group_of(name), client)

    def trains(self, name: str, client: ClientInfo, stage: int) -> bool:
        """Whether ``client`` trains parameter ``name`` in ``stage``."""
        task = task_of(name)
        if name.startswith((HEADS, TASK_ADAPTERS)):
            return task in client.tasks  # the answer trunk (every task's) falls through: trained always
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
        """Aggregation group of a tensor off the answer side, which also says who trains it
        (:func:`in_group`): ``task:<t>`` a task adapter, ``foreign:<t>`` an adapter-on-adapter,
        ``ocr`` the OCR expert, else the module's name (every client)."""
        task = task_of(name)
        if name.startswith(TASK_ADAPTERS):
            return f"task:{task}"
        if name.startswith(AOA):
            return f"foreign:{task}"
        if name.startswith(OCR_EXPERT):
            return "ocr"
        return name.split(".", 1)[0]

    # --- model / client ------------------------------------------------------------------------
    def build_model(self, backbone: Backbone, tasks: Sequence[TaskSpec], answer_side: str = "shared") -> ClientModel:
        if backbone_family(backbone) == "vlm":  # connectors as experts, LoRA on the LM as language side
            model = TaskExpertVLMModel(backbone, list(tasks), self.options, self.make_router, self.ocr_expert)
            if answer_side != FROZEN_TRUNK:  # frozen: the LM as pretrained, as the clip family's frozen trunk
                inject_lora(backbone, LoRASpec())
            return model
        return TaskExpertModel(backbone, list(tasks), self.options, self.make_router, self.ocr_expert, answer_side)

    def stage(self, ctx: ClientContext) -> int:
        """The client's stage: 1 on its first ``stage1_participations`` participations, then 2; at
        evaluation, the stage of its next participation (:func:`stage_of`)."""
        return stage_of(ctx.participations, self.options.stage1_participations)

    def prepare_client(self, model: TaskExpertModel, ctx: ClientContext) -> None:
        """The client's stage, its tasks and whether it holds the OCR expert."""
        model.bind(self.stage(ctx), ctx.info.tasks, self.holds_ocr_expert(ctx.info))

    def train_record(self, model: TaskExpertModel, ctx: ClientContext) -> dict[str, Any]:
        """The stage this client trained in this round."""
        return {"stage": self.stage(ctx)}

    def local_update(self, model: TaskExpertModel, ctx: ClientContext) -> None:
        stage = self.stage(ctx)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and self.trains(n, ctx.info, stage)]
        scales = [self.options.router_lr_scale if n.startswith(ROUTER) else 1.0 for n, _ in named]
        ctx.train(model, [p for _, p in named], phase=f"stage{stage}", lr_scales=scales)

    # --- communication -------------------------------------------------------------------------
    def download(self, server_state: Payload, client: ClientInfo) -> Payload:
        """All T task adapters, the client's own answer-side aggregates (plain mean where it has
        none), and whatever :meth:`sends` adds."""
        out: Payload = {}
        for name, tensor in server_state.items():
            if is_client_entry(name):
                continue
            if is_answer_side(name):
                if holds(client, name):
                    out[name] = server_state.get(client_key(client.client, name), tensor)
            elif self.sends(name, client):
                out[name] = tensor
        return out

    def upload(self, model: TaskExpertModel, client: ClientInfo) -> Payload:
        """The shared tensors the client trained in the stage it just ran: its answer side, and the
        members of its groups (:meth:`uploads`) that the stage trains (a stage-1 client sends no router)."""
        tags = self.tags(model)
        return {
            n: p.detach().clone()
            for n, p in model.named_parameters()
            if tags.get(n) == "shared"
            and (holds(client, n) if is_answer_side(n) else self.uploads(n, client))
            and self.trains(n, client, model.stage)
        }

    def aggregate(self, server_state: Payload, replies: Sequence[Reply]) -> Payload:
        return aggregate_task_experts(server_state, replies, self.options.nearest, self.group_of)
