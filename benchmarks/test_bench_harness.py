"""Speed of the harness's hot paths, reported as ratios against a baseline measured in the same run.

Run: ``pytest benchmarks/ --benchmark-enable -s``. Nothing here asserts a time; the ratio lands in
each benchmark's ``extra_info`` (and in ``--benchmark-json``).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from best_time import best_seconds

from fedbench.api.data import GLOBAL_TEST, TRAIN, PartitionConfig
from fedbench.api.payload import serialize
from fedbench.backends.inprocess import in_process
from fedbench.config.protocol import LocalConfig, MethodEntry, Protocol
from fedbench.runtime.evaluation import evaluate_rows
from fedbench.runtime.server import Run
from fedbench.runtime.training import client_context
from fedbench.staging.prepare import prepare

PROTO = Protocol(
    name="bench",
    data=PartitionConfig(num_clients=2, train_images=32, test_images=8, global_test_images=48),
    local=LocalConfig(steps=1, batch_size=32),
)


@pytest.fixture(scope="module")
def prep():
    return prepare(PROTO, 0, device=torch.device("cpu"))


def _measured(benchmark) -> float:
    """The benchmark's best time; NaN under ``--benchmark-disable`` (it ran once, untimed)."""
    return benchmark.stats.stats.min if benchmark.stats else float("nan")


def test_eval_encodes_each_image_once(benchmark, prep, tmp_path):
    """Evaluation encodes unique images once for all their task rows; baseline encodes per row."""
    run = Run(prep, MethodEntry("fedavg-lora"), tmp_path, backend=in_process)
    model = run.build()
    rows = prep.table.rows(split=GLOBAL_TEST)

    def per_row_baseline():
        with torch.no_grad():
            for i in range(0, len(rows), 128):
                batch = prep.store.batch(rows[i : i + 128])
                model(batch, cached=model.backbone.encode_image(batch.images))  # the tower once per row

    baseline = best_seconds(per_row_baseline, 3)
    ctx = client_context(run.prep, prep.infos[0], 0)
    benchmark(evaluate_rows, model, run.method, ctx, rows, 128)
    benchmark.extra_info["baseline_s"] = baseline
    benchmark.extra_info["speedup_vs_per_row"] = baseline / _measured(benchmark)


def test_train_step_runs_the_tower_once_per_distinct_image(benchmark, prep, tmp_path):
    """A LoRA training step (loss + backward through the tower) on a batch drawn with replacement from a
    client's rows, as the harness draws it: the tower once per distinct image vs once per row."""
    run = Run(prep, MethodEntry("fedavg-lora"), tmp_path, backend=in_process)
    model = run.build().train()
    train_rows = prep.table.rows(client=0, split=TRAIN)
    pick = train_rows[torch.randint(len(train_rows), (32,), generator=torch.Generator().manual_seed(0)).numpy()]
    batch = prep.store.batch(pick)

    def step(cached=None):
        model.zero_grad(set_to_none=True)
        model.loss(batch, cached).backward()

    baseline = best_seconds(lambda: step(model.backbone.encode_image(batch.images)), 3)
    benchmark(step)
    benchmark.extra_info["distinct_images_per_batch"] = len(np.unique(batch.image_index.numpy()))
    benchmark.extra_info["baseline_s"] = baseline
    benchmark.extra_info["speedup_vs_per_row"] = baseline / _measured(benchmark)


def test_safetensors_payload_vs_torch_save(benchmark, prep, tmp_path):
    """The wire format: safetensors serialization against torch.save of the same payload."""
    run = Run(prep, MethodEntry("fedavg-lora"), tmp_path, backend=in_process)
    payload = run.method.upload(run.build(), prep.infos[0])

    def torch_save():
        buf = io.BytesIO()
        torch.save(payload, buf)
        return buf.getvalue()

    baseline = best_seconds(torch_save)
    blob = benchmark(serialize, payload)
    benchmark.extra_info["baseline_s"] = baseline
    benchmark.extra_info["speed_ratio_vs_torch_save"] = baseline / _measured(benchmark)
    benchmark.extra_info["size_ratio_vs_torch_save"] = len(blob) / len(torch_save())
    assert np.isfinite(benchmark.extra_info["size_ratio_vs_torch_save"])
