"""Evaluation: a client scores its model on rows (client side); the server turns every client's
scores into eval, usage and routing records (the same assembly on every backend)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedbench.context import ClientContext
from fedbench.data import GLOBAL_CLIENT, GLOBAL_TEST, TEST, ClientInfo
from fedbench.method import Method
from fedbench.model import ClientModel, sub_batch
from fedbench.run_records import RunRecords


@dataclass
class EvalReply:
    """One client's scores after a round: per row of its own test split and of the global test set
    (1.0 = correct, in table order), and its routing weights on the global test set, if it routes."""

    own: np.ndarray
    global_: np.ndarray
    routing: np.ndarray | None


@torch.no_grad()
def evaluate_rows(
    model: ClientModel, method: Method, ctx: ClientContext, rows: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per row: 1.0 where the model answers correctly (IoU >= 0.5 for boxes); images encoded once.

    Also returns, when the model routes, each row's routing weights over experts [rows, E] (what the
    expert-usage matrix and the routing entropy / mutual information are computed from); else None.
    """
    model.eval()
    out = np.zeros(len(rows), dtype=np.float64)
    routing: np.ndarray | None = None
    if len(rows) == 0:
        return out, routing
    images, position = np.unique(ctx.store.image_index[rows].numpy(), return_inverse=True)
    image_ids = torch.as_tensor(images)
    if model.uses_backbone_grad() or type(method).encode_images is not Method.encode_images:
        parts = [
            method.encode_images(model, image_ids[i : i + batch_size], ctx) for i in range(0, len(images), batch_size)
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
            out[i + idx.cpu().numpy()] = head.correct(head_out, sub_batch(batch, idx)).cpu().numpy()
        if model.routing is not None:
            weights = model.routing.detach().cpu().numpy()
            if routing is None:  # NaN marks rows of a batch that did not route, should one not
                routing = np.full((len(rows), weights.shape[1]), np.nan)
            routing[i : i + len(chunk)] = weights
    return out, routing


def eval_records(
    records: RunRecords,
    r: int,
    infos: Sequence[ClientInfo],
    replies: Sequence[EvalReply],
    task_names: Sequence[str],
    expert_names: list[str],
) -> list[dict]:
    """Every client's model (its own state + what the server sends a client asking for every task),
    scored on its own test split (scope ``client``) and on the global test set of every task (scope
    ``client_global``, with ``held`` telling own tasks: P averages those, TTP all). A task's
    ``global`` score is the mean over the clients that hold it; its ``per_example`` lists, per
    global-test row in table order, that mean of the row's correctness, so rows of one seed (same
    table) are paired example by example for the bootstrap."""
    table = records.table
    global_rows = table.rows(split=GLOBAL_TEST)
    rows, per_task, usage, routed = [], {}, {}, {}
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
            }
        )
    return rows + records.usage(r, expert_names, usage, routed, table.task[global_rows])


def asking_every_task(info: ClientInfo, task_names: Sequence[str]) -> ClientInfo:
    """The client as the server sees it at evaluation: asking for every task (for TTP)."""
    return dataclasses.replace(info, tasks=tuple(task_names))
