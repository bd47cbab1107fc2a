"""The two whole-federation reference rows: ``local-only`` (nothing sent) and ``centralized``
(pooled rows, not federated, equal gradient steps)."""

import dataclasses

import numpy as np
import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from fedbench.api.data import GLOBAL_CLIENT, TRAIN
from fedbench.api.payload import deserialize, serialize
from fedbench.backends.inprocess import in_process
from fedbench.config.protocol import ClientsConfig, MethodEntry
from fedbench.reporting.board import build_leaderboard
from fedbench.runtime.checkpoint import Checkpoint
from fedbench.runtime.server import Run
from fedbench.runtime.training import TrainingContext
from fedbench.utils.records import read_jsonl, read_records
from fedbench.utils.seeding import sample_clients


def _capture_states(monkeypatch):
    """Every round's server state and stored client states, as checkpointed."""
    seen = []
    save = Checkpoint.save

    def capture(self, next_round, server, clients, init):
        clone = lambda state: {n: t.clone() for n, t in state.items()}  # noqa: E731
        seen.append((clone(server), {c: clone(s) for c, s in clients.items()}))
        save(self, next_round, server, clients, init)

    monkeypatch.setattr(Checkpoint, "save", capture)
    return seen


def _differ(a, b):
    return any(not torch.equal(a[n], b[n]) for n in a)


def test_an_empty_payload_is_no_message():
    assert serialize({}) == b"" and deserialize(b"") == {}
    assert len(serialize({"x": torch.zeros(1)})) > 0


def test_local_only_sends_nothing_and_every_client_keeps_its_own_model(tiny_prep, tmp_path, monkeypatch):
    # every client sampled every round, so all 3 train (2 rounds x 3 clients = 6 train records)
    prep = dataclasses.replace(tiny_prep, protocol=tiny_prep.protocol.replace(clients=ClientsConfig(1.0)))
    seen = _capture_states(monkeypatch)
    run = Run(prep, MethodEntry("local-only"), tmp_path, backend=in_process)
    model = run.build()
    assert set(run.method.tags(model).values()) == {"local"}
    assert run.method.init_server_state(model) == {}
    assert all(run.method.download({}, info) == {} and run.method.upload(model, info) == {} for info in prep.infos)
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    run.execute()
    rows = read_jsonl(run.records_path)
    train = [r for r in rows if r["kind"] == "train"]
    assert [(r["round"], r["client"]) for r in train] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    ledger = ("up_bytes", "down_bytes", "up_bytes_analytic", "down_bytes_analytic")
    assert all(r[k] == 0 for r in train for k in ledger)
    run_row = next(r for r in rows if r["kind"] == "run")
    assert run_row["federated"] is True and run_row["params_shared"] == 0 and run_row["params_local"] > 0

    assert len(seen) == 2
    assert all(server == {} for server, _ in seen)  # the server state never changes: it holds nothing
    clients = seen[-1][1]
    assert sorted(clients) == [0, 1, 2]
    for a in clients:
        assert _differ(clients[a], init)
        for b in clients:
            if a < b:
                assert _differ(clients[a], clients[b]), f"clients {a} and {b} share a state"
    # each client is evaluated on its own stored model
    cg = [r for r in rows if r["kind"] == "eval" and r["scope"] == "client_global" and r["round"] == 1]
    assert len({r["client"] for r in cg}) == 3


def test_centralized_trains_the_pooled_rows_with_equal_steps(tiny_prep, tmp_path, monkeypatch):
    calls, picks, inside = [], [], []
    train, inputs = TrainingContext.train, TrainingContext.inputs

    def spy_train(self, model, params, phase="train"):
        calls.append((self.round, self.info, self.train_rows.copy(), self.protocol.local.steps))
        inside.append(True)
        try:
            return train(self, model, params, phase)
        finally:
            inside.pop()

    def spy_inputs(self, model, rows):
        if inside and not is_in_torch_dispatch_mode():  # the FLOP counter's dry runs are not steps
            picks.append((self.round, np.asarray(rows).copy()))
        return inputs(self, model, rows)

    monkeypatch.setattr(TrainingContext, "train", spy_train)
    monkeypatch.setattr(TrainingContext, "inputs", spy_inputs)
    seen = _capture_states(monkeypatch)
    run = Run(tiny_prep, MethodEntry("centralized"), tmp_path, backend=in_process)
    run.execute()

    table, proto = tiny_prep.table, tiny_prep.protocol
    pooled = table.rows(split=TRAIN)
    union = np.sort(np.concatenate([table.rows(client=i.client, split=TRAIN) for i in tiny_prep.infos]))
    assert np.array_equal(np.sort(pooled), union)
    # TINY: 3 clients, fraction 0.5 -> round(1.5) = 2 sampled per round; local.steps = 2 -> 4 steps a round
    sampled = [sample_clients(0, r, 3, 0.5) for r in range(2)]
    assert [len(s) for s in sampled] == [2, 2]
    assert [(r, info.client, steps) for r, info, _, steps in calls] == [(0, GLOBAL_CLIENT, 4), (1, GLOBAL_CLIENT, 4)]
    assert all(np.array_equal(rows, pooled) for _, _, rows, _ in calls)
    assert calls[0][1].tasks == tuple(tiny_prep.store.task_names) and calls[0][1].num_examples == len(pooled)
    assert [r for r, _ in picks] == [0, 0, 0, 0, 1, 1, 1, 1]  # one batch per optimizer step
    drawn = np.concatenate([p for _, p in picks])
    assert len(drawn) == 8 * min(proto.local.batch_size, len(pooled)) and set(drawn) <= set(pooled)
    owners = {int(table.client[i]) for i in drawn}
    assert len(owners) > 1  # the batches mix clients' rows

    rows = read_jsonl(run.records_path)
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [(r["round"], r["client"], r["steps"], r["sampled"]) for r in train_rows] == [
        (0, GLOBAL_CLIENT, 4, sampled[0]),
        (1, GLOBAL_CLIENT, 4, sampled[1]),
    ]
    assert all(r["federated"] is False and r["up_bytes"] == r["down_bytes"] == 0 for r in train_rows)
    assert all(r["n_examples"] == len(pooled) for r in train_rows)
    assert next(r for r in rows if r["kind"] == "run")["federated"] is False

    # the pooled model is the server state, changed every round, and no client stores a state
    assert len(seen) == 2 and all(clients == {} for _, clients in seen)
    assert _differ(seen[0][0], seen[1][0])
    # evaluated as every client's model: every client scores the same on each global task
    last = [r for r in rows if r["kind"] == "eval" and r["scope"] == "client_global" and r["round"] == 1]
    by_task = {}
    for r in last:
        by_task.setdefault(r["task"], set()).add(r["value"])
    assert set(by_task) == set(tiny_prep.store.task_names) and all(len(v) == 1 for v in by_task.values())
    assert {r["client"] for r in rows if r["kind"] == "eval" and r["scope"] == "client"} == {0, 1, 2}
    assert any(r["kind"] == "eval" and r["scope"] == "global" for r in rows)


def test_leaderboard_shows_centralized_bytes_as_na_and_local_only_as_zero(tiny_prep, tmp_path):
    """(Resuming a killed centralized run is tested with the other resume tests, in test_runs.py.)"""
    Run(tiny_prep, MethodEntry("centralized"), tmp_path / "clean", backend=in_process).execute()
    Run(tiny_prep, MethodEntry("local-only"), tmp_path / "clean", backend=in_process).execute()
    board = build_leaderboard(read_records(tmp_path / "clean")).set_index("method")
    for col in ("up_mb_per_round", "down_mb_per_round", "total_mb"):
        assert np.isnan(board.loc["centralized", col])
        assert board.loc["local-only", col] == 0
    assert not np.isnan(board.loc["centralized", "mean_acc"])  # scored like every row
