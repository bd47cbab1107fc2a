"""Shared fixtures: a tiny protocol on the embedded suite and backbone (CPU, seconds)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from fedbench.api.backbone import create_backbone
from fedbench.api.data import PartitionConfig
from fedbench.api.payload import deserialize
from fedbench.backends.inprocess import InProcessBackend, in_process
from fedbench.config.protocol import EvalConfig, LocalConfig, MethodEntry, Protocol
from fedbench.runtime.client import ClientRuntime, Message, TrainReply
from fedbench.runtime.server import Run
from fedbench.runtime.training import client_context
from fedbench.staging.prepare import prepare
from fedbench.utils.records import read_jsonl

TINY = Protocol(
    name="tiny",
    seeds=(0,),
    rounds=2,
    methods=(MethodEntry("fedavg-lora"),),
    data=PartitionConfig(num_clients=3, train_images=8, test_images=4, global_test_images=6, tasks_per_client=2),
    local=LocalConfig(steps=2, batch_size=8),
    eval=EvalConfig(every=1, batch_size=64),
)


@pytest.fixture(scope="session")
def backbone():
    torch.set_num_threads(1)
    return create_backbone("embedded", "cpu")


@pytest.fixture(scope="session")
def tiny_prep(backbone):
    return prepare(TINY, 0, backbone=backbone, device=torch.device("cpu"))


@pytest.fixture
def train_client():
    """One client's local update as the harness runs it: context, prepare_client, local_update."""

    def run_update(run, model, info, round_=0):
        ctx = client_context(run.prep, info, round_)
        run.method.prepare_client(model, ctx)
        run.method.local_update(model, ctx)
        return ctx

    return run_update


class RecordingRuntime(ClientRuntime):
    """The client step as the in-process backend runs it, noting the tensor names of every message a
    client received (download, and the answer of a two-message one) and sent (request, upload)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.received: list[set[str]] = []
        self.sent: list[set[str]] = []

    def query(self, msg: Message) -> bytes:
        blob = super().query(msg)
        self.sent.append(set(deserialize(blob)))
        return blob

    def train(self, msg: Message) -> TrainReply:
        self.received.append(set(deserialize(msg.down)) | set(deserialize(msg.more or b"")))
        reply = super().train(msg)
        self.sent.append(set(deserialize(reply.upload)))
        return reply


@dataclass
class TinyRun:
    """A completed run of TINY (2 rounds, evaluated after each) and what its clients exchanged."""

    run: Run
    records: list[dict]
    runtime: RecordingRuntime

    def of(self, kind: str) -> list[dict]:
        return [r for r in self.records if r["kind"] == kind]


@pytest.fixture(scope="session")
def tiny_run(tiny_prep, tmp_path_factory):
    """``tiny_run(name)``: the registered method ``name`` with its default options, run once per
    session on TINY (the end-to-end test over the registry and the method files' record checks share it)."""
    done: dict[str, TinyRun] = {}
    base = tmp_path_factory.mktemp("tiny_runs")

    def get(name: str) -> TinyRun:
        if name not in done:
            run = Run(tiny_prep, MethodEntry(name), base / name, backend=lambda r: InProcessBackend(r.runtime))
            run.runtime = RecordingRuntime(tiny_prep, run.method)
            run.execute()
            done[name] = TinyRun(run, read_jsonl(run.records_path), run.runtime)
        return done[name]

    return get


def kill_in_round(prep, results, monkeypatch, at: int, method: str) -> Run:
    """Run ``method`` until round ``at`` starts (its checkpoint is after round ``at - 1``), then die
    as a KeyboardInterrupt would; returns the killed Run."""
    original = Run._round

    def crash(self, r, *args, **kwargs):
        if r == at:
            raise KeyboardInterrupt
        return original(self, r, *args, **kwargs)

    monkeypatch.setattr(Run, "_round", crash)
    run = Run(prep, MethodEntry(method), results, backend=in_process)
    with pytest.raises(KeyboardInterrupt):
        run.execute()
    monkeypatch.setattr(Run, "_round", original)
    return run
