"""The harness's client context: the one training loop every method trains through, over the
client's staged rows (the interface methods see is :class:`fedbench.api.context.ClientContext`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from fedbench.api.batch import Batch
from fedbench.api.context import ClientContext
from fedbench.api.data import TRAIN, ClientInfo
from fedbench.api.model import ClientModel
from fedbench.config.protocol import Protocol
from fedbench.staging.feature_cache import FeatureCache
from fedbench.staging.prepare import Prepared
from fedbench.staging.row_store import RowStore
from fedbench.utils.flops import active_meter, composition
from fedbench.utils.precision import autocast
from fedbench.utils.seeding import derive_seed, participations


@dataclass
class TrainingContext(ClientContext):
    """A client's context over the staged rows of one seed (:class:`fedbench.staging.prepare.Prepared`):
    its rows, cached features and the one training loop."""

    info: ClientInfo
    round: int
    store: RowStore
    train_rows: np.ndarray
    protocol: Protocol
    seed: int
    features: FeatureCache
    # local updates already in the client's loaded state: the rounds before ``round`` it was sampled
    # in (at training), those up to and including ``round`` (at evaluation after that round)
    participations: int = 0
    amp: torch.dtype | None = None  # autocast dtype of forward passes (resources.amp on this device)

    def inputs(self, model: ClientModel, rows: np.ndarray) -> tuple[Batch, tuple[torch.Tensor, torch.Tensor] | None]:
        """A batch of ``rows`` and, when the backbone is frozen, its cached image features."""
        batch = self.store.batch(rows)
        return batch, None if model.uses_backbone_grad() else self.features.get(batch.image_index)

    def sample(self, n: int, purpose: str) -> np.ndarray:
        """``n`` training rows drawn with replacement, from a stream named by ``purpose``."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.round, self.info.client, purpose))
        return self.train_rows[torch.randint(len(self.train_rows), (n,), generator=gen).numpy()]

    def image_ids(self, rows: np.ndarray) -> torch.Tensor:
        return self.store.image_index[np.asarray(rows)]

    def images(self, image_ids: torch.Tensor) -> torch.Tensor:
        return self.store.images[image_ids.to(self.store.device)]

    def prompt_tokens(self) -> torch.Tensor | None:
        return None if self.features.prompts is None else self.features.prompts.tokens

    def composition(self, rows: np.ndarray) -> tuple[int, ...]:
        """What a training step's FLOPs are linear in (:mod:`fedbench.utils.flops`): its rows, distinct
        images, rows per task and rows with OCR text."""
        store = self.store
        per_task = np.bincount(store.task_index[rows], minlength=len(store.task_names))
        ocr = int(store.ocr_rows[rows].sum())
        width = getattr(store, "width", None)  # a generative VLM's batches are padded to one width
        answers = store.answer_tokens(rows) if width is not None else 0
        images = len(np.unique(store.image_index[rows].numpy()))
        return composition(len(rows), images, per_task.tolist(), ocr, width, answers)

    def train(
        self,
        model: ClientModel,
        params: Iterable[torch.nn.Parameter],
        phase: str = "train",
        lr_scales: Sequence[float] | None = None,
        extra_loss: Callable[[ClientModel], torch.Tensor] | None = None,
    ) -> None:
        """See :meth:`fedbench.api.context.ClientContext.train` (LoRA dropout draws from the global
        torch RNG, seeded here from ``phase`` too)."""
        params = list(params)
        _check_trainable(model, params)
        cfg = self.protocol.local
        scales = list(lr_scales) if lr_scales is not None else [1.0] * len(params)
        groups = [
            {"params": [p for p, s in zip(params, scales, strict=True) if s == scale], "lr": cfg.lr * scale}
            for scale in dict.fromkeys(scales)
        ]
        chosen = {id(p) for p in params}
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            for p, _ in flags:
                p.requires_grad_(id(p) in chosen)
            opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.round, self.info.client, phase))
            torch.manual_seed(derive_seed(self.seed, self.round, self.info.client, phase, "dropout"))
            model.train()
            bs = min(cfg.batch_size, len(self.train_rows))
            meter = active_meter()
            if meter is not None:  # the step's FLOP key: what its cost depends on besides the batch
                trained = tuple(n for n, p in model.named_parameters() if id(p) in chosen)
                key = (phase, trained, self.info.tasks, self.info.has_ocr)
            for _ in range(cfg.steps):
                pick = self.train_rows[torch.randint(len(self.train_rows), (bs,), generator=gen).numpy()]

                def forward_backward(pick: np.ndarray = pick) -> None:
                    with autocast(self.store.device, self.amp):
                        loss = model.loss(*self.inputs(model, pick))
                        if extra_loss is not None:
                            loss = loss + extra_loss(model)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()

                with meter.step(key, self.composition(pick), forward_backward) if meter is not None else nullcontext():
                    forward_backward()
                    opt.step()
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
            model.eval()


def _check_trainable(model: ClientModel, params: Sequence[torch.nn.Parameter]) -> None:
    """Each of ``params`` is a trainable parameter of ``model``; a one-line error otherwise (training a
    frozen tensor would change it outside every client's stored state)."""
    names = {id(p): n for n, p in model.named_parameters()}
    for i, p in enumerate(params):
        if id(p) not in names:
            raise ValueError(f"ctx.train: params[{i}] is not a parameter of the model")
        if not p.requires_grad:
            raise ValueError(
                f"ctx.train: parameter '{names[id(p)]}' is frozen (requires_grad False); pass trainable parameters only"
            )


def client_context(prep: Prepared, info: ClientInfo, r: int, evaluating: bool = False) -> TrainingContext:
    """The client's context in round ``r``: for its local update, or (``evaluating``) for its
    evaluation after that round (``participations`` then counts round ``r`` too)."""
    rows = prep.table.rows(client=info.client, split=TRAIN)
    fraction = prep.protocol.clients.sample_fraction
    done = participations(prep.seed, info.client, r + evaluating, len(prep.plans), fraction)
    return TrainingContext(info, r, prep.store, rows, prep.protocol, prep.seed, prep.features, done, prep.amp)
