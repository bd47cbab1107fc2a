"""The records of one run: every field a leaderboard reads, built the same way on every backend."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fedbench.api.data import ExampleTable
from fedbench.api.registry import TASKS
from fedbench.config.protocol import MethodEntry, Protocol
from fedbench.runtime.provenance import code_digest, git_commit, library_versions, machine
from fedbench.runtime.router_diagnostics import routing_entropy, task_expert_mi
from fedbench.staging.partition import partition_summary


class RunRecords:
    """Builds the ``kind`` = train / eval / usage / routing / majority / run records of one run."""

    def __init__(
        self, run_id: str, entry: MethodEntry, seed: int, protocol: Protocol, table: ExampleTable, device: str
    ) -> None:
        self.run_id, self.entry, self.seed, self.protocol, self.table, self.device = (
            run_id,
            entry,
            seed,
            protocol,
            table,
            device,
        )

    def common(self) -> dict[str, Any]:
        p = self.protocol
        return {
            "run_id": self.run_id,
            "method": self.entry.name,
            "label": self.entry.label,
            "seed": self.seed,
            "protocol": p.name,
            "protocol_hash": p.hash,
            "git_commit": git_commit(),
            "code_digest": code_digest(p, self.entry),
            "suite": p.data.suite,
            "synthetic": bool(self.table.synthetic),
            "device": self.device,
            "versions": library_versions(),
        }

    def train(
        self,
        r: int,
        client: int,
        wire: dict[str, Any],
        compute_s: float,
        timer: str,
        n_examples: int,
        extra: dict[str, Any],
        flops: int = 0,
    ) -> dict:
        """One ``kind="train"`` record: the message bytes (``wire``), the compute time and FLOPs
        (:mod:`fedbench.utils.flops`; exact whether a step was counted or predicted, so the record says
        not which: that depends on what the process metered before), plus the method's own fields
        (:meth:`Method.train_record`), which may not overwrite the harness's."""
        record = {
            **self.common(),
            "kind": "train",
            "round": r,
            "client": client,
            **wire,
            "compute_s": compute_s,
            "timer": timer,
            "compute_flops": flops,
            "n_examples": n_examples,
        }
        clash = sorted(set(extra) & set(record))
        if clash:
            raise ValueError(f"method '{self.entry.name}' train_record overwrites harness field(s) {clash}")
        return {**record, **extra}

    def eval_row(self, r: int, scope: str, client: int, task: str, split: str, correct: np.ndarray) -> dict:
        spec = TASKS.get(task)
        return {
            **self.common(),
            "kind": "eval",
            "round": r,
            "scope": scope,
            "client": client,
            "task": task,
            "split": split,
            "metric": spec.metric,
            "value": float(correct.mean()) if len(correct) else float("nan"),
            "n": len(correct),
        }

    def usage(
        self,
        r: int,
        expert_names: list[str],
        usage: dict[str, list[np.ndarray]],
        routed: dict[int, np.ndarray],
        task: np.ndarray,
    ) -> list[dict]:
        """Expert-usage matrix: mean routing weight per (task, expert) on the global test set,
        averaged over the clients that hold the task. Then, per client (``routed``: its routing
        weights on every global-test row, whose tasks are ``task``), how much its router specialises:
        the mean per-row routing entropy and I(task; expert), both in nats, over all tasks (each
        client is asked for every task, as for TTP), so every client's figure has the same range."""
        common = self.common()
        matrix = [
            {**common, "kind": "usage", "round": r, "task": t, "expert": expert, "value": float(value)}
            for t, per_client in sorted(usage.items())
            for expert, value in zip(expert_names, np.mean(per_client, 0), strict=True)
        ]
        stats = [
            {
                **common,
                "kind": "routing",
                "round": r,
                "client": client,
                "entropy": routing_entropy(weights),
                "mutual_info": task_expert_mi(weights, task),
                "n": len(weights),
            }
            for client, weights in sorted(routed.items())
        ]
        return matrix + stats

    def finish(
        self,
        majority: dict[str, float],
        federated: bool,
        counts: dict[str, int],
        options: Any,
        backbone: Any,
        plans: list,
        backend: str,
    ) -> list[dict]:
        """The majority reference rows and the ``kind="run"`` record that marks the run complete."""
        common = self.common()
        rows = [{**common, "kind": "majority", "task": t, "value": v} for t, v in majority.items()]
        rows.append(
            {
                **common,
                "kind": "run",
                "completed": True,
                "federated": federated,
                "rounds": self.protocol.rounds,
                "tasks": list(self.protocol.tasks),
                **counts,
                "options": dataclasses.asdict(options),
                "protocol_config": self.protocol.as_dict(),
                "backbone": backbone.name,
                "backbone_meta": backbone.meta,
                "partition": [p.as_record() for p in plans],
                "partition_summary": partition_summary(self.table),
                "data_fingerprint": self.table.fingerprint(),
                "machine": machine(),
                "backend": backend,
            }
        )
        return rows
