"""What flows through a client model: a :class:`Batch` of rows and the :class:`Features` the
answer side reads (the model skeleton, :mod:`fedbench.api.model`, and the task families,
:mod:`fedbench.api.family`, both speak them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from fedbench.utils.precision import device_index

OCR_TOKENS = 8  # at most this many OCR tokens per row, in reading order


@dataclass
class Batch:
    """Rows of one or more tasks, gathered for a forward pass."""

    images: torch.Tensor  # uint8 [B,3,H,W]
    image_index: torch.Tensor  # [B] rows -> image ids (keys a feature cache)
    task: np.ndarray  # [B] task names
    task_id: torch.Tensor  # [B] index into the run's task list
    question: torch.Tensor  # [B,E] frozen text-tower embedding of the question
    ocr: torch.Tensor  # [B,K,E] embeddings of the OCR tokens in reading order (zeros where absent)
    ocr_mask: torch.Tensor  # [B,K] bool, True for present OCR tokens
    label: torch.Tensor  # [B] answer index (-1 for box tasks)
    box: torch.Tensor  # [B,4] target box (NaN for answer tasks)
    row_index: torch.Tensor  # [B] rows of the example table (keys per-row views such as the prompt view)
    answer_ids: torch.Tensor | None = None  # [B,K] the rows' distinct human answers as vocabulary ids (-1: none)
    answer_scores: torch.Tensor | None = None  # [B,K] the score of predicting each (VQA accuracy)
    # a generative VLM's rows (the ``vlm`` backbone family): each row's chat prompt and answer, as token ids
    prompt_ids: list[list[int]] | None = None
    target_ids: list[list[int]] | None = None
    width: int | None = None  # teacher forcing pads every batch to this length (fedbench.utils.flops)

    def __len__(self) -> int:
        return len(self.task)


@dataclass
class Features:
    """What the heads see; methods' adapters transform these."""

    tokens: torch.Tensor  # [B,L,Dt] patch tokens
    image: torch.Tensor  # [B,E] pooled image embedding
    question: torch.Tensor  # [B,E]
    ocr: torch.Tensor  # [B,K,E] OCR token embeddings
    ocr_mask: torch.Tensor  # [B,K]
    task_id: torch.Tensor  # [B]
    row_index: torch.Tensor  # [B] rows of the example table

    def select(self, idx: torch.Tensor) -> Features:
        return replace(self, **{k: getattr(self, k)[idx] for k in self.__dataclass_fields__})


def encode_per_image(
    encode_image: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], batch: Batch
) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode_image`` (a frozen tower: uint8 images -> (tokens, pooled)) run once per distinct image
    of the batch, then per row: rows asking several questions of one image share its forward pass and
    its gradient."""
    _, first, inverse = np.unique(batch.image_index.numpy(), return_index=True, return_inverse=True)
    tokens, pooled = encode_image(batch.images[device_index(first, batch.images.device)])
    inverse = device_index(inverse, tokens.device)
    # index_select, not tokens[inverse]: the backward of advanced indexing (index_put_ with
    # accumulate) sums repeated rows in a varying order on CPU, and runs stop being reproducible
    return tokens.index_select(0, inverse), pooled.index_select(0, inverse)


def sub_batch(batch: Batch, idx: torch.Tensor) -> Batch:
    idx_np = idx.cpu().numpy()
    return Batch(
        images=batch.images[idx_np],
        image_index=batch.image_index[idx_np],
        task=batch.task[idx_np],
        task_id=batch.task_id[idx],
        question=batch.question[idx],
        ocr=batch.ocr[idx],
        ocr_mask=batch.ocr_mask[idx],
        label=batch.label[idx],
        box=batch.box[idx],
        row_index=batch.row_index[idx],
        answer_ids=None if batch.answer_ids is None else batch.answer_ids[idx],
        answer_scores=None if batch.answer_scores is None else batch.answer_scores[idx],
        prompt_ids=None if batch.prompt_ids is None else [batch.prompt_ids[i] for i in idx_np],
        target_ids=None if batch.target_ids is None else [batch.target_ids[i] for i in idx_np],
        width=batch.width,
    )
