"""Staging: what every run of one seed shares before any method acts (DESIGN §6).

The partition plan, the drawn suite, its rows as tensors with text encoded once by the frozen
text tower, the frozen image features (computed once, shared by every row whose trainable parts
sit after the towers) and the majority reference row. Every backend stages the same way from
(protocol, seed), so a Flower node rebuilds exactly what the in-process backend holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from fedbench.api.backbone import Backbone, create_backbone
from fedbench.api.batch import OCR_TOKENS, Batch
from fedbench.api.data import GLOBAL_TEST, TRAIN, ClientInfo, ClientPlan, ExampleTable
from fedbench.api.family import family_of
from fedbench.api.registry import SUITES, TASKS
from fedbench.api.task import TaskSpec
from fedbench.config.protocol import Protocol
from fedbench.staging.feature_cache import (
    TEXT_BATCH,
    TEXT_FILES,
    DiskEntry,
    FeatureCache,
    backbone_digest,
    features_dir,
    text_dir,
    text_key_parts,
)
from fedbench.staging.partition import make_plans
from fedbench.staging.prompt_view import PromptViews
from fedbench.utils.precision import amp_dtype, device_index


def resolve_device(name: str = "auto") -> torch.device:
    """``resources.device``: ``auto`` is CUDA when there is one, else the CPU; a CUDA device that is
    not there is refused in one line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"resources.device = '{name}' but this machine has no CUDA device; use 'cpu' or 'auto'")
    return torch.device(name)


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
        self.text = text or TextEncoder(backbone)
        on = backbone.mean.device  # the text embeddings live with the backbone, as the tower gives them
        self.question = self._encode(self.text, table.question, on)
        self.ocr, self.ocr_mask = self._encode_tokens(self.text, table.ocr_text, backbone.embed_dim, on)
        self.ocr_rows = self.ocr_mask.any(1).cpu().numpy()
        self.label = torch.as_tensor(table.label, dtype=torch.long, device=device)
        self.box = torch.as_tensor(table.box, dtype=torch.float32, device=device)
        self.answer_ids = self.answer_scores = None
        if table.answer_ids is not None:
            self.answer_ids = torch.as_tensor(table.answer_ids, dtype=torch.long, device=device)
            self.answer_scores = torch.as_tensor(table.answer_scores, dtype=torch.float32, device=device)

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
        )


@dataclass
class Prepared:
    """Everything a run needs that does not depend on the method (shared by all rows of a seed)."""

    protocol: Protocol
    seed: int
    plans: list[ClientPlan]
    table: ExampleTable
    specs: list[TaskSpec]
    backbone: Backbone
    store: RowStore
    device: torch.device
    majority: dict[str, float]
    features: FeatureCache

    @cached_property
    def amp(self) -> torch.dtype | None:
        """The autocast dtype of forward passes on this device (``resources.amp``), None for float32."""
        return amp_dtype(self.device, self.protocol.resources.amp)

    @cached_property
    def infos(self) -> list[ClientInfo]:
        """What the server may know of each client; built once (the client step reads it per message)."""
        return [
            ClientInfo(
                p.client,
                tuple(t for t in p.tasks if t in self.store.task_names),
                p.has_ocr,
                len(self.table.rows(client=p.client, split=TRAIN)),
            )
            for p in self.plans
        ]


def prepare(
    protocol: Protocol,
    seed: int,
    backbone: Backbone | None = None,
    device: torch.device | None = None,
    feature_cache: bool | Path = False,
) -> Prepared:
    """Partition, draw the suite and encode text for one seed.

    ``feature_cache``: keep the frozen image features on disk (True: under ``$FEDBENCH_CACHE``, or
    this directory) so later seeds and runs reuse them; False keeps them in memory for this seed.
    Either way the features are the same bits, so results are too."""

    device = device or resolve_device(protocol.resources.device)
    specs = [TASKS.get(name) for name in protocol.tasks]
    suite = SUITES.get(protocol.data.suite)
    wrong = [s.name for s in specs if s.suite != protocol.data.suite]
    if wrong:
        raise ValueError(f"task(s) {wrong} do not belong to suite '{protocol.data.suite}'")
    n_classes = max((s.num_answers for s in specs if family_of(s).label_skew), default=1)
    if hasattr(suite, "label_space"):  # a real-data suite reads its classes from the dataset
        n_classes = max(n_classes, suite.label_space(protocol.data, specs))
    plans = make_plans(protocol.data, list(protocol.tasks), suite.n_domains, n_classes, seed)
    table = suite(plans, protocol.data, list(protocol.tasks), seed)
    # a real-data suite finds the answer vocabularies in the training clients' rows
    vocab = table.meta.get("answers", {})
    specs = [dataclasses.replace(s, answers=tuple(vocab[s.name])) if s.name in vocab else s for s in specs]
    backbone = backbone or create_backbone(protocol.backbone.name, device)
    disk = (features_dir() if feature_cache is True else Path(feature_cache)) if feature_cache else None
    text_disk = (text_dir() if feature_cache is True else Path(feature_cache) / "text") if feature_cache else None
    digest = backbone_digest(backbone) if disk else None  # one hash of the weights for both disk keys
    store = RowStore(table, specs, backbone, device, TextEncoder(backbone, text_disk, digest))
    prompts = PromptViews(table, {s.name: family_of(s).symbol for s in specs}, backbone, protocol.eval.batch_size)
    amp = amp_dtype(device, protocol.resources.amp)
    features = FeatureCache(backbone, store.images, protocol.eval.batch_size, prompts, disk, amp, digest)
    prep = Prepared(
        protocol, seed, plans, table, specs, backbone, store, device, majority_scores(table, specs), features
    )
    _ = prep.amp  # refuses resources.amp = "bf16" where it cannot run, before any row starts
    return prep


def majority_scores(table: ExampleTable, specs: Sequence[TaskSpec]) -> dict[str, float]:
    """Reference row: each task family's constant prediction from the training rows (the majority
    answer, the mean box, ...) scored on the global test."""
    scores = {}
    for spec in specs:
        train = np.flatnonzero((table.task == spec.name) & (table.split == TRAIN))
        test = np.flatnonzero((table.task == spec.name) & (table.split == GLOBAL_TEST))
        scores[spec.name] = family_of(spec).majority(spec, table, train, test)
    return scores
