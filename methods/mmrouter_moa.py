"""The multimodal-router MoA (METHODS.md §6): Pilot's CT-MoA with a router that also sees the
question, the task and the OCR text, plus an OCR expert, with modality-aware aggregation.

The method's description, harness choices included, is the class docstring (shown by
``fedbench describe``); the shared machinery is :mod:`fedbench.task_experts`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedbench.method import ClientInfo, Tag, register_method
from fedbench.model import Features
from fedbench.task_experts import (
    AOA,
    CLIENT_ADAPTER,
    OCR_EXPERT,
    ROUTER,
    STAGE2,
    TASK_ADAPTERS,
    TaskExpertOptions,
    TaskExpertsMethod,
    task_of,
)

ROUTER_INPUTS = ("image", "text", "task", "ocr")
OCR_BRANCH = f"{ROUTER}ocr."  # the router's OCR branch: OCR clients only


@dataclass(frozen=True)
class MMRouterOptions(TaskExpertOptions):
    """Task-expert options plus the router's inputs and the OCR expert."""

    router_inputs: tuple[str, ...] = ROUTER_INPUTS
    ocr_expert: bool = True
    ocr_frozen_on_non_ocr: bool = False  # true: clients without OCR download the OCR parts, frozen

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [x for x in self.router_inputs if x not in ROUTER_INPUTS]
        if not self.router_inputs or bad or len(set(self.router_inputs)) != len(self.router_inputs):
            raise ValueError(
                f"router_inputs = {self.router_inputs} must be a non-empty subset of {'+'.join(ROUTER_INPUTS)}"
            )


class MultimodalRouter(nn.Module):
    """Per-token logits = W_img·token + W_text·question + W_task·e(task) + W_ocr·pooled OCR.

    ``image`` is exactly Pilot's router (Linear(token_dim → E, no bias), default init); the other
    branches are zero-initialised, so the router starts as Pilot's. The pooled terms are per row,
    broadcast over the tokens; without ``image`` the logits are constant over the tokens ([B,1,E]).
    OCR: the mean of the row's present OCR token embeddings through W_ocr; a row without OCR
    tokens, or any row of a client without the OCR branch, gets the learned null logits instead.
    """

    def __init__(self, token_dim: int, embed_dim: int, n_tasks: int, n_experts: int, inputs: tuple[str, ...]) -> None:
        super().__init__()
        self.inputs = tuple(inputs)
        if "image" in inputs:
            self.image = nn.Linear(token_dim, n_experts, bias=False)
        if "text" in inputs:
            self.text = nn.Linear(embed_dim, n_experts, bias=False)
            nn.init.zeros_(self.text.weight)
        if "task" in inputs:
            self.task = nn.Embedding(n_tasks, n_experts)  # W_task·e(task) collapsed into one table
            nn.init.zeros_(self.task.weight)
        if "ocr" in inputs:
            self.ocr = nn.Linear(embed_dim, n_experts, bias=False)
            nn.init.zeros_(self.ocr.weight)
            self.null = nn.Parameter(torch.zeros(n_experts))

    def row_logits(self, f: Features, ocr_available: bool) -> torch.Tensor | None:
        terms = []
        if "text" in self.inputs:
            terms.append(self.text(f.question))
        if "task" in self.inputs:
            terms.append(self.task(f.task_id))
        if "ocr" in self.inputs:
            null = self.null.expand(len(f.task_id), -1)
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
        logits = self.image(f.tokens)
        return logits if row is None else logits + row.unsqueeze(1)


@register_method("mmrouter-moa")
class MMRouterMoA(TaskExpertsMethod):
    """Multimodal-router MoA (the benchmark's method; builds on https://arxiv.org/abs/2501.13985, METHODS.md §6).

    - Experts as in ``pilot-ctmoa``: one task adapter per task (shared, averaged within its task;
      all T go down to every client), foreign ones frozen in stage 2 with a local adapter-on-
      adapter; plus (``ocr_expert``, default true) an **OCR expert** Adapter, trained and averaged
      only over the clients that have OCR.
    - Router (shared, global): per-token logits = W_img·token (Pilot's router) + W_text·pooled
      question + W_task·task-embedding + W_ocr·pooled OCR tokens (a learned null where a row or
      client has no OCR); ``router_inputs`` picks any non-empty subset of image, text, task, ocr
      (``image`` alone with ``ocr_expert=false`` is Pilot's routing; without ``image`` the logits
      are constant over the tokens). Softmax, dense or ``top_k``; 0.1 × load balance, 0.01 × z-loss.
    - Server, modality-aware: task adapters within their task; the OCR expert and the router's
      OCR branch over the OCR clients only; each other router branch (image, text, task, null
      logits) its own group over all sampled clients. A client without OCR neither trains,
      uploads nor downloads the OCR expert and OCR branch (``ocr_frozen_on_non_ocr=true``: it
      downloads them and holds them frozen) and routes over the task experts only.
    - Local: the client adapter and the AoAs. Heads: Pilot's per-client distance-weighted rule
      (kept so that the ablation against ``pilot-ctmoa`` isolates the router).
    - Stages as in Pilot: stage 1 (rounds < ``stage1_rounds``, default the first 20%) trains the
      row's task adapter + the client adapter (orthogonality penalty) and, on reading rows (OCR
      text present and a task whose head reads it), the OCR expert; stage 2 routes. Usage rows:
      task names + "ocr".
    - OCR text rides on every row of a client with OCR (the suite's modality axis), so the
      router's OCR branch sees the image's words on every task, not only on OCR-VQA rows.

    Simplifications / harness choices:
    - As in ``pilot-ctmoa`` (no LLM: experts on the frozen CLIP patch tokens, heads in the LLM's
      place for the per-client aggregation; per-task L2 distances, 1/d weights).
    - The null vector lives in logit space (a learned E-vector replacing W_ocr·pooled): the same
      functions as a null input through W_ocr, but it needs no OCR branch, so clients without OCR
      train it too and it is averaged over all clients. W_task·e(task) is one T × E table.
    - The text, task and OCR branches start at zero (the router starts as Pilot's).
    - The OCR expert of a client without OCR (default) gets no routing weight (its logit is
      dropped); the model learns which client it serves from ``prepare_client``.
    """

    Options = MMRouterOptions
    paper = "https://arxiv.org/abs/2501.13985"

    def __init__(self, options: MMRouterOptions | None = None) -> None:
        super().__init__(options)
        self.ocr_expert = self.options.ocr_expert

    def make_router(self, token_dim: int, embed_dim: int, n_tasks: int, n_experts: int) -> nn.Module:
        return MultimodalRouter(token_dim, embed_dim, n_tasks, n_experts, self.options.router_inputs)

    def tag(self, name: str) -> Tag:
        return "local" if name.startswith((CLIENT_ADAPTER, AOA)) else "shared"

    @staticmethod
    def is_ocr(name: str) -> bool:
        return name.startswith((OCR_EXPERT, OCR_BRANCH))

    def holds_ocr_expert(self, client: ClientInfo) -> bool:
        return client.has_ocr or self.options.ocr_frozen_on_non_ocr

    def sends(self, name: str, client: ClientInfo) -> bool:
        if self.is_ocr(name):
            return self.holds_ocr_expert(client)
        return name.startswith((TASK_ADAPTERS, ROUTER))

    def uploads(self, name: str, client: ClientInfo) -> bool:
        if self.is_ocr(name):
            return client.has_ocr
        if name.startswith(ROUTER):
            return True
        return name.startswith(TASK_ADAPTERS) and task_of(name) in client.tasks

    def trains(self, name: str, client: ClientInfo, stage: int) -> bool:
        if name.startswith(OCR_BRANCH):
            return stage == STAGE2 and client.has_ocr
        return super().trains(name, client, stage)

    def group_of(self, name: str) -> str:
        """task:<t> per task adapter; ``ocr`` for the OCR expert and OCR branch; router:<branch>."""
        if self.is_ocr(name):
            return "ocr"
        if name.startswith(ROUTER):
            return "router:" + name.split(".")[1]
        return super().group_of(name)
