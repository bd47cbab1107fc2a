"""What a method may use on a client during its local update, and the one training loop."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedbench.data import TRAIN, ClientInfo
from fedbench.model import Batch, ClientModel
from fedbench.protocol import Protocol
from fedbench.seeding import derive_seed, participations
from fedbench.staging import FeatureCache, Prepared, RowStore


@dataclass
class ClientContext:
    """What a method may use on a client during its local update: its info, its training rows and
    the harness's training loop (so no method writes its own optimiser loop)."""

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

    def inputs(self, model: ClientModel, rows: np.ndarray) -> tuple[Batch, tuple[torch.Tensor, torch.Tensor] | None]:
        """A batch of ``rows`` and, when the backbone is frozen, its cached image features."""
        batch = self.store.batch(rows)
        return batch, None if model.uses_backbone_grad() else self.features.get(batch.image_index)

    def sample(self, n: int, purpose: str) -> np.ndarray:
        """``n`` training rows drawn with replacement, from a stream named by ``purpose``."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.round, self.info.client, purpose))
        return self.train_rows[torch.randint(len(self.train_rows), (n,), generator=gen).numpy()]

    def train(
        self,
        model: ClientModel,
        params: Sequence[torch.nn.Parameter],
        phase: str = "train",
        lr_scales: Sequence[float] | None = None,
    ) -> None:
        """``local.steps`` AdamW steps on ``params`` over batches drawn from the client's train rows;
        ``lr_scales`` (aligned with ``params``) multiplies the protocol's learning rate per parameter."""
        cfg = self.protocol.local
        scales = list(lr_scales) if lr_scales is not None else [1.0] * len(params)
        groups = [
            {"params": [p for p, s in zip(params, scales, strict=True) if s == scale], "lr": cfg.lr * scale}
            for scale in dict.fromkeys(scales)
        ]
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.round, self.info.client, phase))
        torch.manual_seed(derive_seed(self.seed, self.round, self.info.client, phase, "dropout"))
        model.train()
        bs = min(cfg.batch_size, len(self.train_rows))
        for _ in range(cfg.steps):
            pick = self.train_rows[torch.randint(len(self.train_rows), (bs,), generator=gen).numpy()]
            loss = model.loss(*self.inputs(model, pick))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()


def client_context(prep: Prepared, info: ClientInfo, r: int, evaluating: bool = False) -> ClientContext:
    """The client's context in round ``r``: for its local update, or (``evaluating``) for its
    evaluation after that round (``participations`` then counts round ``r`` too)."""
    rows = prep.table.rows(client=info.client, split=TRAIN)
    fraction = prep.protocol.clients.sample_fraction
    done = participations(prep.seed, info.client, r + evaluating, len(prep.plans), fraction)
    return ClientContext(info, r, prep.store, rows, prep.protocol, prep.seed, prep.features, done)
