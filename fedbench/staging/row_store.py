"""Every row of a seed's table as tensors on the device, its text encoded once by the frozen text tower
(optionally cached on disk)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fedbench.api.backbone import Backbone
from fedbench.api.batch import OCR_TOKENS, Batch
from fedbench.api.data import ExampleTable
from fedbench.api.task import TaskSpec
from fedbench.staging.feature_cache import (
    TEXT_BATCH,
    TEXT_FILES,
    DiskEntry,
    text_key_parts,
)
from fedbench.utils.precision import device_index


class TextEncoder:
    """The frozen text tower over lists of strings, each list encoded in one call. With ``disk`` (see
    :mod:`fedbench.staging.feature_cache`) a list's embeddings are read from its entry when there is one, else
    computed and written there. ``origins`` lists, per call, ``memory``, ``disk`` or ``computed``.
    ``digest``: the backbone's :func:`~fedbench.staging.feature_cache.backbone_digest`, when known."""

    def __init__(self, backbone: Backbone, disk: Path | None = None, digest: str | None = None) -> None:
        self.backbone, self.disk, self.digest = backbone, disk, digest
        self.origins: list[str] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if self.disk is None:
            self.origins.append("memory")
            return self.backbone.encode_text(texts, TEXT_BATCH)
        entry = DiskEntry.for_key(self.disk, text_key_parts(self.backbone, texts, self.digest), TEXT_FILES)
        loaded = entry.load(self.backbone.mean.device)
        if loaded is not None:
            self.origins.append("disk")
            return loaded[0]
        embeddings = self.backbone.encode_text(texts, TEXT_BATCH)
        entry.save(embeddings)
        self.origins.append("computed")
        return embeddings


class RowStore:
    """Every row of a table as tensors; text is encoded once by the frozen text tower (``text``: a
    :class:`TextEncoder`, by default one without a disk cache)."""

    def __init__(
        self,
        table: ExampleTable,
        specs: Sequence[TaskSpec],
        backbone: Backbone,
        device: torch.device,
        text: TextEncoder | None = None,
    ) -> None:
        self.table = table
        self.device = device
        self.task_names = [s.name for s in specs]
        self.images = table.images.to(device)
        self.image_index = torch.as_tensor(table.image_index, dtype=torch.long)
        # host copies of what each training step's FLOP key reads (fedbench.utils.flops): no device round trip per step
        self.task_index = np.asarray([self.task_names.index(t) for t in table.task], dtype=np.int64)
        self.task_id = torch.as_tensor(self.task_index, device=device)
        self.prompt_ids: list[list[int]] | None = None
        self.target_ids: list[list[int]] | None = None
        self.width: int | None = None  # a generative VLM's padded batch length
        self.encode_text(table, specs, backbone, text)
        self.ocr_rows = np.asarray([bool(str(t).split()) for t in table.ocr_text])
        self.label = torch.as_tensor(table.label, dtype=torch.long, device=device)
        self.box = torch.as_tensor(table.box, dtype=torch.float32, device=device)
        self.answer_ids = self.answer_scores = None
        if table.answer_ids is not None:
            self.answer_ids = torch.as_tensor(table.answer_ids, dtype=torch.long, device=device)
            self.answer_scores = torch.as_tensor(table.answer_scores, dtype=torch.float32, device=device)

    def encode_text(
        self, table: ExampleTable, specs: Sequence[TaskSpec], backbone: Backbone, text: TextEncoder | None
    ) -> None:
        """Each row's question and OCR tokens through the frozen text tower, once."""
        self.text = text or TextEncoder(backbone)
        on = backbone.mean.device  # the text embeddings live with the backbone, as the tower gives them
        self.question = self._encode(self.text, table.question, on)
        self.ocr, self.ocr_mask = self._encode_tokens(self.text, table.ocr_text, backbone.embed_dim, on)

    @staticmethod
    def _encode(encode: TextEncoder, texts: np.ndarray, device: torch.device) -> torch.Tensor:
        unique, inverse = np.unique(texts.astype(str), return_inverse=True)
        return encode(unique.tolist())[torch.as_tensor(inverse, device=device)]

    @staticmethod
    def _encode_tokens(
        encode: TextEncoder, texts: np.ndarray, width: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """OCR text -> one embedding per whitespace token (reading order), at most OCR_TOKENS."""
        tokens = [str(t).split()[:OCR_TOKENS] for t in texts]
        vocab = sorted({w for ts in tokens for w in ts})
        k = max((len(ts) for ts in tokens), default=0) or 1
        emb = torch.zeros(len(texts), k, width, device=device)
        mask = torch.zeros(len(texts), k, dtype=torch.bool, device=device)
        if vocab:
            table = encode(vocab)
            index = {w: i for i, w in enumerate(vocab)}
            for row, ts in enumerate(tokens):
                if ts:
                    emb[row, : len(ts)] = table[[index[w] for w in ts]]
                    mask[row, : len(ts)] = True
        return emb, mask

    def batch(self, rows: np.ndarray) -> Batch:
        idx = device_index(rows, self.device)
        image_index = self.image_index[rows]
        images = self.images[device_index(image_index.numpy(), self.device)]
        return Batch(
            images,
            image_index,
            self.table.task[rows],
            self.task_id[idx],
            self.question[idx],
            self.ocr[idx],
            self.ocr_mask[idx],
            self.label[idx],
            self.box[idx],
            idx,
            None if self.answer_ids is None else self.answer_ids[idx],
            None if self.answer_scores is None else self.answer_scores[idx],
            None if self.prompt_ids is None else [self.prompt_ids[i] for i in rows],
            None if self.target_ids is None else [self.target_ids[i] for i in rows],
            self.width,
        )
