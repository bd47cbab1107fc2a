"""What a method may use on a client during its local update: the interface (the harness's
implementation, with the one training loop, is :class:`fedbench.runtime.training.TrainingContext`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedbench.api.batch import Batch
from fedbench.api.data import ClientInfo
from fedbench.api.model import ClientModel

if TYPE_CHECKING:
    from fedbench.config.protocol import Protocol


class ClientContext(ABC):
    """A client's view during one local update: its info, its training rows and the harness's
    training loop (so no method writes its own optimiser loop). Methods read it; the harness makes it.

    - ``info``: the client (id, tasks, OCR, example count); ``round``: the round being trained;
    - ``protocol``: the run's protocol (``local.steps``, ``local.lr``...); ``seed``: the run's seed;
    - ``train_rows``: the client's training rows;
    - ``participations``: local updates already in the client's loaded state (the rounds before
      ``round`` it was sampled in; at evaluation, those up to and including ``round``);
    - ``amp``: the autocast dtype of forward passes (``resources.amp`` on this device), or None.
    """

    info: ClientInfo
    round: int
    protocol: Protocol
    seed: int
    train_rows: np.ndarray
    participations: int
    amp: torch.dtype | None

    @abstractmethod
    def inputs(self, model: ClientModel, rows: np.ndarray) -> tuple[Batch, tuple[torch.Tensor, torch.Tensor] | None]:
        """A batch of ``rows`` and, when the backbone is frozen, its cached image features."""

    @abstractmethod
    def sample(self, n: int, purpose: str) -> np.ndarray:
        """``n`` training rows drawn with replacement, from a seeded stream named by ``purpose``."""

    @abstractmethod
    def composition(self, rows: np.ndarray) -> tuple[int, ...]:
        """What a training step's FLOPs are linear in (:mod:`fedbench.utils.flops`)."""

    @abstractmethod
    def image_ids(self, rows: np.ndarray) -> torch.Tensor:
        """The image id of each of ``rows`` (rows of one image share it)."""

    @abstractmethod
    def images(self, image_ids: torch.Tensor) -> torch.Tensor:
        """The preprocessed images of ``image_ids``, on the client's device."""

    @abstractmethod
    def prompt_tokens(self) -> torch.Tensor | None:
        """Per row, the text-tower tokens of its prompt view (text drawn around the image), for
        routers that read them (``router_view=prompt``); None when the run stages none."""

    @abstractmethod
    def train(
        self,
        model: ClientModel,
        params: Iterable[torch.nn.Parameter],
        phase: str = "train",
        lr_scales: Sequence[float] | None = None,
        extra_loss: Callable[[ClientModel], torch.Tensor] | None = None,
    ) -> None:
        """``local.steps`` AdamW steps on exactly ``params`` over batches drawn from the client's
        train rows (the stream named by ``phase``).

        - ``params``: trainable parameters of ``model`` (``requires_grad`` True). Every other
          parameter is frozen while they train, and every parameter's flag is restored afterwards,
          also when training raises; a method never toggles flags itself.
        - ``lr_scales`` (aligned with ``params``): multiplies the protocol's learning rate per
          parameter (one AdamW param group per distinct scale, in order of first appearance).
        - ``extra_loss``: ``extra_loss(model)`` is added to the loss at every step, after the
          forward pass (e.g. a FedProx proximal term ``mu / 2 * Σ ‖p - p_received‖²``: no model
          subclass needed; the model's own ``extra_loss()`` hook is added as always).
        """
