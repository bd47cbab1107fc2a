"""The client models of the task-expert MoA methods (``pilot-ctmoa``, ``mmrouter-moa``) on each backbone family.

One set of modules and one stage logic (:class:`TaskExpertParts`), placed where the family lets them act
(docs/methods.md §5–7):

- ``clip``: the experts are bottleneck adapters on the frozen tower's patch tokens, each adding a residual
  delta (zero at initialisation) to the tokens the answer trunk reads (:class:`TaskExpertModel`);
- ``vlm``: the experts are connectors, 2-layer MLPs from the vision tower's features to the LM's width,
  each initialised from the pretrained connector, and their combination replaces it: the connector
  itself becomes the mixture, as Pilot's released code does on LLaVA (:class:`TaskExpertVLMModel`).

The methods' tags, groups, payloads and server step (:mod:`fedbench.adapters.task_experts`) are the same
on both.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fedbench.adapters.moa import Adapter, load_balance_loss, mixture, orthogonality_penalty, route, router_z_loss
from fedbench.api.backbone import Backbone
from fedbench.api.batch import Batch, Features
from fedbench.api.model import ClientModel
from fedbench.api.task import TaskSpec
from fedbench.api.vlm_model import VLMClientModel

if TYPE_CHECKING:
    from fedbench.adapters.task_experts import TaskExpertOptions
    from fedbench.api.vlm import VisionLanguageModel

STAGE1, STAGE2 = 1, 2
TASK_ADAPTERS, AOA, CLIENT_ADAPTER, ROUTER, OCR_EXPERT = (
    "task_adapters.",
    "aoa.",
    "client_adapter.",
    "router.",
    "ocr_expert.",
)


class TokenRouter(nn.Module):
    """Pilot's router: Linear(token_dim → n_experts, no bias) on each image token (on a VLM, each vision
    token before the connector)."""

    def __init__(self, token_dim: int, n_experts: int) -> None:
        super().__init__()
        self.image = nn.Linear(token_dim, n_experts, bias=False)

    def forward(self, f: Features, ocr_available: bool = True) -> torch.Tensor:
        """Logits [B, L, n_experts]."""
        return self.image(f.tokens)


# (token_dim, embed_dim, task names, ocr_expert) -> router; its logits: the tasks' experts, then the OCR expert
RouterFactory = Callable[[int, int, list[str], bool], nn.Module]


class TaskExpertParts:
    """The modules of a task-expert model and what each stage makes of them, on any family (a mixin of
    the family's client model, which says where the parts act and how they combine).

    Modules: a task expert per task (``task_adapters.<t>``), an adapter-on-adapter per task on that
    expert's output (``aoa.<t>``), the client expert (``client_adapter``), the OCR expert
    (``ocr_expert``, optional) and the router (``router``; none under reference routing).

    Stage 1: the row's task expert A_task(row), the client expert C, and on reading rows (OCR tokens
    present and a task that reads them, when the client holds the OCR expert) the OCR expert O; the
    orthogonality penalty between A's and C's outputs. Stage 2: Σ_e w_e·E_e with E_t = A_t for the
    client's own tasks, E_t = A_t + AoA_t(A_t) for the others, E_ocr = O, and w the router's per-token
    weights (``routing="oracle"``: w = 1 on the row's own task expert, computed as that expert alone, so
    the others are not in the graph; ``"uniform"``: w = 1/n over the n experts the client routes over),
    and C (frozen in stage 2).

    The harness builds one model before clients are known; :meth:`bind` tells it the stage, the
    client's tasks and whether it holds the OCR expert (the method's ``prepare_client``, which the
    harness calls whenever it loads a client, before training and before evaluation).
    """

    task_names: list[str]
    routing: torch.Tensor | None

    def build_parts(
        self,
        tasks: Sequence[TaskSpec],
        options: TaskExpertOptions,
        make_router: RouterFactory,
        ocr_expert: bool,
        new_expert: Callable[[], nn.Module],
        dims: tuple[int, int, int],
    ) -> None:
        """The modules; ``new_expert()`` makes one expert; ``dims``: (the experts' output width, the
        width of the tokens the router reads, the width of the text embeddings it reads)."""
        out_dim, token_dim, embed_dim = dims
        self.options = options
        self.expert_dim = out_dim
        self.task_adapters = nn.ModuleDict({t: new_expert() for t in self.task_names})
        self.aoa = nn.ModuleDict({t: Adapter(out_dim, options.aoa_bottleneck) for t in self.task_names})
        self.client_adapter = new_expert()
        self.ocr_expert = new_expert() if ocr_expert else None
        reads = torch.tensor([t.uses_ocr for t in tasks])  # per task id: does its head read OCR?
        self.register_buffer("reads_ocr", reads, persistent=False)
        self.expert_names = list(self.task_names) + (["ocr"] if ocr_expert else [])
        learned = options.routing == "learned"  # reference routing has no router (built last: same init)
        self.router = make_router(token_dim, embed_dim, list(self.task_names), ocr_expert) if learned else None
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

    def _per_row(self, x: torch.Tensor, groups: Iterator[tuple[torch.Tensor, Callable]]) -> torch.Tensor:
        out = x.new_zeros(*x.shape[:-1], self.expert_dim)
        for idx, module in groups:
            if len(idx):
                out = out.index_copy(0, idx, module(x[idx]))
        return out

    def _by_task(self, x: torch.Tensor, task_id: torch.Tensor, module_of: Callable[[str], Callable]) -> torch.Tensor:
        """Each row through its own task's module ``module_of(task)``; other modules stay out of the graph."""
        return self._per_row(
            x, ((torch.nonzero(task_id == i).flatten(), module_of(t)) for i, t in enumerate(self.task_names))
        )

    # --- the stages -----------------------------------------------------------------------------
    def stage1_parts(self, f: Features) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(A_task(row), C, O on the reading rows (zero elsewhere) or None, the reading rows' mask or None);
        sets the orthogonality penalty as the extra loss."""
        x = f.tokens
        client = self.client_adapter(x)
        self.routing = None
        task = self._by_task(x, f.task_id, self.task_adapters.__getitem__)
        self._aux = self.options.orth_weight * orthogonality_penalty(task, client)
        if self.ocr_expert is None or not self.ocr_available:
            return task, client, None, None
        reading = f.ocr_mask.any(1) & self.reads_ocr[f.task_id]  # OCR text + a task whose head reads it
        ocr = self._per_row(x, iter([(torch.nonzero(reading).flatten(), self.ocr_expert)]))
        return task, client, ocr, reading

    def stage2_parts(self, f: Features) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ_e w_e·E_e, C); sets the token-averaged routing weights and the router's losses."""
        x = f.tokens
        client = self.client_adapter(x)
        n = self.n_available()
        self._aux = 0.0
        if self.options.routing == "oracle":  # the row's own task expert with weight 1, alone in the graph
            weights = F.one_hot(f.task_id, n).to(x.dtype).unsqueeze(1)  # [B, 1, n]
            delta = self._by_task(x, f.task_id, lambda t: functools.partial(self.task_expert, t))
        else:
            if self.router is None:  # uniform: equal weights over the experts this client routes over
                weights = x.new_full((len(x), 1, n), 1.0 / n)
            else:
                logits = self.router(f, self.ocr_available)[..., :n]  # [B, L or 1, n]
                weights = route(logits, self.options.top_k)
                o = self.options
                self._aux = o.balance_weight * load_balance_loss(weights) + o.z_weight * router_z_loss(logits)
            experts = [self.task_expert(t, x) for t in self.task_names]
            if n > len(self.task_names):
                experts.append(self.ocr_expert(x))
            delta = mixture(experts, weights.expand(*x.shape[:2], n))
        self.routing = F.pad(weights.mean(1), (0, len(self.expert_names) - n))  # token-averaged [B, E]
        return delta, client

    def extra_loss(self) -> torch.Tensor | float:
        return self._aux


class TaskExpertModel(TaskExpertParts, ClientModel):
    """``clip`` family: frozen towers -> task experts (+ client adapter) on the patch tokens -> task heads.
    Every expert is a bottleneck :class:`~fedbench.adapters.moa.Adapter` whose delta adds to the tokens:
    stage 1 tokens' = tokens + A_task(row) + C [+ O on reading rows]; stage 2 tokens' = tokens + Σ_e w_e·E_e + C."""

    def __init__(
        self,
        backbone: Backbone,
        tasks: list[TaskSpec],
        options: TaskExpertOptions,
        make_router: RouterFactory,
        ocr_expert: bool = False,
        answer_side: str = "shared",
    ) -> None:
        super().__init__(backbone, tasks, answer_side)
        dt, de = backbone.token_dim, backbone.embed_dim
        self.build_parts(tasks, options, make_router, ocr_expert, lambda: Adapter(dt, options.bottleneck), (dt, dt, de))

    def adapt(self, f: Features) -> Features:
        if self.stage == STAGE1:
            task, client, ocr, _ = self.stage1_parts(f)
            delta = task + client
            if ocr is not None:
                delta = delta + ocr
            return replace(f, tokens=f.tokens + delta)
        delta, client = self.stage2_parts(f)
        return replace(f, tokens=f.tokens + delta + client)


class TaskExpertVLMModel(TaskExpertParts, VLMClientModel):
    """``vlm`` family: the connector becomes the mixture. Every expert (task, client, OCR) is a connector
    initialised from the pretrained one (which itself stays frozen and unused); the router reads the
    vision tokens before projection (and, for ``mmrouter-moa``, the LM's frozen input embeddings of the
    question and the OCR text, :meth:`~fedbench.api.vlm_model.VLMClientModel.features`); the AoAs act on
    a foreign connector's output, in the LM's width.

    The parts are whole connectors, each ≈ the pretrained one at initialisation, so they are averaged
    (harness choice, so the LM starts from the input it was pretrained on; Pilot's ``two_mlp`` sums
    them): stage 1 (A_task + C) / 2, or (A_task + C + O) / 3 on reading rows; stage 2 (Σ_e w_e·E_e + C) / 2,
    with C in the stage-2 sum as on the ``clip`` family (one rule on both families; Pilot's released code
    keeps it out of the stage-2 sum). The orthogonality penalty applies in stage 1, as on ``clip``."""

    def __init__(
        self,
        backbone: VisionLanguageModel,
        tasks: list[TaskSpec],
        options: TaskExpertOptions,
        make_router: RouterFactory,
        ocr_expert: bool = False,
    ) -> None:
        super().__init__(backbone, tasks, train_connector=False)
        pretrained = backbone.connector

        def new_expert() -> nn.Module:
            return copy.deepcopy(pretrained).requires_grad_(True)

        dims = (backbone.lm_dim, backbone.vision_dim, backbone.lm_dim)
        self.build_parts(tasks, options, make_router, ocr_expert, new_expert, dims)

    def connect(self, vision: torch.Tensor, batch: Batch) -> torch.Tensor:
        f = self.features(vision, batch)
        if self.stage == STAGE1:
            task, client, ocr, reading = self.stage1_parts(f)
            if ocr is None:
                return (task + client) / 2
            return (task + client + ocr) / (2 + reading.to(task.dtype)).view(-1, 1, 1)
        delta, client = self.stage2_parts(f)
        return (delta + client) / 2
