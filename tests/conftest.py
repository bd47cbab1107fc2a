"""Shared fixtures: a tiny protocol on the embedded suite and backbone (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch

from fedbench.backbone import create_backbone
from fedbench.context import client_context
from fedbench.data import PartitionConfig
from fedbench.protocol import EvalConfig, LocalConfig, MethodEntry, Protocol
from fedbench.staging import prepare

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
