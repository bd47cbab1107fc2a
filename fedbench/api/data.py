"""The data every suite hands the harness: one row per (image, task) question, columnar.

A suite (the embedded ``scenes`` or a real-dataset adapter) produces an :class:`ExampleTable`;
the harness never looks inside images or questions, it only slices rows by client and split.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# Split codes stored in ExampleTable.split.
TRAIN, TEST, GLOBAL_TEST = 0, 1, 2
SPLIT_NAMES = {TRAIN: "train", TEST: "test", GLOBAL_TEST: "global_test"}
GLOBAL_CLIENT = -1  # client id of rows in the global held-out test set


class DatasetUnavailable(FileNotFoundError):
    """A real dataset that is not on this machine; the message names it and the command that gets it
    (the CLI prints it as one line and exits 2)."""


class DataError(ValueError):
    """A real dataset whose files do not have the schema its adapter reads (one line, exit 2)."""


@dataclass
class ExampleTable:
    """All rows of a federated suite.

    Attributes:
        images: uint8 tensor [n_images, 3, H, W]; rows point into it via ``image_index``.
        image_index: int64 [n] row -> image.
        task: object array [n] of task registry names (e.g. ``"vqa"``).
        question: object array [n] of the question / referring-expression / prompt text.
        ocr_text: object array [n] of the OCR tokens as one string; ``""`` where the row's
            client has no OCR (the harness then feeds a learned null vector with a mask).
        label: int64 [n] answer index into the task's answer vocabulary; -1 for box tasks.
        box: float32 [n, 4] normalised (x0, y0, x1, y1) target box; NaN for non-box tasks.
        client: int64 [n] owning client, or ``GLOBAL_CLIENT`` for the global test set.
        split: int8 [n] one of TRAIN, TEST, GLOBAL_TEST.
        domain: int64 [n] image domain id (background/noise/font/palette style).
        synthetic: True when the data are procedurally generated (shown in every output).
        meta: free-form facts about the table (plans, domains, the real data's sources, answer vocabularies).
        answer_ids: optional int64 [n, K]: each row's distinct human answers as answer-vocabulary ids
            (-1: padding, or an answer outside the vocabulary), for families that score against several
            human answers (``vqa_soft``); None when no task needs it.
        answer_scores: optional float32 [n, K]: the score of predicting each of those answers (the
            official VQA accuracy); 0 where ``answer_ids`` is -1.
        human_answers: optional object array [n]: each row's human answers as the dataset wrote them (a
            tuple of str, before any normalisation; ``()`` for rows of tasks without them), so that a
            generated answer can be scored as the official VQA script does (its rules read the raw answers);
            None when no task has them. Derived from the same examples as ``answer_ids``: not in the
            fingerprint.

    ``images`` may be a tensor backed by a memory-mapped file (real data: decoded once into an on-disk
    cache, see :mod:`fedbench.tasks.real`); the harness only ever indexes it.
    """

    images: torch.Tensor
    image_index: np.ndarray
    task: np.ndarray
    question: np.ndarray
    ocr_text: np.ndarray
    label: np.ndarray
    box: np.ndarray
    client: np.ndarray
    split: np.ndarray
    domain: np.ndarray
    synthetic: bool = True
    meta: dict = field(default_factory=dict)
    answer_ids: np.ndarray | None = None
    answer_scores: np.ndarray | None = None
    human_answers: np.ndarray | None = None

    def fingerprint(self) -> str:
        """SHA-256 (16 hex digits) of the pixels, questions, OCR text and answers: two runs on the same
        data have the same fingerprint, so drift across machines can be traced to data or to compute."""
        digest = hashlib.sha256()
        for i in range(0, len(self.images), 4096):  # in chunks: the images may be a memory-mapped cache
            digest.update(np.ascontiguousarray(self.images[i : i + 4096].numpy()).tobytes())
        for column in (self.image_index, self.task, self.question, self.ocr_text, self.label, self.box, self.client):
            digest.update(np.asarray(column).astype(str).tobytes() if column.dtype == object else column.tobytes())
        for column in (self.answer_ids, self.answer_scores):  # absent on the embedded suite: digest unchanged
            if column is not None:
                digest.update(np.ascontiguousarray(column).tobytes())
        return digest.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.image_index)

    def rows(self, *, client: int | None = None, split: int | None = None, task: str | None = None) -> np.ndarray:
        """Indices of the rows matching every given filter."""
        mask = np.ones(len(self), dtype=bool)
        if client is not None:
            mask &= self.client == client
        if split is not None:
            mask &= self.split == split
        if task is not None:
            mask &= self.task == task
        return np.flatnonzero(mask)

    @property
    def num_clients(self) -> int:
        return int(self.client.max()) + 1


@dataclass(frozen=True)
class ClientPlan:
    """What one client holds, decided by a partitioner before any data are drawn.

    Attributes:
        client: client id (0-based).
        tasks: task names this client holds (task-heterogeneous partition).
        n_train: number of training images; each image yields one row per held task.
        n_test: number of personal test images.
        domain_weights: probability of drawing each image domain (len = number of domains).
        class_weights: probability of each classification class (Dirichlet label skew), or
            None for uniform.
        has_ocr: whether the client's rows carry OCR text (modality skew).
    """

    client: int
    tasks: tuple[str, ...]
    n_train: int
    n_test: int
    domain_weights: tuple[float, ...]
    class_weights: tuple[float, ...] | None
    has_ocr: bool

    def as_record(self) -> dict:
        return {
            "client": self.client,
            "tasks": list(self.tasks),
            "n_train": self.n_train,
            "n_test": self.n_test,
            "domain_weights": [round(w, 4) for w in self.domain_weights],
            "class_weights": None if self.class_weights is None else [round(w, 4) for w in self.class_weights],
            "has_ocr": self.has_ocr,
        }


@dataclass(frozen=True)
class PartitionConfig:
    """How the suite is split over clients (the ``[data]`` table of a protocol).

    Attributes:
        suite: suite registry name (``"scenes"``).
        num_clients: number of clients.
        train_images: training images per client before quantity skew.
        test_images: personal test images per client.
        global_test_images: images of the global held-out test set (each carries every task).
        tasks_per_client: task-heterogeneous partition: each client holds this many task
            families (0 = all of them).
        dirichlet_alpha: label skew of the classification labels, Dirichlet(alpha) per
            client; 0 means IID (no skew).
        quantity_skew: sigma of a log-normal factor on each client's train size; 0 = equal.
        ocr_fraction: fraction of clients whose rows carry OCR text (modality skew).
        domain_task_coupling: 0 = every task family drawn on the same image domains (pixels
            say nothing about the task); 1 = each family has its own domain.
        image_size: side of the square images in pixels.
        sources: real data only: task name -> where its dataset is, a Hugging Face hub id
            (``lmms-lab/VQAv2``, read from the hub cache) or a local snapshot directory; a task not
            named here uses its adapter's hub id (``fedbench list``). Empty for the embedded suite.
        natural_splits: real data only: task name -> the natural split whose values become clients
            (``question_type`` for VQAv2, ``structural`` / ``semantic`` / ``detailed`` for GQA, ``domain``
            for DomainNet, where it is the default; ``"none"`` turns a default off). Empty: the defaults.
        partitioner: real data only: ``""`` (fedbench's own draw, weighted by ``dirichlet_alpha``), or a
            flwr-datasets partitioner run on a local ``datasets.Dataset`` of each task's training pool:
            ``iid``, ``dirichlet`` (label skew, ``dirichlet_alpha``), ``inner_dirichlet`` (the plans'
            sizes, so ``quantity_skew``, with label skew) or ``pathological`` (``classes_per_client``).
        classes_per_client: real data only: labels per client of the ``pathological`` partitioner.
    """

    suite: str = "scenes"
    num_clients: int = 8
    train_images: int = 96
    test_images: int = 24
    global_test_images: int = 120
    tasks_per_client: int = 2
    dirichlet_alpha: float = 0.5
    quantity_skew: float = 0.3
    ocr_fraction: float = 0.5
    domain_task_coupling: float = 0.5
    image_size: int = 64
    sources: dict[str, str] = field(default_factory=dict)
    natural_splits: dict[str, str] = field(default_factory=dict)
    partitioner: str = ""
    classes_per_client: int = 0


@dataclass(frozen=True)
class ClientInfo:
    """What the server may know about a client (metadata, never its data)."""

    client: int
    tasks: tuple[str, ...]
    has_ocr: bool
    num_examples: int
