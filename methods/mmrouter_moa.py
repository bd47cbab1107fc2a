"""The multimodal-router MoA (docs/methods.md §6): Pilot's CT-MoA with a router that also sees the
question, the task and the OCR text, plus an OCR expert, with modality-aware aggregation.

The method's description, harness choices included, is the class docstring (shown by
``fedbench describe``); the shared machinery is :mod:`fedbench.adapters.task_experts`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedbench.adapters.expert_models import (
    AOA,
    CLIENT_ADAPTER,
    OCR_EXPERT,
    ROUTER,
    STAGE2,
    TASK_ADAPTERS,
    TaskExpertModel,
)
from fedbench.adapters.task_experts import TaskExpertOptions, TaskExpertsMethod, in_group
from fedbench.api.batch import Features
from fedbench.api.method import ClientInfo, Tag, register_method

if TYPE_CHECKING:
    from fedbench.api.context import ClientContext

ROUTER_INPUTS = ("image", "text", "task", "ocr")
ROUTER_SCOPES = ("global", "local")
ROUTER_VIEWS = ("image", "prompt")
TO_OCR = "to_ocr"  # a router term's OCR-expert column (its own parameter: OCR clients only)


@dataclass(frozen=True)
class MMRouterOptions(TaskExpertOptions):
    """Task-expert options plus the router's inputs and scope and the OCR expert."""

    router_inputs: tuple[str, ...] = ROUTER_INPUTS
    router_scope: Literal["global", "local"] = "global"  # local: the router never leaves (as in Pilot)
    ocr_expert: bool = True
    ocr_frozen_on_non_ocr: bool = False  # true: clients without OCR download the OCR parts, frozen
    router_view: Literal["image", "prompt"] = "image"  # prompt: the image term reads the prompt view

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [x for x in self.router_inputs if x not in ROUTER_INPUTS]
        if not self.router_inputs or bad or len(set(self.router_inputs)) != len(self.router_inputs):
            raise ValueError(
                f"router_inputs = {self.router_inputs} must be a non-empty subset of {'+'.join(ROUTER_INPUTS)}"
            )
        if self.router_scope not in ROUTER_SCOPES:
            raise ValueError(f"router_scope = {self.router_scope!r} must be one of {', '.join(ROUTER_SCOPES)}")
        if self.router_view not in ROUTER_VIEWS:
            raise ValueError(f"router_view = {self.router_view!r} must be one of {', '.join(ROUTER_VIEWS)}")
        if self.router_view == "prompt" and ("image" not in self.router_inputs or self.routing != "learned"):
            raise ValueError("router_view = 'prompt' needs routing=learned and image in router_inputs")


class RouterTerm(nn.Module):
    """One term of the router's logits, cut into its aggregation units: ``weight`` gives the T task
    experts' logits and ``to_ocr`` (only with an OCR expert) the OCR expert's, each its own parameter,
    so the OCR column can be averaged over the OCR clients alone. ``in_dim`` None: a constant term
    (the null logits, one task's row of the task table). ``linear_init``: nn.Linear's default init
    over the whole E × in matrix (without OCR expert exactly ``nn.Linear(in_dim, T, bias=False)``:
    same draws, same values); else zeros."""

    def __init__(self, in_dim: int | None, n_tasks: int, ocr_expert: bool, linear_init: bool = False) -> None:
        super().__init__()
        full = torch.zeros((n_tasks + ocr_expert, *((in_dim,) if in_dim else ())))
        if linear_init:
            nn.init.kaiming_uniform_(full, a=math.sqrt(5))
        self.weight = nn.Parameter(full[:n_tasks].clone())
        self.to_ocr = nn.Parameter(full[n_tasks:].clone()) if ocr_expert else None

    def matrix(self) -> torch.Tensor:
        """All E outputs' weights: the task experts', then the OCR expert's."""
        return self.weight if self.to_ocr is None else torch.cat([self.weight, self.to_ocr])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.matrix())


class MultimodalRouter(nn.Module):
    """Per-token logits = W_img·token + W_text·question + W_task[task] + W_ocr·pooled OCR.

    ``image`` is exactly Pilot's router (``router.image.weight``, Linear(token_dim → T, no bias),
    default init) when there is no OCR expert; the other terms are zero-initialised, so the router
    starts as Pilot's. The pooled terms are per row, broadcast over the tokens; without ``image``
    the logits are constant over the tokens ([B,1,E]). The task table is one parameter per task
    (``router.task.<t>.*``, trained and averaged by that task's holders). OCR: the mean of the row's
    present OCR token embeddings through W_ocr; a row without OCR tokens, or any row of a client
    without the OCR branch, gets the learned null logits (``router.null.*``) instead. Every term's
    OCR-expert column is its own parameter (``*.to_ocr``).
    """

    def __init__(
        self, token_dim: int, embed_dim: int, task_names: list[str], ocr_expert: bool, inputs: tuple[str, ...]
    ) -> None:
        super().__init__()
        self.inputs = tuple(inputs)
        self.view: Callable[[torch.Tensor], torch.Tensor] | None = None  # table rows -> tokens the image term reads
        n = len(task_names)
        if "image" in inputs:
            self.image = RouterTerm(token_dim, n, ocr_expert, linear_init=True)
        if "text" in inputs:
            self.text = RouterTerm(embed_dim, n, ocr_expert)
        if "task" in inputs:
            self.task = nn.ModuleDict({t: RouterTerm(None, n, ocr_expert) for t in task_names})
        if "ocr" in inputs:
            self.ocr = RouterTerm(embed_dim, n, ocr_expert)
            self.null = RouterTerm(None, n, ocr_expert)

    def task_table(self) -> torch.Tensor:
        """[T, E]: row t is task t's logits."""
        return torch.stack([term.matrix() for term in self.task.values()])

    def row_logits(self, f: Features, ocr_available: bool) -> torch.Tensor | None:
        terms = []
        if "text" in self.inputs:
            terms.append(self.text(f.question))
        if "task" in self.inputs:
            terms.append(self.task_table().index_select(0, f.task_id))  # index_select: a reproducible backward
        if "ocr" in self.inputs:
            null = self.null.matrix().expand(len(f.task_id), -1)
            if ocr_available:
                mask = f.ocr_mask.unsqueeze(-1).to(f.ocr.dtype)
                pooled = (f.ocr * mask).sum(1) / mask.sum(1).clamp_min(1.0)
                null = torch.where(f.ocr_mask.any(1, keepdim=True), self.ocr(pooled), null)
            terms.append(null)
        return torch.stack(terms).sum(0) if terms else None

    def forward(self, f: Features, ocr_available: bool = True) -> torch.Tensor:
        row = self.row_logits(f, ocr_available)
        if "image" not in self.inputs:
            return row.unsqueeze(1)
        logits = self.image(f.tokens if self.view is None else self.view(f.row_index))
        return logits if row is None else logits + row.unsqueeze(1)


@register_method("mmrouter-moa")
class MMRouterMoA(TaskExpertsMethod):
    """Multimodal-router MoA (the benchmark's method; builds on https://arxiv.org/abs/2501.13985, docs/methods.md §6).

    - Experts as in ``pilot-ctmoa``: one task adapter per task (shared, averaged within its task;
      all T go down to every client), foreign ones frozen in stage 2 with a local adapter-on-
      adapter; plus (``ocr_expert``, default true) an **OCR expert** Adapter, trained and averaged
      only over the clients that have OCR.
    - Router: per-token logits = W_img·token (Pilot's router) + W_text·pooled question +
      W_task[task] + W_ocr·pooled OCR tokens (a learned null where a row or client has no OCR);
      ``router_inputs`` picks any non-empty subset of image, text, task, ocr (without ``image`` the
      logits are constant over the tokens). Softmax, dense or ``top_k`` (>= 2, as in ``pilot-ctmoa``);
      0.1 × load balance, 0.01 × z-loss. ``router_scope`` = ``global`` (default: shared, the server
      holds the routing decision every client uses) or ``local`` (tagged local, never sent: Pilot's
      local router).
    - Server, modality-aware, each router entry averaged over exactly the clients that train it
      (a client uploads only what it trained: no router entry from a client in stage 1): the image,
      text and null logits of the task experts over all sampled clients; task t's row of the task
      table over the clients holding t; the OCR branch, the OCR expert and every term's OCR-expert
      column (``router.*.to_ocr``, its own parameter) over the OCR clients only (task t's OCR entry
      over the OCR clients holding t); task adapters within their task. The server sends a task's
      row only to a client asking for that task (at evaluation, every task). A client without OCR
      neither trains, uploads nor downloads the OCR parts (``ocr_frozen_on_non_ocr=true``: it
      downloads them and holds them frozen, routing over the frozen OCR expert too) and otherwise
      routes over the task experts only.
    - Local: the client adapter and the AoAs. Answer trunk: Pilot's per-client distance-weighted
      rule; task outputs: mean over their holders (kept so that the ablation against
      ``pilot-ctmoa`` isolates the router).
    - Stages as in Pilot, per client: a client's first ``stage1_participations`` (1) participations
      are stage 1 (the row's task adapter + the client adapter, orthogonality penalty, and, on reading
      rows — OCR text present and a task whose head reads it — the OCR expert), later ones stage 2
      (routing). A client is evaluated in the stage its next participation would run (stage 2 once
      it has done its stage-1 participations, stage 1 before). Train records carry ``stage``.
    - Reference routing (``routing``): ``learned`` (default); ``oracle`` (no router: each row to its
      own task's adapter with weight 1, the OCR expert unused in stage 2; the upper bound of task-aware
      routing); ``uniform`` (no router: equal weights over the client's experts, OCR expert included
      where the client holds it). No router means none is built, trained or sent, and no load-balance
      or z-loss; usage rows record the weights used. Usage rows: task names + "ocr".
    - The ablation ladder, one factor per step (preset entries):
      (a) ``pilot-ctmoa``;
      (b) ``router_inputs=["image"], router_scope="local", ocr_expert=false``: bit-identical records
      to (a); (c) as (b) with ``router_scope="global"``; (d) ``router_inputs=["image","text"]``;
      (e) + ``"task"``; (f) + ``"ocr"``; (g) + ``ocr_expert=true``: the defaults, the full method.
      Bounds: the full method with ``routing="oracle"`` or ``routing="uniform"``.
      Beside the ladder, (h) the cue through pixels alone: (b) with ``router_view="prompt"``, whose
      image-only local router reads the frozen tower's tokens of the row's **prompt view** (the
      task symbol and as much of the question as fits legibly drawn in a band around a shrunken
      copy of the scene, same pixel size: :mod:`fedbench.staging.prompt_view`) while the experts still act
      on the plain image's tokens.
    - OCR text rides on every row of a client with OCR (the suite's modality axis), so the
      router's OCR branch sees the image's words on every task, not only on OCR-VQA rows.

    - Where it acts, per backbone family: as ``pilot-ctmoa`` (``clip``: adapters on the patch tokens,
      the answer trunk as language side; ``vlm``: connector experts initialised from the pretrained
      connector, the OCR expert a connector too, LoRA on the LM as language side). On ``vlm`` the
      router's image term reads the vision tokens before projection, its text and OCR terms the LM's
      frozen input embeddings of the question (mean-pooled) and of the OCR text's first 8 tokens (the
      OCR text is also in every prompt, for every row alike: the router's OCR input is an extra cue,
      not extra information for the LM); row (h) reads the VLM tower's tokens of the prompt view.

    Simplifications / harness choices:
    - As in ``pilot-ctmoa`` (on ``clip`` no LLM: the answer trunk in the LLM's place for the
      per-client aggregation across all clients; L2 distances, 1/d weights; on ``vlm`` the parts are
      averaged connectors: stage 1 (A_task + C) / 2, or (A_task + C + O) / 3 on reading rows).
    - The null vector lives in logit space (a learned E-vector replacing W_ocr·pooled): the same
      functions as a null input through W_ocr, but it needs no OCR branch, so clients without OCR
      train its task-expert logits too (averaged over all clients). W_task·e(task) is one E-vector
      per task (a T × E table).
    - The text, task and OCR terms start at zero (the router starts as Pilot's).
    - The OCR expert of a client without OCR (default) gets no routing weight (its logit is
      dropped); the model learns which client it serves from ``prepare_client``.
    """

    Options = MMRouterOptions
    paper = "https://arxiv.org/abs/2501.13985"

    def __init__(self, options: MMRouterOptions | None = None) -> None:
        super().__init__(options)
        self.ocr_expert = self.options.ocr_expert

    def make_router(self, token_dim: int, embed_dim: int, task_names: list[str], ocr_expert: bool) -> nn.Module:
        return MultimodalRouter(token_dim, embed_dim, task_names, ocr_expert, self.options.router_inputs)

    def prepare_client(self, model: TaskExpertModel, ctx: ClientContext) -> None:
        """As for every task-expert method, plus the prompt view the router reads (``router_view``)."""
        super().prepare_client(model, ctx)
        if self.options.router_view == "prompt":
            model.router.view = ctx.prompt_tokens()

    def tag(self, name: str) -> Tag:
        if name.startswith((CLIENT_ADAPTER, AOA)):
            return "local"
        if name.startswith(ROUTER):
            return "shared" if self.options.router_scope == "global" else "local"
        return "shared"

    def holds_ocr_expert(self, client: ClientInfo) -> bool:
        return client.has_ocr or self.options.ocr_frozen_on_non_ocr

    def group_of(self, name: str) -> str:
        """As in Pilot for the experts (``task:<t>``, ``ocr``); a router entry by who trains it:
        ``ocr`` the OCR branch and every OCR-expert column (``ocr+task:<t>`` task t's), ``task:<t>``
        task t's row, ``router:<term>`` the other terms (every client)."""
        if not name.startswith(ROUTER):
            return super().group_of(name)
        _, term, *rest = name.split(".")
        parts = ["ocr"] if term == "ocr" or rest[-1] == TO_OCR else []
        if term == "task":
            parts.append(f"task:{rest[0]}")
        return "+".join(parts) or f"router:{term}"

    def sends(self, name: str, client: ClientInfo) -> bool:
        """Task adapters to every client; OCR parts to the clients holding them; router entries of a
        task to the clients asking for that task, the other router entries to all."""
        group = self.group_of(name).split("+")
        if "ocr" in group and not self.holds_ocr_expert(client):
            return False
        if name.startswith(ROUTER):
            return all(in_group(part, client) for part in group if part.startswith("task:"))
        return name.startswith((TASK_ADAPTERS, OCR_EXPERT))

    def trains(self, name: str, client: ClientInfo, stage: int) -> bool:
        if name.startswith(ROUTER):
            return stage == STAGE2 and in_group(self.group_of(name), client)
        return super().trains(name, client, stage)
