"""The client step, shared by every backend: a function of (client, round, what it received, its
stored state) that returns what it sends back. A backend only moves the bytes.

A client keeps its stored state (every trainable tensor after its last local update, local ones
included) in a :class:`~collections.abc.MutableMapping` keyed by client (partition) id that stays
on the client's side: in a run, a :class:`~fedbench.runtime.client_store.ClientStore`, one file per client
on disk (under the run's directory in process, the node's on Flower; a dict until a run sets it).
Nothing local ever leaves it except through :meth:`~fedbench.api.method.Method.upload`, which the
server checks.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fedbench.api.answer_side import FROZEN_TRUNK
from fedbench.api.backbone import backbone_family
from fedbench.api.context import ClientContext
from fedbench.api.data import GLOBAL_TEST, TEST, ClientInfo
from fedbench.api.method import Method
from fedbench.api.model import ClientModel
from fedbench.api.payload import META, deserialize, serialize
from fedbench.runtime.evaluation import EvalReply, GlobalScores, evaluate_rows
from fedbench.runtime.faults import nonfinite
from fedbench.runtime.training import client_context
from fedbench.staging.prepare import Prepared
from fedbench.utils.flops import FlopMeter, model_identity, shared_fits
from fedbench.utils.seeding import derive_seed
from fedbench.utils.timing import ComputeTimer

State = dict[str, torch.Tensor]


def trainable_state(model: ClientModel) -> State:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_state(model: ClientModel, *states: State | None) -> None:
    """Copy the given states into the model's parameters, later states winning (``meta.*`` message
    tensors are not parameters and are skipped)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for state in states:
            for name, tensor in (state or {}).items():
                if name.startswith(META):
                    continue
                if name not in params:
                    raise KeyError(f"payload tensor '{name}' is not a parameter of the model")
                params[name].copy_(tensor)


def build_model(prep: Prepared, method: Method) -> ClientModel:
    """The method's model on a fresh copy of the backbone, from the one seeded init every client
    (and the server) starts from. Weights the backbone says no method trains (``never_trained``: a
    generative VLM's tower and LM) are shared by every copy, not copied."""
    family = backbone_family(prep.backbone)
    if family not in method.families:
        raise ValueError(
            f"method '{method.name}' has no form on the {family} backbone family ('{prep.backbone.name}'); "
            f"it runs on: {', '.join(method.families)}"
        )
    if family == "vlm" and prep.protocol.model.answer_side == FROZEN_TRUNK and not method.frozen_lm_form:
        raise ValueError(
            f"method '{method.name}' has no form with the vlm family's LM frozen (model.answer_side = "
            f"'{FROZEN_TRUNK}'): its adapters are on the LM; leave answer_side at 'shared' for it"
        )
    torch.manual_seed(derive_seed(prep.seed, "init"))
    shared = {id(t): t for t in getattr(prep.backbone, "never_trained", list)()}
    model = method.build_model(copy.deepcopy(prep.backbone, shared), prep.specs, prep.protocol.model.answer_side)
    return model.to(prep.device)


@dataclass
class Message:
    """What the server sends one client: the round, its download (serialized), and for a method with
    a two-message download the answer to the client's request."""

    client: int
    round: int
    down: bytes
    more: bytes | None = None
    evaluating: bool = False
    steps: int | None = None  # local steps to run this round (a straggler's share); None: the protocol's


@dataclass
class TrainReply:
    """What a client sends back after its local update, and what the ledger needs to know of it."""

    upload: bytes
    n_examples: int
    compute_s: float
    timer: str
    record: dict[str, Any] = field(default_factory=dict)  # the method's train-record fields
    flops: int = 0  # FLOPs of the local update (fedbench.utils.flops)


class ClientRuntime:
    """One model and the staged data on a client process; runs any client's step on them."""

    def __init__(self, prep: Prepared, method: Method, states: MutableMapping[int, State] | None = None) -> None:
        self.prep, self.method = prep, method
        self.model = build_model(prep, method)
        self.init = trainable_state(self.model)
        # its fits of step FLOPs carry over between clients, rounds, and runs of this model in the process
        setting = (
            method.name,
            repr(method.options),
            prep.protocol.hash,
            repr(prep.protocol.resources),
            str(prep.device),
        )
        self.flops = FlopMeter(fits=shared_fits(model_identity(self.model, *setting)))
        # client id -> stored state; a run puts a ClientStore here (on disk: memory stays O(model))
        self.states: MutableMapping[int, State] = {} if states is None else states

    def context(self, info: ClientInfo, r: int, evaluating: bool = False) -> ClientContext:
        return client_context(self.prep, info, r, evaluating)

    def _load(self, msg: Message) -> ClientContext:
        """Initial state, then the stored state, then the download, as it crossed the wire; then
        the method's per-client structure; then, when the method asks in two messages, the same
        request as the one the server answered (it is deterministic) and the answer on top."""
        info = self.prep.infos[msg.client]
        load_state(self.model, self.init, self.states.get(msg.client), deserialize(msg.down))
        ctx = self.context(info, msg.round, msg.evaluating)
        self.method.prepare_client(self.model, ctx)
        if msg.more is not None:
            self.method.request(self.model, ctx)
            load_state(self.model, deserialize(msg.more))
        return ctx

    def query(self, msg: Message) -> bytes:
        """The first half of a two-message download: the client's request (serialized)."""
        ctx = self._load(msg)
        return serialize(self.method.request(self.model, ctx))

    def train(self, msg: Message) -> TrainReply:
        """Local update, upload, and the new stored state. ``msg.steps`` (a straggler's share of the
        round) replaces ``local.steps`` in the context the method trains with. A state holding NaN or
        Inf is not stored (the client keeps its previous one); the server leaves its upload out."""
        ctx = self._load(msg)
        if msg.steps is not None and msg.steps != ctx.protocol.local.steps:
            local = dataclasses.replace(ctx.protocol.local, steps=msg.steps)
            ctx = dataclasses.replace(ctx, protocol=ctx.protocol.replace(local=local))
        info = ctx.info
        with ComputeTimer(self.prep.device) as timer, self.flops as flops:
            self.method.local_update(self.model, ctx)
        up = serialize(self.method.upload(self.model, info))
        state = trainable_state(self.model)
        if not nonfinite(state):
            self.states[info.client] = state
        extra = self.method.train_record(self.model, ctx)
        return TrainReply(up, len(ctx.train_rows), timer.seconds, timer.kind, extra, flops.total)

    # reuse global-test scores across clients whose models are provably identical (False: never)
    reuse_global_scores: ClassVar[bool] = True
    _global_scores: GlobalScores | None = None

    def evaluate(self, msg: Message) -> EvalReply:
        """Scores on the client's own test split and on the global test set (see :func:`eval_records`).
        The global-test scores of a model identical to one already scored this round (e.g. every
        FedAvg-LoRA client: same download, no local state) are reused (:class:`GlobalScores`), so a
        thousand such clients cost one pass over the global test set, not a thousand."""
        ctx = self._load(msg)
        table, bs = self.prep.table, self.prep.protocol.eval.batch_size
        own = table.rows(client=msg.client, split=TEST)
        own_correct, _, own_status = evaluate_rows(self.model, self.method, ctx, own, bs)
        if self._global_scores is None:
            self._global_scores = GlobalScores()
        cache = self._global_scores
        key = cache.key(self.model, self.method, msg.round) if self.reuse_global_scores else None
        if key is not None and key in cache.scores:
            cache.hits += 1
            global_correct, routing, global_status = cache.scores[key]
        else:
            global_rows = table.rows(split=GLOBAL_TEST)
            global_correct, routing, global_status = evaluate_rows(self.model, self.method, ctx, global_rows, bs)
            if key is not None:
                cache.scores[key] = (global_correct, routing, global_status)
        return EvalReply(own_correct, global_correct, routing, own_status, global_status)
