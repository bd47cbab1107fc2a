"""The client model skeleton of the generative-VLM family: frozen vision tower -> connector -> LM.

The LLaVA layout (docs/methods.md §7): the vision tower's features of an image (frozen, so a run
caches them like the CLIP family's) go through the connector into the LM's input embeddings at the
image tokens of the row's chat prompt; the LM writes the answer. There is no answer trunk: the LM
is the language side the trunk stood in for. Training is teacher-forced cross-entropy on the answer
tokens only (the prompt is masked); evaluation generates greedily (batched, left-padded, KV cache,
at most the family's ``max_new_tokens``) and the harness parses and scores the text.

Methods act where the family lets them (``lora_target``: the LM; ``connect``: the connector, which a
method may replace by its own modules); the LoRA rows train the connector too when the protocol
says ``vlm.connector = "shared"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fedbench.api.batch import Batch, Features, encode_per_image

if TYPE_CHECKING:
    from fedbench.api.task import TaskSpec
    from fedbench.api.vlm import VisionLanguageModel

IGNORE = -100  # label of the positions the loss skips (the prompt, the padding)
CONNECTOR = ".multi_modal_projector."  # in the names of the pretrained connector's parameters (LLaVA's)


def is_connector(name: str) -> bool:
    """Whether parameter ``name`` belongs to a generative VLM's pretrained connector."""
    return CONNECTOR in name


class VLMClientModel(nn.Module):
    """Frozen VLM + what methods add. Trainable tensors are tagged by the method as shared or local;
    frozen ones never travel. ``train_connector``: the pretrained connector trains (``vlm.connector =
    "shared"``), else it stays as loaded."""

    generates = True  # the harness scores generated text (the CLIP family's ClientModel scores head outputs)

    def __init__(self, backbone: VisionLanguageModel, tasks: Sequence[TaskSpec], train_connector: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.tasks = list(tasks)
        self.task_names = [t.name for t in tasks]
        self.routing: torch.Tensor | None = None  # [B, E] routing weights of the last forward, if any
        self.expert_names: list[str] = []
        self.heads = nn.ModuleDict()  # no heads: the LM answers every task
        backbone.connector.requires_grad_(train_connector)

    # --- what a method may override --------------------------------------------------------------
    def connect(self, vision: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Vision-tower features [B, L, Dv] -> the LM's image embeddings [B, L, H]: the connector."""
        return self.backbone.connector(vision)

    def features(self, vision: torch.Tensor, batch: Batch) -> Features:
        """What a method's router or gate reads on this family: the vision tokens before the connector
        and their mean, the LM's frozen input embeddings of the question (mean-pooled) and of the OCR
        tokens (staged per row: :class:`fedbench.staging.token_rows.TokenRowStore`), the task."""
        device = vision.device
        return Features(
            tokens=vision,
            image=vision.mean(1),
            question=batch.question.to(device),
            ocr=batch.ocr.to(device),
            ocr_mask=batch.ocr_mask.to(device),
            task_id=batch.task_id.to(device),
            row_index=batch.row_index,
        )

    def extra_loss(self) -> torch.Tensor | float:
        """Method hook: auxiliary losses of the last forward (e.g. a mixture's load balance)."""
        return 0.0

    # --- the harness's side ------------------------------------------------------------------------
    def uses_backbone_grad(self) -> bool:
        """True when something trains inside the vision tower (then no feature cache is possible): the
        connector and the LM come after the cached features."""
        return any(p.requires_grad for p in self.backbone.vision_tower.parameters())

    def vision(self, batch: Batch, cached: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """The rows' vision features: from ``cached``, else the tower run once per distinct image."""
        return (cached if cached is not None else encode_per_image(self.backbone.encode_image, batch))[0]

    def embed(
        self, batch: Batch, cached: tuple[torch.Tensor, torch.Tensor] | None, answers: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input embeddings, attention mask, labels) of the rows' prompts, with their answers when
        ``answers`` (teacher forcing: right-padded) or without (generation: left-padded)."""
        assert batch.prompt_ids is not None and (not answers or batch.target_ids is not None)
        vlm = self.backbone
        targets = batch.target_ids if answers else [[] for _ in batch.prompt_ids]
        seqs = [list(p) + list(a) for p, a in zip(batch.prompt_ids, targets, strict=True)]
        width = max(len(s) for s in seqs)
        if answers:  # teacher forcing pads to the seed's one width (one cost per step)
            width = max(width, batch.width or 0)
        device = vlm.input_embeddings.weight.device
        ids = torch.full((len(seqs), width), vlm.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
        for i, (seq, prompt) in enumerate(zip(seqs, batch.prompt_ids, strict=True)):
            span = slice(0, len(seq)) if answers else slice(width - len(seq), width)
            ids[i, span] = torch.as_tensor(seq)
            mask[i, span] = 1
            if answers:
                labels[i, len(prompt) : len(seq)] = torch.as_tensor(seq[len(prompt) :])
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        embeds = vlm.input_embeddings(ids)
        image = self.connect(self.vision(batch, cached).to(device), batch)
        slots = ids == vlm.image_token_id
        if int(slots.sum()) != image.shape[0] * image.shape[1]:
            raise ValueError(
                f"prompts hold {int(slots.sum())} image tokens for {image.shape[0]} images of {image.shape[1]} "
                "tokens each: the prompts were not made by this VLM's prompt_ids"
            )
        embeds = embeds.masked_scatter(slots.unsqueeze(-1), image.to(embeds.dtype))
        return embeds, mask, labels

    def loss(self, batch: Batch, cached: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Teacher-forced cross-entropy on the answer tokens (mean over them), plus the method's extra loss.
        The LM head projects only the positions that predict an answer token (the rest would be masked)."""
        embeds, mask, labels = self.embed(batch, cached, answers=True)
        hidden = self.backbone.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        keep = labels[:, 1:] != IGNORE
        logits = self.backbone.lm_head(hidden[:, :-1][keep]).float()
        return nn.functional.cross_entropy(logits, labels[:, 1:][keep]) + self.extra_loss()

    @torch.no_grad()
    def generate(
        self, batch: Batch, cached: tuple[torch.Tensor, torch.Tensor] | None, max_new_tokens: int
    ) -> tuple[list[str], np.ndarray]:
        """Greedy answers of the rows (batched, left-padded, KV cache), and per row whether it was cut
        at ``max_new_tokens`` without writing the end token."""
        embeds, mask, _ = self.embed(batch, cached, answers=False)
        vlm = self.backbone
        out = vlm.model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=vlm.pad_token_id,
            eos_token_id=vlm.eos_token_id,
        )
        return self.read_answers(out.tolist())  # from input embeddings, generate returns the new tokens only

    def read_answers(self, written: list[list[int]]) -> tuple[list[str], np.ndarray]:
        """Each row's generated tokens -> its answer text (up to its end token), and whether the row was
        cut without writing one."""
        eos = self.backbone.eos_token_id
        texts, cut = [], np.zeros(len(written), dtype=bool)
        for i, row in enumerate(written):
            ended = eos in row
            cut[i] = not ended
            texts.append(self.backbone.decode(row[: row.index(eos)] if ended else row))
        return texts, cut
