"""The round of a reference row that is not federated (``centralized``): one trainer on the
pooled training rows, on the server, whatever the backend."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from fedbench.api.data import GLOBAL_CLIENT, TRAIN, ClientInfo
from fedbench.api.model import ClientModel
from fedbench.runtime.client import load_state, trainable_state
from fedbench.runtime.training import TrainingContext
from fedbench.utils.seeding import sample_clients
from fedbench.utils.timing import ComputeTimer

if TYPE_CHECKING:
    from fedbench.runtime.server import Federation, Run


def pooled_round(run: Run, r: int, model: ClientModel, fed: Federation) -> list[dict]:
    """A reference row that is not federated (``Method.federated`` False): one trainer on the
    union of every client's training rows (all tasks; OCR as each row has it) for ``local.steps``
    × (clients sampled this round) steps, so it takes as many gradient steps as a federated row.
    It trains on the server, whatever the backend. Nothing is sent: one train record per round
    with 0 bytes and ``federated: false``. The pooled model's trainable state is ``fed.server``,
    so the run's evaluation scores it as every client's."""
    proto, prep, method = run.protocol, run.prep, run.method
    sampled = sample_clients(prep.seed, r, len(fed.infos), proto.clients.sample_fraction)
    train_rows = prep.table.rows(split=TRAIN)
    steps = proto.local.steps * len(sampled)
    held = {t for info in fed.infos for t in info.tasks}
    info = ClientInfo(
        GLOBAL_CLIENT,
        tuple(t for t in prep.store.task_names if t in held),
        any(i.has_ocr for i in fed.infos),
        len(train_rows),
    )
    pooled = proto.replace(local=dataclasses.replace(proto.local, steps=steps))
    ctx = TrainingContext(info, r, prep.store, train_rows, pooled, prep.seed, prep.features, amp=prep.amp)
    load_state(model, fed.init, fed.server)
    method.prepare_client(model, ctx)
    with ComputeTimer(prep.device) as timer, run.pooled_flops as flops:
        method.local_update(model, ctx)
    fed.server = trainable_state(model)
    for c in sampled:  # the clients whose share of steps the pooled trainer took
        run.progress("client", {"run_id": run.run_id, "round": r, "client": c})
    nothing = {"up_bytes": 0, "down_bytes": 0, "up_bytes_analytic": 0, "down_bytes_analytic": 0}
    extra = method.train_record(model, ctx)
    record = run.records.train(
        r, GLOBAL_CLIENT, nothing, timer.seconds, timer.kind, len(train_rows), extra, flops.total
    )
    return [{**record, "federated": False, "steps": steps, "sampled": sampled}]
