"""Evaluation: a client scores its model on rows (client side); the server turns every client's
scores into eval, usage and routing records (the same assembly on every backend)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedbench.api.batch import sub_batch
from fedbench.api.context import ClientContext
from fedbench.api.data import GLOBAL_CLIENT, GLOBAL_TEST, TEST, ClientInfo
from fedbench.api.family import family_of
from fedbench.api.method import Method
from fedbench.api.model import ClientModel
from fedbench.api.vlm_model import VLMClientModel
from fedbench.config.protocol import EvalConfig
from fedbench.runtime.run_records import RunRecords
from fedbench.utils.precision import autocast
from fedbench.utils.seeding import derive_seed


@dataclass
class EvalReply:
    """One client's scores after a round: per row of its own test split and of the global test set
    (1.0 = correct, in table order), and its routing weights on the global test set, if it routes."""

    own: np.ndarray
    global_: np.ndarray
    routing: np.ndarray | None
    # a generative VLM's rows: per row, UNPARSED | CUT bits (its answer could not be parsed; its
    # generation hit max_new_tokens), on its own test split and on the global test set; else None
    own_status: np.ndarray | None = None
    global_status: np.ndarray | None = None


UNPARSED, CUT = 1, 2  # bits of a generated answer's status


@torch.no_grad()
def evaluate_rows(
    model: ClientModel, method: Method, ctx: ClientContext, rows: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Per row: 1.0 where the model answers correctly (IoU >= 0.5 for boxes); images encoded once.

    Also returns, when the model routes, each row's routing weights over experts [rows, E] (what the
    expert-usage matrix and the routing entropy / mutual information are computed from), else None;
    and for a model that writes its answers, each row's status bits (:data:`UNPARSED`, :data:`CUT`),
    else None.
    """
    if getattr(model, "generates", False):
        return score_generated(model, method, ctx, rows, batch_size)
    model.eval()
    out = np.zeros(len(rows), dtype=np.float64)
    routing: np.ndarray | None = None
    if len(rows) == 0:
        return out, routing, None
    with autocast(ctx.store.device, ctx.amp):  # forward passes in the run's autocast dtype, if any
        images, position = np.unique(ctx.store.image_index[rows].numpy(), return_inverse=True)
        image_ids = torch.as_tensor(images)
        if model.uses_backbone_grad() or type(method).encode_images is not Method.encode_images:
            parts = [
                method.encode_images(model, image_ids[i : i + batch_size], ctx)
                for i in range(0, len(images), batch_size)
            ]
            tokens_all, pooled_all = torch.cat([t for t, _ in parts]), torch.cat([p for _, p in parts])
        else:
            tokens_all, pooled_all = ctx.features.get(image_ids)
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            pos = torch.as_tensor(position[i : i + batch_size], device=tokens_all.device)
            batch = ctx.store.batch(chunk)
            for name, (idx, head_out) in model.forward(batch, cached=(tokens_all[pos], pooled_all[pos])).items():
                head = model.heads[name]
                out[i + idx.cpu().numpy()] = head.correct(head_out.float(), sub_batch(batch, idx)).cpu().numpy()
            if model.routing is not None:
                weights = model.routing.detach().float().cpu().numpy()
                if routing is None:  # NaN marks rows of a batch that did not route, should one not
                    routing = np.full((len(rows), weights.shape[1]), np.nan)
                routing[i : i + len(chunk)] = weights
    return out, routing, None


def score_generated(
    model: VLMClientModel, method: Method, ctx: ClientContext, rows: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Per row of a generative VLM: its answer generated greedily (rows of one task together, at most
    the task's generation budget: its longest valid answer in the LM's tokens), parsed and scored by
    the task's family with the protocol's ``vlm.vqa_metric``; an answer the family cannot parse scores
    0 (``method.generate`` writes them: the model's greedy generation unless the method mixes
    per row). Also, when the model routes (its connector is a mixture, applied once per prompt), each row's
    routing weights [rows, E], else None; and each row's status bits."""
    model.eval()
    table, metric = ctx.store.table, ctx.protocol.vlm.vqa_metric
    scores, status = np.zeros(len(rows), dtype=np.float64), np.zeros(len(rows), dtype=np.int8)
    routing: np.ndarray | None = None
    with autocast(ctx.store.device, ctx.amp):
        for spec in model.tasks:
            family = family_of(spec)
            where = np.flatnonzero(table.task[rows] == spec.name)
            for i in range(0, len(where), batch_size):
                at = where[i : i + batch_size]
                batch, cached = ctx.inputs(model, rows[at])
                texts, cut = method.generate(model, batch, cached, ctx.store.generation_budget[spec.name], ctx)
                for j, row, text, was_cut in zip(at, rows[at], texts, cut, strict=True):
                    scores[j], parsed = family.score_text(spec, table, int(row), text, metric)
                    status[j] = (0 if parsed else UNPARSED) | (CUT if was_cut else 0)
                if model.routing is not None:  # the prompts' routing (the connector runs on the prefill)
                    if routing is None:  # NaN marks rows that did not route, should some not
                        routing = np.full((len(rows), model.routing.shape[1]), np.nan)
                    routing[at] = model.routing.detach().float().cpu().numpy()
    return scores, routing, status


def state_only(method: Method) -> bool:
    """True when a client's global-test scores are a function of its loaded parameters alone: the
    method keeps the default per-client hooks (no ``prepare_client`` structure, no ``encode_images``
    that reads the client's context, e.g. FedDPA's references, no two-message download). Any
    override may make the forward depend on the client (its tasks, OCR, stage, data), so then no
    score is ever reused."""
    kind = type(method)
    return (
        kind.prepare_client is Method.prepare_client
        and kind.encode_images is Method.encode_images
        and not method.two_messages
    )


def model_digest(model: ClientModel) -> str:
    """SHA-256 of every trainable parameter and every buffer (name, dtype, shape, bytes): what the
    loaded state can change of the model (frozen parameters are never written by a client step)."""
    h = hashlib.sha256()
    tensors = [(n, p) for n, p in model.named_parameters() if p.requires_grad] + list(model.named_buffers())
    for name, t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class GlobalScores:
    """The global-test scores of the distinct client models of one evaluation round (client side):
    clients whose models are provably identical (:func:`state_only` methods, equal
    :func:`model_digest`) are scored once; a new round starts afresh."""

    round: int = -1
    scores: dict[str, tuple[np.ndarray, np.ndarray | None, np.ndarray | None]] = field(default_factory=dict)
    hits: int = 0

    def key(self, model: ClientModel, method: Method, r: int) -> str | None:
        """The model's key in round ``r``, or None where reuse is not proven safe."""
        if r != self.round:
            self.round, self.scores = r, {}
        return model_digest(model) if state_only(method) else None


def eval_clients(cfg: EvalConfig, seed: int, r: int, num_clients: int, final: bool) -> list[int]:
    """The clients the evaluation after round ``r`` scores: all at the last round or with
    ``eval.clients = "all"``; else a seeded sample (its own stream per round, the same on every
    backend and method row, so rows are compared on the same clients)."""
    k = cfg.sample_size(num_clients)
    if final or k >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng(derive_seed(seed, r, "eval-sample"))
    return sorted(rng.choice(num_clients, size=k, replace=False).tolist())


def coverage(cfg: EvalConfig, sampled: int, scored: int, num_clients: int) -> dict[str, Any]:
    """Fields of an evaluated round's ``global`` records under a sampled ``eval.clients`` (none with
    the default, so those records read as before): how many clients were sampled and scored (a
    dropped one is not), of how many, and whether the round was a sample."""
    if not cfg.sampled:
        return {}
    return {
        "eval_sampled": sampled < num_clients,
        "sampled_clients": sampled,
        "scored_clients": scored,
        "registered_clients": num_clients,
    }


def eval_records(
    records: RunRecords,
    r: int,
    infos: Sequence[ClientInfo],
    replies: Sequence[EvalReply],
    task_names: Sequence[str],
    expert_names: list[str],
    extra: dict[str, Any] | None = None,
) -> list[dict]:
    """Every client's model (its own state + what the server sends a client asking for every task),
    scored on its own test split (scope ``client``) and on the global test set of every task (scope
    ``client_global``, with ``held`` telling own tasks: P averages those, TTP all). A task's
    ``global`` score is the mean over the clients that hold it; its ``per_example`` lists, per
    global-test row in table order, that mean of the row's correctness, so rows of one seed (same
    table) are paired example by example for the bootstrap. ``extra`` (:func:`coverage`) is added to
    the ``global`` records."""
    table = records.table
    global_rows = table.rows(split=GLOBAL_TEST)
    rows, per_task, usage, routed, failed = [], {}, {}, {}, {}
    for info, reply in zip(infos, replies, strict=True):
        own = table.rows(client=info.client, split=TEST)
        for task in info.tasks:
            rows.append(records.eval_row(r, "client", info.client, task, "test", reply.own[table.task[own] == task]))
        if reply.routing is not None:
            routed[info.client] = reply.routing
        for task in task_names:
            mask = table.task[global_rows] == task
            row = records.eval_row(r, "client_global", info.client, task, "global_test", reply.global_[mask])
            rows.append({**row, "held": task in info.tasks})
            if task in info.tasks:
                per_task.setdefault(task, []).append(reply.global_[mask])
                if reply.global_status is not None:
                    failed.setdefault(task, []).append(reply.global_status[mask])
                if reply.routing is not None:
                    usage.setdefault(task, []).append(reply.routing[mask].mean(0))
    for task, per_client in per_task.items():
        rows.append(
            {
                **records.eval_row(r, "global", GLOBAL_CLIENT, task, "global_test", np.array([])),
                "value": float(np.mean([float(c.mean()) for c in per_client])),
                "n": len(per_client[0]),
                "clients": len(per_client),
                "per_example": np.mean(per_client, 0).round(6).tolist(),
                **generation_rates(failed.get(task)),
                **(extra or {}),
            }
        )
    return rows + records.usage(r, expert_names, usage, routed, table.task[global_rows])


def generation_rates(status: list[np.ndarray] | None) -> dict[str, float]:
    """A generative VLM's task: the fraction of its generated answers that could not be parsed
    (``parse_fail``: scored 0) and that hit ``max_new_tokens`` (``cut``), averaged over the clients
    holding the task as its score is; nothing for a model that does not generate."""
    if not status:
        return {}
    return {
        "parse_fail": float(np.mean([((s & UNPARSED) > 0).mean() for s in status])),
        "cut": float(np.mean([((s & CUT) > 0).mean() for s in status])),
    }


def asking_every_task(info: ClientInfo, task_names: Sequence[str]) -> ClientInfo:
    """The client as the server sees it at evaluation: asking for every task (for TTP)."""
    return dataclasses.replace(info, tasks=tuple(task_names))
