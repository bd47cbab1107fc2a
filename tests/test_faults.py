"""Faults a federation survives: dropout, stragglers, a round deadline (protocol options, seeded on
the server, the same on every backend), a client whose update is NaN or whose local update raises,
and a round without a single valid update."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fedbench.backends.inprocess import in_process
from fedbench.config.protocol import ClientsConfig, FaultsConfig, MethodEntry, ProtocolError
from fedbench.config.toml_file import from_dict
from fedbench.runtime.checkpoint import Checkpoint
from fedbench.runtime.faults import plan_faults
from fedbench.runtime.server import Run
from fedbench.runtime.training import TrainingContext
from fedbench.utils.records import read_jsonl
from fedbench.utils.seeding import sample_clients

ALL = ClientsConfig(sample_fraction=1.0)  # every client in every round: each fault hits someone


def _prep(tiny_prep, faults: FaultsConfig | None = None, clients: ClientsConfig = ALL):
    proto = tiny_prep.protocol.replace(faults=faults or FaultsConfig(), clients=clients)
    return dataclasses.replace(tiny_prep, protocol=proto)


def _train(rows):
    return [r for r in rows if r["kind"] == "train"]


def _run(prep, tmp_path, name="fedavg-lora", **kwargs):
    run = Run(prep, MethodEntry(name), tmp_path, **{"backend": in_process, **kwargs})
    run.execute()
    return run, read_jsonl(run.records_path)


def _server_states(monkeypatch):
    """The server state after every round, as checkpointed."""
    states = []
    save = Checkpoint.save

    def capture(self, next_round, server, clients, init):
        states.append({n: t.clone() for n, t in server.items()})
        save(self, next_round, server, clients, init)

    monkeypatch.setattr(Checkpoint, "save", capture)
    return states


# --- the protocol table -------------------------------------------------------------------------------
def test_fault_free_protocols_keep_their_hash_and_faults_change_it(tiny_prep):
    proto = tiny_prep.protocol
    assert proto.replace(faults=FaultsConfig()).hash == proto.hash and "faults" not in proto.as_dict()
    hashes = {proto.replace(faults=FaultsConfig(**{k: v})).hash for k, v in [("dropout", 0.1), ("deadline", 3.0)]}
    assert len(hashes) == 2 and proto.hash not in hashes
    loaded = from_dict({"rounds": 2, "faults": {"dropout": 0.25, "stragglers": 0.5, "straggler_steps": 0.2}})
    assert loaded.faults == FaultsConfig(0.25, 0.5, 0.2, 0.0) and loaded.as_dict()["faults"]["dropout"] == 0.25


@pytest.mark.parametrize(
    ("table", "needle"),
    [
        ({"dropout": 1.0}, "'faults.dropout' = 1.0 is invalid: expected a probability in [0, 1)"),
        ({"stragglers": -0.1}, "'faults.stragglers' = -0.1 is invalid"),
        ({"straggler_steps": 0}, "'faults.straggler_steps' = 0.0 is invalid: expected a fraction of local.steps"),
        ({"deadline": -1}, "'faults.deadline' = -1.0 is invalid"),
        ({"dropuot": 0.1}, "unknown protocol field 'faults.dropuot'. Valid fields: faults.dropout"),
    ],
)
def test_bad_fault_options_are_refused_in_one_line(table, needle):
    with pytest.raises(ProtocolError) as err:
        from_dict({"faults": table})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_the_plan_is_seeded_and_one_fault_does_not_move_another():
    clients = list(range(200))
    a = plan_faults(0, 3, clients, FaultsConfig(dropout=0.3, stragglers=0.4), 10)
    assert a == plan_faults(0, 3, clients, FaultsConfig(dropout=0.3, stragglers=0.4), 10)
    assert a != plan_faults(1, 3, clients, FaultsConfig(dropout=0.3, stragglers=0.4), 10)
    dropped = {c for c, f in a.items() if f.drop}
    assert 40 < len(dropped) < 80 and all(a[c].steps == 0 for c in dropped)
    slow = {c for c, f in a.items() if f.straggler}
    assert slow == {c for c, f in plan_faults(0, 3, clients, FaultsConfig(stragglers=0.4), 10).items() if f.straggler}
    assert all(a[c].steps == 5 for c in slow - dropped) and all(a[c].steps == 10 for c in set(a) - slow - dropped)
    late = plan_faults(0, 3, clients, FaultsConfig(stragglers=0.4, straggler_steps=0.25, deadline=20), 10)
    assert {c for c, f in late.items() if f.drop == "deadline"} == slow  # 10 / 0.25 = 40 > 20 >= 10
    assert all(late[c].steps == 10 for c in set(late) - slow)


# --- faults on a tiny run --------------------------------------------------------------------------------
def test_dropout_is_recorded_paired_across_rows_and_the_round_goes_on(tiny_prep, tmp_path):
    prep = _prep(tiny_prep, FaultsConfig(dropout=0.4))
    runs = {name: _run(prep, tmp_path, name)[1] for name in ("fedavg-lora", "ffa-lora")}
    drops = {}
    for name, rows in runs.items():
        train = _train(rows)
        out = [r for r in train if r.get("dropped")]
        assert out and all(r["fault"] == "dropout" and r["up_bytes"] == 0 and r["down_bytes"] > 0 for r in out)
        assert all("faults.dropout = 0.4" in r["error"] for r in out)
        assert len(train) == prep.protocol.rounds * len(prep.infos)  # every sampled client has a record
        drops[name] = {(r["round"], r["client"]) for r in out}
        assert rows[-1]["kind"] == "run" and rows[-1]["faults"] == {"dropout": len(out)}
        assert any(r["kind"] == "eval" and r["round"] == prep.protocol.rounds - 1 for r in rows)
    assert drops["fedavg-lora"] == drops["ffa-lora"]  # the same clients drop in every row: rows stay paired


def test_stragglers_run_part_of_their_steps_and_say_so(tiny_prep, tmp_path, monkeypatch):
    steps_run = {}
    train = TrainingContext.train

    def count(self, model, params, *args, **kwargs):
        steps_run[(self.round, self.info.client)] = self.protocol.local.steps
        return train(self, model, params, *args, **kwargs)

    monkeypatch.setattr(TrainingContext, "train", count)
    prep = _prep(tiny_prep, FaultsConfig(stragglers=0.5, straggler_steps=0.5))
    _, rows = _run(prep, tmp_path)
    train_rows = _train(rows)
    slow = [r for r in train_rows if r["straggler"]]
    assert slow and all(r["steps"] == 1 and not r.get("dropped") and r["up_bytes"] > 0 for r in slow)
    assert all(r["steps"] == 2 for r in train_rows if not r["straggler"])
    assert steps_run == {(r["round"], r["client"]): r["steps"] for r in train_rows}
    assert rows[-1]["faults"] == {"straggler": len(slow)}


def test_a_deadline_drops_the_stragglers_that_miss_it(tiny_prep, tmp_path):
    prep = _prep(tiny_prep, FaultsConfig(stragglers=0.5, straggler_steps=0.5, deadline=3.0))
    _, rows = _run(prep, tmp_path)
    train = _train(rows)
    late = [r for r in train if r.get("dropped")]
    assert late and all(r["fault"] == "deadline" and r["straggler"] and r["sim_time"] == 4.0 for r in late)
    assert all("missed the deadline (4 > faults.deadline = 3" in r["error"] for r in late)
    assert all(r["steps"] == 2 and r["sim_time"] == 2.0 for r in train if not r["straggler"])


def test_a_round_without_a_valid_update_keeps_the_server_state(tiny_prep, tmp_path, monkeypatch):
    states = _server_states(monkeypatch)
    prep = _prep(tiny_prep, FaultsConfig(deadline=1.0))  # shorter than anyone's 2 local steps
    run, rows = _run(prep, tmp_path)
    assert all(r["dropped"] and r["fault"] == "deadline" for r in _train(rows))
    start = run.method.init_server_state(run.build())
    assert len(states) == 2 and all(torch.equal(s[n], start[n]) for s in states for n in start)
    assert rows[-1]["completed"] and any(r["kind"] == "eval" for r in rows)


def _break(run: Run, client: int, how: str) -> None:
    """Client ``client``'s local update in round 0 ends in NaN weights or raises."""
    update = run.method.local_update

    def broken(model, ctx):
        update(model, ctx)
        if (ctx.round, ctx.info.client) == (0, client):
            if how == "raise":
                raise RuntimeError("boom: CUDA out of memory\nsecond line")
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(math.nan)

    run.method.local_update = broken


@pytest.mark.parametrize("how", ["nan", "raise"])
def test_a_nan_update_or_a_raising_client_is_left_out_and_recorded(tiny_prep, tmp_path, monkeypatch, how):
    states = _server_states(monkeypatch)
    prep = _prep(tiny_prep)
    events = []
    run = Run(
        prep, MethodEntry("fedavg-lora"), tmp_path, progress=lambda e, i: events.append((e, i)), backend=in_process
    )
    _break(run, 1, how)
    run.execute()
    rows = read_jsonl(run.records_path)
    (bad,) = [r for r in _train(rows) if r.get("dropped")]
    assert (bad["round"], bad["client"]) == (0, 1)
    if how == "nan":
        assert bad["fault"] == "nonfinite" and "non-finite values" in bad["error"] and bad["up_bytes"] > 0
        assert 1 not in run.backend.client_states() or all(
            torch.isfinite(t).all() for t in run.backend.client_states()[1].values()
        )  # the client keeps its last finite state
    else:
        assert bad["fault"] == "error" and bad["error"] == "RuntimeError: boom: CUDA out of memory"
        assert bad["up_bytes"] == 0 and [i["client"] for e, i in events if e == "drop"] == [1]
    assert all(torch.isfinite(t).all() for s in states for t in s.values())  # never aggregated
    assert len(_train(rows)) == 2 * len(prep.infos) and rows[-1]["completed"]
    assert rows[-1]["faults"] == {"nonfinite" if how == "nan" else "error": 1}


def test_the_server_samples_as_before_under_faults(tiny_prep):
    """Faults never change who is sampled: the plan is drawn for the sampled clients."""
    proto = _prep(tiny_prep, FaultsConfig(dropout=0.5), ClientsConfig(0.5)).protocol
    for r in range(3):
        sampled = sample_clients(0, r, 3, proto.clients.sample_fraction)
        assert sorted(plan_faults(0, r, sampled, proto.faults, 2)) == sampled


def test_faults_give_the_same_records_through_flower_messages(tiny_prep, tmp_path, monkeypatch):
    """Faults are decided on the server: the Flower backend (its real ClientApp handlers, over a
    grid in this process) carries a straggler's step count and gives the in-process records."""
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity
    from test_flower import BACKEND_FIELDS, FakeGrid

    from fedbench.backends.flower import FlowerBackend

    for field in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, field, 1)
    prep = _prep(tiny_prep, FaultsConfig(dropout=0.3, stragglers=0.5))
    _, local = _run(prep, tmp_path / "inprocess")
    grid = FakeGrid(len(prep.plans), failing=set())
    _, flower = _run(prep, tmp_path / "flower", backend=lambda run: FlowerBackend(grid, "flower-sim", run))
    strip = lambda r: {k: v for k, v in r.items() if k not in BACKEND_FIELDS}  # noqa: E731
    assert [strip(r) for r in local] == [strip(r) for r in flower]
    assert any(r.get("straggler") and r["steps"] == 1 for r in local) and any(r.get("dropped") for r in local)
