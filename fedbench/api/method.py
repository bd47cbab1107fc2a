"""The method contract (docs/design.md §3): tags, download, upload, aggregate.

A method builds the client model, tags each trainable parameter ``shared`` (crosses the
network) or ``local`` (never leaves the client), and decides what the server sends, what a
client uploads and how the server aggregates. It never talks to a transport: the harness
serializes every payload and counts its bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from fedbench.api.aggregate import weighted_mean
from fedbench.api.backbone import Backbone
from fedbench.api.data import ClientInfo
from fedbench.api.model import HEADS, ClientModel
from fedbench.api.options import build_config
from fedbench.api.payload import Payload
from fedbench.api.registry import METHODS
from fedbench.api.task import TaskSpec

if TYPE_CHECKING:
    import numpy as np

    from fedbench.api.batch import Batch
    from fedbench.api.context import ClientContext

Tag = Literal["shared", "local"]


@dataclass(frozen=True)
class Reply:
    """One client's answer to a round: its upload and how many examples it trained on."""

    client: ClientInfo
    payload: Payload
    num_examples: int


@dataclass(frozen=True)
class NoOptions:
    """A method without options."""


class Method:
    """Base class of every federated method; subclass and register with :func:`register_method`.

    Defaults give FedAvg: every trainable tensor shared, the server state is the global
    copy of the shared tensors, and the server takes the example-weighted mean of the uploads.
    Harness choice: a client exchanges only the task heads of the tasks it holds (a head of a
    task without data is neither trained nor useful to it), so each head is averaged over the
    clients that hold its task.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    paper: ClassVar[str] = ""
    # False for a reference row that is not federated (``centralized``): the harness then trains one
    # pooled trainer on every client's training rows, sends nothing, and evaluates that one model as
    # every client's (server.Run._pooled_round); its server state is the pooled model's trainable tensors.
    federated: ClassVar[bool] = True
    # the backbone families the method has a form on (``clip``: CLIP towers + answer trunk; ``vlm``: a
    # generative VLM, docs/methods.md §7); a run of another family is refused before it starts
    families: ClassVar[tuple[str, ...]] = ("clip",)
    # whether the method has a form on the ``vlm`` family with the LM frozen (``model.answer_side =
    # "frozen_trunk"``: no adapter on the LM, the analogue of the frozen answer trunk); a method whose
    # only adapters are on the LM (the LoRA rows, FedDPA, FedMix) has none and is refused
    frozen_lm_form: ClassVar[bool] = False

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Method:
        return cls(build_config(cls.Options, options, owner=f"method '{cls.name}'"))

    # --- model ----------------------------------------------------------------------------
    def build_model(self, backbone: Backbone, tasks: Sequence[TaskSpec], answer_side: str = "shared") -> ClientModel:
        """The client model; the harness seeds torch before calling, so all clients share the init.
        ``answer_side`` is the protocol's (``shared`` trunk + thin task outputs, or ``per_task`` heads)."""
        return ClientModel(backbone, list(tasks), answer_side)

    def tag(self, name: str) -> Tag:
        """Tag of trainable parameter ``name``."""
        return "shared"

    def tags(self, model: ClientModel) -> dict[str, Tag]:
        return {n: self.tag(n) for n, p in model.named_parameters() if p.requires_grad}

    # --- client work ------------------------------------------------------------------------
    def prepare_client(self, model: ClientModel, ctx: ClientContext) -> None:
        """Called whenever the harness loads a client's state into the model (before its local
        update and before its evaluation): per-client structure (widths, stages, OCR branches)
        is set here from ``ctx.info`` and ``ctx.round``. Default: nothing per client."""

    def local_update(self, model: ClientModel, ctx: ClientContext) -> None:
        """One client's local training; default: every trainable parameter, ``local.steps`` steps."""
        ctx.train(model, [p for p in model.parameters() if p.requires_grad])

    def train_record(self, model: ClientModel, ctx: ClientContext) -> dict[str, Any]:
        """Extra fields for this client's ``kind="train"`` record of the round (called after its local
        update; JSON-serialisable values, never the harness's own field names). Default: none."""
        return {}

    def encode_images(
        self, model: ClientModel, image_ids: torch.Tensor, ctx: ClientContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image features at evaluation (override for instance-wise adapter mixing)."""
        return model.backbone.encode_image(ctx.store.images[image_ids.to(ctx.store.device)])

    def generate(
        self, model: ClientModel, batch: Batch, cached: tuple[torch.Tensor, torch.Tensor] | None, budget: int,
        ctx: ClientContext,
    ) -> tuple[list[str], np.ndarray]:  # fmt: skip
        """A generative VLM's answers to ``batch``'s rows at evaluation (texts, and per row whether it was
        cut at ``budget`` new tokens); override for instance-wise adapter mixing (FedDPA's α)."""
        return model.generate(batch, cached, budget)

    # --- communication ----------------------------------------------------------------------
    def init_server_state(self, model: ClientModel) -> Payload:
        tags = self.tags(model)
        return {n: p.detach().clone() for n, p in model.named_parameters() if tags.get(n) == "shared"}

    def download(self, server_state: Payload, client: ClientInfo) -> Payload:
        return {n: t for n, t in server_state.items() if holds(client, n)}

    def request(self, model: ClientModel, ctx: ClientContext) -> Payload | None:
        """A download in two messages: what the client asks for after the first one. Default: None
        (one message, nothing asked).

        Called on the client once ``download``'s payload is loaded (after ``prepare_client``), at
        training and at evaluation alike, for a client whose choice of what to receive depends on
        its data and on what it just received (FedMix: the gate, then the experts it selects with
        it). The payload goes to the server (checked like an upload, its bytes counted as uplink and
        recorded in the train record's ``request``: keep it small) and :meth:`answer` replies."""
        return None

    @property
    def two_messages(self) -> bool:
        """True when the download takes two messages: the method overrides :meth:`request`."""
        return type(self).request is not Method.request

    def answer(self, server_state: Payload, client: ClientInfo, request: Payload) -> Payload:
        """The second download message, the server's reply to :meth:`request` (its bytes counted as
        downlink); the harness loads it over the first (parameters only; ``prepare_client`` is not
        called again)."""
        raise NotImplementedError(f"method '{self.name}' sends a download request but does not answer it")

    def upload(self, model: ClientModel, client: ClientInfo) -> Payload:
        tags = self.tags(model)
        return {
            n: p.detach().clone() for n, p in model.named_parameters() if tags.get(n) == "shared" and holds(client, n)
        }

    def aggregate(self, server_state: Payload, replies: Sequence[Reply]) -> Payload:
        """Pure function of the replies: example-weighted mean per tensor."""
        new = weighted_mean([r.payload for r in replies], [r.num_examples for r in replies])
        return {**server_state, **new}

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "paper": self.paper, "options": dataclasses.asdict(self.options)}


def holds(client: ClientInfo, name: str) -> bool:
    """False for the parameters of a task head whose task the client does not hold (the shared
    answer trunk serves every task, so every client holds it)."""
    if not name.startswith(HEADS):
        return True
    return name.split(".", 2)[1] in client.tasks


def register_method(name: str):
    """Class decorator: register a :class:`Method` subclass under ``name`` (what users type)."""

    def wrap(cls: type[Method]) -> type[Method]:
        # refuses anything but a Method subclass, one line naming it; sets ``cls.name`` (as for an entry point)
        METHODS.register(name, cls)
        return cls

    return wrap


def create_method(name: str, options: dict[str, Any] | None = None) -> Method:
    """Thin factory: look up ``name`` and build its typed options (unknown keys rejected)."""
    return METHODS.get(name).from_options(options or {})


def count_params(model: ClientModel, tags: dict[str, Tag]) -> dict[str, int]:
    params = dict(model.named_parameters())
    shared = sum(params[n].numel() for n, t in tags.items() if t == "shared")
    local = sum(params[n].numel() for n, t in tags.items() if t == "local")
    return {"params_trainable": shared + local, "params_shared": shared, "params_local": local}
