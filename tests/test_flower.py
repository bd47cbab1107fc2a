"""The Flower backends give the in-process numbers: same accuracies (example by example), same bytes.

Flower's simulation engine runs each client step in a Ray worker process; the server loop and the
client step are the ones the in-process backend calls, so on CPU the records must be identical, not
close. Also: a reply that is an error (or missing) is a dropped client, recorded, and the round
goes on without it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY

from fedbench.backends.flower import FlowerBackend, run_flower_sim
from fedbench.backends.flower_deploy import LocalDeployment, run_flower_deploy, write_protocol
from fedbench.backends.inprocess import in_process
from fedbench.config.protocol import MethodEntry
from fedbench.runtime.rows import run_rows
from fedbench.runtime.server import Run
from fedbench.utils.records import read_jsonl
from fedbench.utils.seeding import sample_clients

PARITY_METHODS = ("fedavg-lora", "feddpa", "pilot-ctmoa", "mmrouter-moa")
BACKEND_FIELDS = {"compute_s", "backend", "machine", "up_bytes_flower", "down_bytes_flower"}


def _records(results: Path) -> dict[str, list[dict]]:
    return {p.parent.name: read_jsonl(p) for p in sorted(results.glob("runs/*/records.jsonl"))}


def _same(a: dict, b: dict) -> dict:
    return {k: v for k, v in a.items() if k not in BACKEND_FIELDS}, {
        k: v for k, v in b.items() if k not in BACKEND_FIELDS
    }


# scored once, after the last round: a deployment starts a process per message (Flower 1.42)
PARITY = dataclasses.replace(
    TINY, methods=tuple(MethodEntry(m) for m in PARITY_METHODS), eval=dataclasses.replace(TINY.eval, every=0)
)


def _noop(event, info):
    return None


@pytest.fixture(scope="module")
def inprocess(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("inprocess")
    start = time.perf_counter()
    run_rows(PARITY, root, backend=in_process)
    print(f"\ninprocess: {time.perf_counter() - start:.1f} s wall")
    return _records(root)


@pytest.mark.parametrize("backend", ["flower-sim", "flower-deploy"])
def test_flower_records_equal_the_in_process_ones(inprocess, backend, tmp_path):
    torch.set_num_threads(1)
    start = time.perf_counter()
    (run_flower_sim if backend == "flower-sim" else run_flower_deploy)(PARITY, tmp_path, _noop)
    print(f"\n{backend}: {time.perf_counter() - start:.1f} s wall")
    _check_parity(inprocess, _records(tmp_path), backend)


def _check_parity(inprocess, flower, backend):
    assert sorted(inprocess) == sorted(flower) and len(inprocess) == len(PARITY_METHODS)
    print("run | round | client | up_bytes (both) | up_bytes_flower | down_bytes (both) | down_bytes_flower")
    for run_id, rows in inprocess.items():
        other = flower[run_id]
        assert len(rows) == len(other), run_id
        for a, b in zip(rows, other, strict=True):
            left, right = _same(a, b)
            assert left == right, (run_id, a["kind"], a.get("round"))
            if a["kind"] == "train":
                # Flower's count: each array serialized (.npy, its own header) + key names; ours: the
                # safetensors length (one JSON header). Both hold at least the tensor data.
                assert b["up_bytes_flower"] >= a["up_bytes_analytic"] > 0
                assert b["down_bytes_flower"] >= a["down_bytes_analytic"] > 0
                print(
                    f"{a['label']} | {a['round']} | {a['client']} | {a['up_bytes']} | {b['up_bytes_flower']} | "
                    f"{a['down_bytes']} | {b['down_bytes_flower']}"
                )
        assert other[-1]["kind"] == "run" and other[-1]["backend"] == backend
        assert rows[-1]["backend"] == "inprocess"
    evals = [r for rows in flower.values() for r in rows if r["kind"] == "eval" and r["scope"] == "global"]
    assert evals and all(len(r["per_example"]) == r["n"] > 0 for r in evals)


class FakeGrid:
    """A Flower grid whose nodes answer through a real ClientApp handler in this process, except
    ``failing`` partitions, which answer with an error (what Flower returns when a ClientApp raises)."""

    def __init__(self, n: int, failing: set[int]) -> None:
        from flwr.app import Context, RecordDict

        self.nodes = {1000 + p: p for p in range(n)}
        self.failing = failing
        self.context = {
            node: Context(0, node, {"partition-id": p, "num-partitions": n}, RecordDict(), {})
            for node, p in self.nodes.items()
        }
        self.replies = {}

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        from flwr.app import Error, Message

        from fedbench.backends import flower

        handlers = {
            "query.setup": flower._setup,
            "query.request": flower._request,
            "train": flower._train,
            "evaluate": flower._evaluate,
        }
        ids = []
        for msg in messages:
            mid = f"message-{len(self.replies)}"
            msg.metadata.__dict__["_message_id"] = mid  # what the SuperLink assigns on push
            node = msg.metadata.dst_node_id
            if self.nodes[node] in self.failing and msg.metadata.message_type != "query.setup":
                self.replies[mid] = Message(Error(code=2, reason="ClientApp raised: boom"), reply_to=msg)
            else:
                self.replies[mid] = handlers[msg.metadata.message_type](msg, self.context[node])
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(mid) for mid in message_ids if mid in self.replies]


def test_an_error_reply_is_a_recorded_drop_and_the_round_goes_on(tiny_prep, tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for field in ("_run_id", "_node_id", "_task_id"):  # what Flower's runtime sets in its processes
        monkeypatch.setattr(TaskIdentity, field, 1)
    grid = FakeGrid(len(tiny_prep.plans), failing={1})
    run = Run(
        tiny_prep, MethodEntry("fedavg-lora"), tmp_path, backend=lambda run: FlowerBackend(grid, "flower-sim", run)
    )
    rows = read_jsonl(tmp_path / "runs" / run.execute() / "records.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    dropped = [r for r in train if r.get("dropped")]
    assert dropped and all(r["client"] == 1 and r["up_bytes"] == 0 and r["down_bytes"] > 0 for r in dropped)
    assert all("boom" in r["error"] for r in dropped)
    kept = [r for r in train if not r.get("dropped")]
    assert kept and all(r["up_bytes"] > 0 for r in kept)
    drops = [r for r in rows if r["kind"] == "drop"]
    assert {r["client"] for r in drops} == {1} and all(r["phase"] == "evaluate" for r in drops)
    scored = {r["client"] for r in rows if r["kind"] == "eval" and r["scope"] == "client"}
    assert 1 not in scored and scored
    assert rows[-1]["kind"] == "run" and rows[-1]["completed"]
    json.dumps(rows)  # every record stays JSON


def test_a_supernode_killed_mid_run_is_a_recorded_drop(tmp_path):
    """A real deployment on loopback: SuperNode ``victim`` is killed once round 0 is recorded; the
    rounds go on with the others, and its missing replies are drops with the SuperLink's reason."""
    proto = dataclasses.replace(TINY, rounds=3, eval=dataclasses.replace(TINY.eval, every=0))
    victim = next(c for c in range(3) if c in sample_clients(0, 1, 3, 0.5) and c in sample_clients(0, 2, 3, 0.5))
    results = tmp_path / "results"
    with LocalDeployment(proto.data.num_clients, tmp_path / "work") as cluster:
        run_id = cluster.submit(write_protocol(proto, results), results)
        records = lambda: [r for p in results.glob("runs/*/records.jsonl") for r in read_jsonl(p)]  # noqa: E731
        deadline = time.monotonic() + 300
        while not any(r["kind"] == "train" for r in records()) and time.monotonic() < deadline:
            time.sleep(0.2)
        cluster.kill_node(victim)
        status = cluster.wait(run_id, timeout=600)
    assert status == "finished:completed", cluster.log(run_id)
    rows = records()
    dropped = [r for r in rows if r.get("dropped")]
    assert dropped and {r["client"] for r in dropped} == {victim}
    assert all(r["round"] >= 1 and r["up_bytes"] == 0 and r["error"] for r in dropped)
    for r in {r["round"] for r in dropped}:  # the round completed with the others
        assert any(t["round"] == r and not t.get("dropped") for t in rows if t["kind"] == "train")
    assert {r["client"] for r in rows if r["kind"] == "drop"} == {victim}  # not scored at the end
    assert rows[-1]["kind"] == "run" and rows[-1]["completed"]
