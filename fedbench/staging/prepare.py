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

from fedbench.api.backbone import Backbone, backbone_family, create_backbone
from fedbench.api.data import GLOBAL_TEST, TRAIN, ClientInfo, ClientPlan, ExampleTable
from fedbench.api.family import family_of
from fedbench.api.registry import SUITES, TASKS
from fedbench.api.task import TaskSpec
from fedbench.config.protocol import Protocol
from fedbench.config.sections import VLMConfig
from fedbench.staging.feature_cache import (
    FeatureCache,
    backbone_digest,
    features_dir,
    text_dir,
)
from fedbench.staging.partition import make_plans
from fedbench.staging.prompt_view import PromptViews
from fedbench.staging.row_store import RowStore, TextEncoder
from fedbench.staging.token_rows import vlm_rows
from fedbench.utils.precision import amp_dtype


def resolve_device(name: str = "auto") -> torch.device:
    """``resources.device``: ``auto`` is CUDA when there is one, else the CPU; a CUDA device that is
    not there is refused in one line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"resources.device = '{name}' but this machine has no CUDA device; use 'cpu' or 'auto'")
    return torch.device(name)


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
    if backbone_family(backbone) == "vlm":
        store = vlm_rows(protocol, table, specs, backbone, device)
    else:
        if protocol.vlm != VLMConfig():
            raise ValueError(
                f"protocol sets [vlm] options but backbone '{protocol.backbone.name}' is of the clip family, "
                "which has no connector or generated answers: leave [vlm] out"
            )
        store = RowStore(table, specs, backbone, device, TextEncoder(backbone, text_disk, digest))
    # rendered and encoded by the frozen tower on first use (a router that reads the prompt view)
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
