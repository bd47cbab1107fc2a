"""The client model skeleton every method builds on: frozen towers -> (method's adapters) -> answer side.

The answer side follows docs/design.md §4. It plays the part of a multimodal LLM's language model,
which answers every task: by default one **shared answer trunk** (``trunk.*``: question-conditioned
pooling of the image tokens, the OCR read-out and a fusion MLP) used by every task, then a thin
output per task (``heads.<task>.*``): answer logits for classification / VQA / OCR-VQA (the usual
classifier formulation of VQA) or a box for grounding. The protocol option ``answer_side =
"per_task"`` gives every task its own full head instead (pooling, OCR read-out for tasks that read
it, MLP), applied to every method alike. Pooling uses an attention query made from the question,
so "what colour is the circle?" and "the red circle" can look at the object they name.
``answer_side = "frozen_trunk"`` keeps the trunk frozen at its seeded init (a frozen language model,
as an MLLM's is under PEFT): only the thin outputs train on the answer side, so what a task needs
must be learned before it, in the adapters, experts or LoRA, which makes task specialisation there
matter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedbench.api.answer_side import ANSWER_SIDES
from fedbench.api.backbone import Backbone
from fedbench.api.batch import OCR_TOKENS, Batch, Features, encode_per_image, sub_batch
from fedbench.api.family import TaskFamily, family_of
from fedbench.api.task import TaskSpec
from fedbench.utils.precision import device_index


class QueryPool(nn.Module):
    """Question-conditioned attention over patch tokens (one head, scaled dot product)."""

    def __init__(self, token_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(embed_dim, token_dim)
        self.norm = nn.LayerNorm(token_dim)

    def forward(self, tokens: torch.Tensor, question: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.norm(tokens)
        scores = torch.einsum("bld,bd->bl", tokens, self.query(question)) / math.sqrt(tokens.shape[-1])
        weights = scores.softmax(-1)
        return torch.einsum("bl,bld->bd", weights, tokens), weights


class OCRPointer(nn.Module):
    """Attention over the OCR tokens (M4C-style: OCR tokens as a set with reading-order slots).

    The query is made from the question and the image; a row without OCR tokens gets a learned
    null vector instead, so clients without OCR train the same head.
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.slot = nn.Parameter(torch.zeros(OCR_TOKENS, embed_dim))
        self.query = nn.Linear(2 * embed_dim, embed_dim)
        self.null = nn.Parameter(torch.zeros(embed_dim))

    def forward(self, f: Features) -> torch.Tensor:
        keys = f.ocr + self.slot[: f.ocr.shape[1]]
        scores = torch.einsum("bke,be->bk", keys, self.query(torch.cat([f.question, f.image], -1)))
        scores = (scores / math.sqrt(keys.shape[-1])).masked_fill(~f.ocr_mask, -1e9)
        read = torch.einsum("bk,bke->be", scores.softmax(-1), f.ocr)
        return torch.where(f.ocr_mask.any(1, keepdim=True), read, self.null.expand_as(read))


TRUNK, HEADS = "trunk.", "heads."


LANGUAGE_MODEL = ".language_model."  # in the names of a generative VLM's LM tensors (LLaVA's layout)


def is_answer_side(name: str) -> bool:
    """Whether parameter ``name`` belongs to the answer side: the shared trunk or a task's head, or on a
    generative VLM the LM that writes the answers (its trainable tensors: LoRA)."""
    return name.startswith((TRUNK, HEADS)) or LANGUAGE_MODEL in name


@dataclass
class Hidden:
    """What the shared trunk hands the thin task outputs."""

    state: torch.Tensor  # [B,H] fused representation
    attention: torch.Tensor  # [B,L] question-conditioned attention over the patch tokens

    def select(self, idx: torch.Tensor) -> Hidden:
        return Hidden(self.state[idx], self.attention[idx])


class FamilyRule:
    """Loss and correctness of a head: its task family's (:mod:`fedbench.api.family`), never a branch here."""

    family: TaskFamily

    def loss(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.family.loss(out, batch)

    def correct(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.family.correct(out, batch)


def attention_box(weights: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Box [x0,y0,x1,y1] in [0,1]: the attention centroid over the patch grid, nudged by
    ``out[:, :2]`` (at most 0.1), with width and height ``sigmoid(out[:, 2:])``."""
    side = math.isqrt(weights.shape[-1])
    centres = (torch.arange(side, device=weights.device, dtype=weights.dtype) + 0.5) / side
    w2d = weights[:, : side * side].view(-1, side, side)
    cx, cy = (w2d.sum(1) * centres).sum(-1), (w2d.sum(2) * centres).sum(-1)
    cx = cx + 0.1 * torch.tanh(out[:, 0])
    cy = cy + 0.1 * torch.tanh(out[:, 1])
    w, h = torch.sigmoid(out[:, 2]), torch.sigmoid(out[:, 3])
    box = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    return box.clamp(0.0, 1.0)


class AnswerTrunk(nn.Module):
    """The shared answer trunk: [image, question, question-pooled tokens, OCR read-out] -> fusion MLP.

    Every task's rows go through it (the OCR read-out is the learned null where a row has no OCR
    tokens), as every prompt goes through an MLLM's language model.
    """

    def __init__(self, token_dim: int, embed_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.pool = QueryPool(token_dim, embed_dim)
        self.ocr = OCRPointer(embed_dim)
        in_dim = 3 * embed_dim + token_dim
        self.mlp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU())
        self.hidden = hidden

    def forward(self, f: Features) -> Hidden:
        pooled, weights = self.pool(f.tokens, f.question)
        return Hidden(self.mlp(torch.cat([f.image, f.question, pooled, self.ocr(f)], -1)), weights)


class AnswerOutput(FamilyRule, nn.Module):
    """Thin answer output on the trunk: Linear(hidden -> answers)."""

    def __init__(self, spec: TaskSpec, hidden: int, family: TaskFamily) -> None:
        super().__init__()
        self.family = family
        self.logits = nn.Linear(hidden, spec.num_answers)

    def forward(self, h: Hidden) -> torch.Tensor:
        return self.logits(h.state)


class BoxOutput(FamilyRule, nn.Module):
    """Thin box output on the trunk: the trunk's attention centroid + Linear(hidden -> 4)."""

    def __init__(self, spec: TaskSpec, hidden: int, family: TaskFamily) -> None:
        super().__init__()
        self.family = family
        self.box = nn.Linear(hidden, 4)

    def forward(self, h: Hidden) -> torch.Tensor:
        return attention_box(h.attention, self.box(h.state))


class AnswerHead(FamilyRule, nn.Module):
    """Per-task answer classifier on [image, question, question-pooled tokens, (OCR read-out)]."""

    def __init__(self, spec: TaskSpec, token_dim: int, embed_dim: int, family: TaskFamily, hidden: int = 256) -> None:
        super().__init__()
        self.family = family
        self.pool = QueryPool(token_dim, embed_dim)
        self.ocr = OCRPointer(embed_dim) if spec.uses_ocr else None
        in_dim = 2 * embed_dim + token_dim + (embed_dim if spec.uses_ocr else 0)
        self.mlp = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, spec.num_answers)
        )

    def forward(self, f: Features) -> torch.Tensor:
        pooled, _ = self.pool(f.tokens, f.question)
        parts = [f.image, f.question, pooled]
        if self.ocr is not None:
            parts.append(self.ocr(f))
        return self.mlp(torch.cat(parts, -1))


class BoxHead(FamilyRule, nn.Module):
    """Per-task referring-expression box regressor: attention centroid over patches + predicted size."""

    def __init__(self, spec: TaskSpec, token_dim: int, embed_dim: int, family: TaskFamily, hidden: int = 256) -> None:
        super().__init__()
        self.family = family
        self.pool = QueryPool(token_dim, embed_dim)
        self.mlp = nn.Sequential(
            nn.LayerNorm(token_dim + embed_dim),
            nn.Linear(token_dim + embed_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, 4),
        )

    def forward(self, f: Features) -> torch.Tensor:
        pooled, weights = self.pool(f.tokens, f.question)
        return attention_box(weights, self.mlp(torch.cat([pooled, f.question], -1)))


def make_trunk(answer_side: str, token_dim: int, embed_dim: int) -> AnswerTrunk | None:
    """The shared trunk (``answer_side = "shared"``; ``"frozen_trunk"``: frozen at its seeded init, the
    same on every client, so task adaptation must happen before it), or None when every task has a
    full head (``"per_task"``)."""
    if answer_side not in ANSWER_SIDES:
        raise ValueError(f"answer_side = {answer_side!r} is invalid; choose one of: {', '.join(ANSWER_SIDES)}")
    if answer_side == "per_task":
        return None
    return AnswerTrunk(token_dim, embed_dim).requires_grad_(answer_side == "shared")


def make_heads(tasks: Sequence[TaskSpec], trunk: AnswerTrunk | None, token_dim: int, embed_dim: int) -> nn.ModuleDict:
    """One head per task, made by its family: a thin output on ``trunk``, or (no trunk) a full per-task head."""
    if trunk is not None:
        return nn.ModuleDict({t.name: family_of(t).output(t, trunk.hidden) for t in tasks})
    return nn.ModuleDict({t.name: family_of(t).head(t, token_dim, embed_dim) for t in tasks})


def answer_input(trunk: AnswerTrunk | None, features: Features) -> Features | Hidden:
    """What the heads read: the trunk's output, or the features themselves (per-task heads)."""
    return features if trunk is None else trunk(features)


class ClientModel(nn.Module):
    """Frozen backbone + answer side (trunk + task heads); methods add modules and override :meth:`adapt`.

    Every trainable parameter is tagged by the method as shared or local; frozen ones
    (``requires_grad=False``) are neither and never travel.
    """

    def __init__(self, backbone: Backbone, tasks: list[TaskSpec], answer_side: str = "shared") -> None:
        super().__init__()
        self.backbone = backbone
        self.tasks = list(tasks)
        self.task_names = [t.name for t in tasks]
        self.routing: torch.Tensor | None = None  # [B, E] routing weights of the last forward, if any
        self.expert_names: list[str] = []
        self.trunk = make_trunk(answer_side, backbone.token_dim, backbone.embed_dim)
        self.heads = make_heads(tasks, self.trunk, backbone.token_dim, backbone.embed_dim)

    def encode(self, batch: Batch, cached: tuple[torch.Tensor, torch.Tensor] | None = None) -> Features:
        """Frozen features from ``cached``, else from the image tower run once per distinct image
        (rows asking several questions of one image share its forward pass and its gradient)."""
        tokens, image = cached if cached is not None else encode_per_image(self.backbone.encode_image, batch)
        return Features(tokens, image, batch.question, batch.ocr, batch.ocr_mask, batch.task_id, batch.row_index)

    def adapt(self, features: Features) -> Features:
        """Method hook: adapters / experts on the backbone's output (identity by default)."""
        return features

    def extra_loss(self) -> torch.Tensor | float:
        """Method hook: auxiliary losses accumulated during the last forward (e.g. load balance)."""
        return 0.0

    def forward(
        self, batch: Batch, cached: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per task present in the batch: (row positions, head output)."""
        feats = self.adapt(self.encode(batch, cached))
        rep = answer_input(self.trunk, feats)
        outputs = {}
        for name in dict.fromkeys(batch.task.tolist()):
            idx = device_index(np.flatnonzero(batch.task == name), feats.image.device)
            outputs[name] = (idx, self.heads[name](rep.select(idx)))
        return outputs

    def loss(self, batch: Batch, cached: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Mean over the batch's tasks of each head's loss, plus the method's extra loss."""
        outputs = self.forward(batch, cached)
        losses = [self.heads[name].loss(out, sub_batch(batch, idx)) for name, (idx, out) in outputs.items()]
        return torch.stack(losses).mean() + self.extra_loss()

    def uses_backbone_grad(self) -> bool:
        """True when PEFT sits inside the image tower (no feature cache possible)."""
        return any(p.requires_grad for p in self.backbone.parameters())
