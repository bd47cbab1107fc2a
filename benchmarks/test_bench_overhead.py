"""Harness overhead (issue 10, deliverable 4.1): one round of ``fedavg-lora`` through fedbench (the
server loop, serialized messages, the byte ledger, records and the checkpoint) vs a bare PyTorch loop
that trains the same modules on the same client batches for the same steps and averages them.
Target: fedbench / bare <= 1.10.

Run: ``pytest benchmarks/test_bench_overhead.py --benchmark-enable -s`` (the ``default`` protocol's
sizes: 4 clients x 10 steps of 32 rows through the image tower). With ``--benchmark-disable`` (CI)
it runs a tiny protocol once each way, only to check that it executes. Nothing asserts a time.
"""

from __future__ import annotations

import torch
from best_time import best_seconds_interleaved

from fedbench.api.data import TRAIN, PartitionConfig
from fedbench.backends.inprocess import in_process
from fedbench.config.protocol import EvalConfig, LocalConfig, MethodEntry, Protocol
from fedbench.config.toml_file import load
from fedbench.runtime.client import build_model, trainable_state
from fedbench.runtime.server import Federation, Run
from fedbench.staging.prepare import prepare
from fedbench.utils.records import append_records
from fedbench.utils.seeding import derive_seed, sample_clients

SHORT = Protocol(
    name="bench-overhead-short",
    seeds=(0,),
    rounds=1,
    methods=(MethodEntry("fedavg-lora"),),
    data=PartitionConfig(num_clients=2, train_images=4, test_images=2, global_test_images=4, tasks_per_client=2),
    local=LocalConfig(steps=2, batch_size=4),
    eval=EvalConfig(every=0, batch_size=64),
)


def _fedbench_round(run: Run):
    """Round 0 as ``Run._execute`` runs it: sample, messages, train, upload, aggregate, records and
    checkpoint (the model, the client runtime and the federation are built once, outside the timer)."""
    model = run.build()
    tags = run.method.tags(model)
    init = trainable_state(model)
    fed = Federation(
        run.method.init_server_state(model),
        init,
        run.prep.infos,
        {n for n, t in tags.items() if t == "shared"},
        {n for n, t in tags.items() if t == "local"},
    )
    run._resume(fed)  # builds the backend (the client's model) and wires its store, outside the timer

    def one_round() -> None:
        rows = run._round(0, model, fed)
        append_records(run.records_path, rows)
        run.checkpoint.save(1, fed.server, run.backend.client_states(), fed.init)

    return one_round


def _bare_round(prep, model, init: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same clients, rows, steps and optimiser in a plain loop; then the example-weighted mean."""
    proto = prep.protocol
    params = dict(model.named_parameters())
    sums: dict[str, torch.Tensor] = {}
    total = 0
    for c in sample_clients(prep.seed, 0, len(prep.plans), proto.clients.sample_fraction):
        with torch.no_grad():
            for n, t in init.items():
                params[n].copy_(t)
        rows = prep.table.rows(client=c, split=TRAIN)
        trainable = [params[n] for n in init]
        opt = torch.optim.AdamW(trainable, lr=proto.local.lr, weight_decay=proto.local.weight_decay)
        gen = torch.Generator().manual_seed(derive_seed(prep.seed, 0, c, "train"))
        torch.manual_seed(derive_seed(prep.seed, 0, c, "train", "dropout"))
        model.train()
        bs = min(proto.local.batch_size, len(rows))
        for _ in range(proto.local.steps):
            pick = rows[torch.randint(len(rows), (bs,), generator=gen).numpy()]
            loss = model.loss(prep.store.batch(pick))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for n in init:
            sums[n] = sums.get(n, 0) + params[n].detach() * len(rows)
        total += len(rows)
    return {n: s / total for n, s in sums.items()}


def test_one_fedavg_lora_round_vs_a_bare_loop(benchmark, tmp_path):
    short = bool(getattr(benchmark, "disabled", False))
    proto = SHORT if short else load("default").replace(methods=(MethodEntry("fedavg-lora"),), rounds=1)
    prep = prepare(proto, 0, device=torch.device("cpu"))
    repeat = 1 if short else 3
    through_fedbench = _fedbench_round(Run(prep, MethodEntry("fedavg-lora"), tmp_path / "fedbench", backend=in_process))
    run = Run(prep, MethodEntry("fedavg-lora"), tmp_path / "bare", backend=in_process)
    model = build_model(prep, run.method)
    init = trainable_state(model)
    bare, harness = best_seconds_interleaved([lambda: _bare_round(prep, model, init), through_fedbench], repeat)
    benchmark.pedantic(through_fedbench, rounds=1, iterations=1)
    ratio = harness / bare
    benchmark.extra_info.update({"bare_s": bare, "fedbench_s": harness, "ratio": ratio, "target": 1.10})
    print(f"\nharness overhead: fedbench {harness:.3f} s / bare loop {bare:.3f} s = {ratio:.3f} (target <= 1.10)")
