"""GPU path check (issue 10, deliverable 7): host syncs inside a training step, and the step's time
with and without bfloat16 autocast, for a tower-LoRA row and rows after the frozen towers.

Run on a CUDA machine from the repository root: ``python scripts/gpu_check.py OUT.json``. Times come
from CUDA events (median of timed steps after warm-up); host syncs are counted with
``torch.cuda.set_sync_debug_mode("warn")``, which warns once per synchronizing call. On a machine
without CUDA it runs on the CPU and says so (no syncs to count, process-free wall time).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings
from dataclasses import replace

import torch

from fedbench.api.data import TRAIN
from fedbench.backends.inprocess import in_process
from fedbench.config.protocol import MethodEntry
from fedbench.config.toml_file import load
from fedbench.runtime.server import Run
from fedbench.runtime.training import client_context
from fedbench.staging.prepare import prepare
from fedbench.utils.precision import autocast

METHODS = ("fedavg-lora", "feddpa", "pilot-ctmoa", "mmrouter-moa", "fedmix")
TIMED = 20


def step_fn(prep, name: str, stage2: bool = False):
    """One local training step of client 0 as the harness runs it (a fresh closure per call), and the
    model it trains; ``stage2``: a task-expert row's second stage (its stage-1 participations done)."""
    run = Run(prep, MethodEntry(name), "/tmp/gpu_check_unused", backend=in_process)
    model = run.build().train()
    ctx = client_context(prep, prep.infos[0], 0)
    if stage2:
        ctx = replace(ctx, participations=run.method.options.stage1_participations)
    run.method.prepare_client(model, ctx)
    rows = prep.table.rows(client=0, split=TRAIN)
    gen = torch.Generator().manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step() -> None:
        pick = rows[torch.randint(len(rows), (prep.protocol.local.batch_size,), generator=gen).numpy()]
        with autocast(prep.device, prep.amp):  # as ctx.train runs it: the run's resources.amp
            loss = model.loss(*ctx.inputs(model, pick))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, model


def timed(step, cuda: bool) -> float:
    for _ in range(5):
        step()
    times = []
    for _ in range(TIMED):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def syncs_per_step(step) -> float:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        for _ in range(5):
            step()
        torch.cuda.set_sync_debug_mode("default")
    return len([w for w in caught if "synchroniz" in str(w.message)]) / 5


def main(out: str) -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    proto = load("default")
    modes = ("off", "auto") if cuda else ("off",)  # auto: bfloat16 autocast on a CUDA device that has it
    preps = {
        mode: prepare(proto.replace(resources=replace(proto.resources, amp=mode)), 0, device=device) for mode in modes
    }
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", "timer": "cuda_events" if cuda else "wall"}
    for name in METHODS:
        row = {}
        for prep in preps.values():
            label = "bf16" if prep.amp is not None else "fp32"
            step, _ = step_fn(prep, name)
            row[f"step_ms_{label}"] = round(timed(step, cuda) * 1000, 2)
            if cuda:
                row[f"syncs_per_step_{label}"] = syncs_per_step(step)
        report[name] = row
        print(name, row, flush=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu_check.json")
