"""The server loop, shared by every backend: sampling, download, aggregation, evaluation schedule,
the byte ledger, records and checkpoints. It reaches clients only through a :class:`Backend`,
which moves :class:`~fedbench.runtime.client.Message` bytes to the client step and its replies back.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedbench.api.data import ClientInfo
from fedbench.api.method import Method, Reply, count_params, create_method
from fedbench.api.payload import Payload, analytic_bytes, check_upload, deserialize, serialize
from fedbench.config.protocol import MethodEntry
from fedbench.runtime.backend import Backend, Progress, no_progress
from fedbench.runtime.checkpoint import Checkpoint, CheckpointMismatch, truncate_records
from fedbench.runtime.client import Message, State, build_model, trainable_state
from fedbench.runtime.evaluation import asking_every_task, coverage, eval_clients, eval_records
from fedbench.runtime.faults import ERROR, NONFINITE, ClientFault, error_line, nonfinite, plan_faults
from fedbench.runtime.pooled import pooled_round
from fedbench.runtime.run_records import RunRecords
from fedbench.staging.prepare import Prepared
from fedbench.utils.flops import FlopMeter
from fedbench.utils.integrity import IntegrityError
from fedbench.utils.records import GENESIS, DirectoryLock, append_records, incomplete_run, read_jsonl, scan_records
from fedbench.utils.seeding import sample_clients
from fedbench.utils.timing import device_label

__all__ = ["FATAL", "CheckpointMismatch", "Federation", "Run", "failure_record", "fault_summary", "run_id_for"]


def run_id_for(entry: MethodEntry, seed: int, protocol: Any) -> str:
    slug = re.sub(r"[^A-Za-z0-9._=+-]+", "_", entry.label)
    return f"{slug}__seed{seed}__{protocol.hash}"


@dataclass
class Federation:
    """What the server holds between rounds: its state, the initial state every client starts
    from (one seeded build), what it may know of every client, and the tag sets it checks with."""

    server: Payload
    init: State
    infos: list[ClientInfo]
    shared: set[str]
    local: set[str]


# errors of the machine or of files on it, not of a method row: they stop the whole run at once
FATAL: tuple[type[BaseException], ...] = (CheckpointMismatch, IntegrityError, OSError)


class Run:
    """One (method row, seed) run of a protocol, resumable from its last completed round."""

    def __init__(
        self,
        prep: Prepared,
        entry: MethodEntry,
        results_dir: Path,
        progress: Progress = no_progress,
        *,
        backend: Callable[[Run], Backend],
    ) -> None:
        self.prep, self.entry, self.progress = prep, entry, progress
        self.protocol = prep.protocol
        self.method: Method = create_method(entry.name, entry.options)
        self.run_id = run_id_for(entry, prep.seed, self.protocol)
        self.dir = Path(results_dir) / "runs" / self.run_id
        self.records_path = self.dir / "records.jsonl"
        self.checkpoint = Checkpoint(self.dir / "checkpoint.json")
        self.records = RunRecords(
            self.run_id, entry, prep.seed, self.protocol, prep.table, device_label(prep.device, prep.amp)
        )
        self._make_backend = backend
        self._backend: Backend | None = None
        self.pooled_flops = FlopMeter()  # a reference row that trains on the server counts here

    @property
    def backend(self) -> Backend:
        """Built on first use, by the factory the run was handed (a completed run, skipped, never
        starts one)."""
        if self._backend is None:
            self._backend = self._make_backend(self)
        return self._backend

    def completed(self) -> bool:
        """Its records hold a completed ``kind="run"`` record, their seals verify and the run is whole
        (:func:`fedbench.utils.records.incomplete_run`); a run whose records are damaged runs again (its
        resume keeps what verifies)."""
        if not self.records_path.is_file():
            return False
        scan = scan_records(self.records_path)
        done = any(r.get("kind") == "run" and r.get("completed") for r in scan.rows)
        return done and scan.whole and incomplete_run(scan.rows) is None

    def build(self):
        return build_model(self.prep, self.method)

    def execute(self, wait: bool = True) -> str | None:
        """Run (or resume, or skip when complete); returns the run id. The run directory is locked
        while it runs: when another process holds it, wait for it (then skip or resume what it left),
        or with ``wait`` False return None at once. A row that raises leaves a ``kind="failed"``
        record (its first error line) for the leaderboard, then the error propagates."""
        if self.completed():
            self.progress("skip", {"run_id": self.run_id})
            return self.run_id
        lock = DirectoryLock(self.dir)
        on_wait = lambda holder: self.progress("wait", {"run_id": self.run_id, "holder": holder})  # noqa: E731
        if not lock.acquire(wait, on_wait):
            return None
        try:
            if self.completed():  # the other process finished it while this one waited
                self.progress("skip", {"run_id": self.run_id})
                return self.run_id
            self._execute()
        except FATAL:
            raise
        except Exception as err:
            append_records(self.records_path, [failure_record(self.records.common(), err)])
            raise
        finally:
            lock.release()
        return self.run_id

    def _execute(self) -> None:
        model = self.build()
        tags = self.method.tags(model)
        bad = {n: t for n, t in tags.items() if t not in ("shared", "local")}
        if bad:
            raise ValueError(
                f"method '{self.entry.name}' tagged {next(iter(bad))!r} as "
                f"{next(iter(bad.values()))!r}; tags are shared|local"
            )
        init = trainable_state(model)
        fed = Federation(
            server=self.method.init_server_state(model),
            init=init,
            infos=self.prep.infos,
            shared={n for n, t in tags.items() if t == "shared"},
            local={n for n, t in tags.items() if t == "local"},
        )
        start = self._resume(fed)
        rounds = self.protocol.rounds
        self.progress("start", {"run_id": self.run_id, "label": self.entry.label, "rounds": rounds, "start": start})
        for r in range(start, rounds):
            rows = self._round(r, model, fed)
            if (r + 1) == rounds or (self.protocol.eval.every and (r + 1) % self.protocol.eval.every == 0):
                rows += self._evaluate(r, model, fed)
            n, last = self.checkpoint.covers or (0, GENESIS)
            seal = append_records(self.records_path, rows)
            self.checkpoint.covers = (n + len(rows), seal if rows else last)  # what the checkpoint covers
            self.checkpoint.save(r + 1, fed.server, self.backend.client_states(), fed.init)
            self.progress("round", {"run_id": self.run_id, "round": r + 1, "rounds": rounds})
        self._finish(model, tags)

    def _resume(self, fed: Federation) -> int:
        """The round to start from: after the checkpoint's, with the records of later rounds dropped
        (a kill between append and checkpoint); 0 when there is none or the backend cannot resume.
        The checkpoint must match the sealed records (else :class:`IntegrityError`); records that
        do not reach it (cut short, or changed before it) start the run again from round 0
        (:func:`fedbench.runtime.checkpoint.truncate_records`)."""
        start, server, head = 0, None, None
        if self.backend.client_states() is not None:  # the clients' states go to the run's store, on disk
            loaded = self.checkpoint.load(fed.init)
            self.backend.restore(self.checkpoint.clients)
            if loaded is not None:
                start, server = loaded
                head = self.checkpoint.covers
        manifest = self.checkpoint.path if server is not None else None
        kept = truncate_records(self.records_path, start, head, manifest)
        if kept.start != start:  # the rounds before the checkpoint's are lost from the records
            self.checkpoint.discard()
            self.backend.restore(self.checkpoint.clients)
            self.progress("restart", {"run_id": self.run_id, "round": start})
        elif server is not None:
            fed.server = server
            self.progress("resume", {"run_id": self.run_id, "round": start})
        self.checkpoint.covers = (kept.rows, kept.seal)
        return kept.start

    # --- one round ------------------------------------------------------------------------------
    def _exchange(
        self,
        fed: Federation,
        clients: Sequence[int],
        r: int,
        evaluating: bool,
        plan: dict[int, ClientFault] | None = None,
    ) -> list[Message]:
        """The download of each client, as it crosses the wire (for a two-message download: the
        request and the answer too), with each message's byte ledger in ``self._wire``. A client that
        ``plan`` drops gets its first download (counted) and is then recorded as dropped: it never
        replies; a straggler's message carries the local steps it will run.

        A payload made of the very tensors (same objects, views and versions) of one already sent
        this call is serialized once and its bytes reused (e.g. the one download every FedAvg-LoRA
        client receives at evaluation): the same bytes, the same ledger, a thousand times cheaper."""
        messages, self._wire, askers = [], {}, {}
        plan = plan or {}
        wire_cache: dict[tuple, tuple[Payload, bytes, int]] = {}

        def wire(payload: Payload) -> tuple[bytes, int]:
            key = tuple(
                (n, id(t), t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version)
                for n, t in payload.items()
            )
            if key not in wire_cache:  # the payload is kept, so no id in a key is reused this call
                wire_cache[key] = (payload, serialize(payload), analytic_bytes(payload))
            return wire_cache[key][1:]

        for c in clients:
            info = fed.infos[c]
            askers[c] = asking_every_task(info, self.prep.store.task_names) if evaluating else info
            down = self.method.download(fed.server, askers[c])
            blob, down_analytic = wire(down)
            fault = plan.get(c)
            steps = fault.steps if fault is not None and fault.steps != self.protocol.local.steps else None
            msg = Message(c, r, blob, None, evaluating, steps)
            self._wire[c] = {
                "up_bytes": 0,
                "down_bytes": len(blob),
                "up_bytes_analytic": 0,
                "down_bytes_analytic": down_analytic,
            }
            if fault is not None and fault.drop is not None:
                self._dropped(
                    msg, "train", fault.drop, fault.reason(self.protocol.faults), fault.record(self.protocol.faults)
                )
                continue
            messages.append(msg)
        if self.method.two_messages and messages:
            kept = []
            for msg, ask_blob in zip(messages, self.backend.query(messages), strict=True):
                if ask_blob is None:
                    fault = plan.get(msg.client)
                    self._dropped(msg, "query", extra=fault.record(self.protocol.faults) if fault else None)
                    continue
                ask = deserialize(ask_blob)
                check_upload(ask, fed.shared, fed.local, self.entry.name)
                more = self.method.answer(fed.server, askers[msg.client], ask)
                msg.more, more_analytic = wire(more)
                ledger = self._wire[msg.client]
                ledger["up_bytes"] += len(ask_blob)
                ledger["down_bytes"] += len(msg.more)
                ledger["up_bytes_analytic"] += analytic_bytes(ask)
                ledger["down_bytes_analytic"] += more_analytic
                ledger["request"] = {k: v.tolist() for k, v in ask.items()}
                kept.append(msg)
            messages = kept
        return messages

    def _round(self, r: int, model, fed: Federation) -> list[dict]:
        """Sample, download, train, upload, aggregate (updates ``fed`` in place); train records."""
        if not self.method.federated:
            return pooled_round(self, r, model, fed)
        sampled = sample_clients(self.prep.seed, r, len(fed.infos), self.protocol.clients.sample_fraction)
        self._drops: list[dict] = []
        faults = self.protocol.faults
        plan = plan_faults(self.prep.seed, r, sampled, faults, self.protocol.local.steps) if faults.active else {}
        messages = self._exchange(fed, sampled, r, evaluating=False, plan=plan)
        replies, rows = [], []
        for msg, reply in zip(messages, self.backend.train(messages) if messages else (), strict=True):
            c, info = msg.client, fed.infos[msg.client]
            extra = plan[c].record(faults) if c in plan else {}
            if reply is None:
                self._dropped(msg, "train", extra=extra)
                continue
            up = deserialize(reply.upload)
            check_upload(up, fed.shared, fed.local, self.entry.name)
            wire = self._wire[c]
            wire["up_bytes"] += len(reply.upload)
            wire["up_bytes_analytic"] += analytic_bytes(up)
            record = self.records.train(
                r,
                c,
                wire,
                reply.compute_s,
                reply.timer,
                reply.n_examples,
                reply.record,
                reply.flops,
            )
            bad = nonfinite(up)
            if bad:  # received and counted, but left out of the aggregation
                error = (
                    f"non-finite values (NaN or Inf) in uploaded tensor(s) {bad[:3]}{' ...' if len(bad) > 3 else ''}"
                )
                self._drops.append(
                    {**record, **extra, "dropped": True, "phase": "train", "error": error, "fault": NONFINITE}
                )
                continue
            replies.append(Reply(info, up, reply.n_examples))
            rows.append({**record, **extra})
            self.progress("client", {"run_id": self.run_id, "round": r, "client": c})
        if replies:  # a round without one valid update keeps the previous server state
            fed.server = self.method.aggregate(fed.server, replies)
        return rows + self._drops

    def _dropped(
        self, msg: Message, phase: str, fault: str = ERROR, reason: str | None = None, extra: dict | None = None
    ) -> None:
        """A client that sent no reply: its process died, it timed out, its step raised (``fault``
        ``error``, with the backend's reason), or the round's faults dropped it (``dropout``,
        ``deadline``). In training: a ``kind="train"`` record with ``dropped: true`` keeps the ledger
        exact (its download was sent, nothing came back); in evaluation: a ``kind="drop"`` record
        (its scores are left out)."""
        reason = self.backend.drop_reason(msg.client) if reason is None else reason
        if msg.evaluating:
            drop = {**self.records.common(), "kind": "drop", "round": msg.round, "client": msg.client}
            self._drops.append({**drop, "phase": phase, "error": reason, "fault": fault})
            self.progress("drop", {"run_id": self.run_id, "round": msg.round, "client": msg.client, "error": reason})
            return
        record = self.records.train(msg.round, msg.client, self._wire[msg.client], 0.0, "none", 0, {})
        self._drops.append(
            {**record, **(extra or {}), "dropped": True, "phase": phase, "error": reason, "fault": fault}
        )
        if fault == ERROR:
            self.progress("drop", {"run_id": self.run_id, "round": msg.round, "client": msg.client, "error": reason})

    def _evaluate(self, r: int, model, fed: Federation) -> list[dict]:
        """Every registered client's model after round ``r`` (after an intermediate round, the seeded
        sample ``eval.clients`` asks for), scored by the client step (a client that drops out of
        evaluation is left out of the round's scores and recorded)."""
        self._drops = []
        cfg, n = self.protocol.eval, len(fed.infos)
        clients = eval_clients(cfg, self.prep.seed, r, n, final=r + 1 == self.protocol.rounds)
        messages = self._exchange(fed, clients, r, evaluating=True)
        scored = [
            (fed.infos[msg.client], reply)
            for msg, reply in zip(messages, self.backend.evaluate(messages), strict=True)
            if reply is not None or self._dropped(msg, "evaluate")
        ]
        infos, replies = [i for i, _ in scored], [e for _, e in scored]
        names, extra = self.prep.store.task_names, coverage(cfg, len(clients), len(replies), n)
        return eval_records(self.records, r, infos, replies, names, model.expert_names, extra) + self._drops

    def _finish(self, model, tags: dict[str, str]) -> None:
        rows = self.records.finish(
            self.prep.majority,
            self.method.federated,
            count_params(model, tags),
            self.method.options,
            self.prep.backbone,
            self.prep.plans,
            self.backend.name,
        )
        summary = fault_summary(read_jsonl(self.records_path))
        if summary or self.protocol.faults.active:
            rows[-1] = {**rows[-1], "faults": summary}
        append_records(self.records_path, rows)
        self.checkpoint.remove()


def fault_summary(rows: Iterable[dict]) -> dict[str, int]:
    """Per fault kind, how many client rounds it hit (train records with ``dropped``, stragglers) and
    how many evaluations dropped; empty for a run without any."""
    out: dict[str, int] = {}
    for row in rows:
        if row.get("kind") == "train" and row.get("dropped"):
            key = row.get("fault", ERROR)
        elif row.get("kind") == "train" and row.get("straggler"):
            key = "straggler"
        elif row.get("kind") == "drop":
            key = "eval_drop"
        else:
            continue
        out[key] = out.get(key, 0) + 1
    return out


def failure_record(common: dict[str, Any], err: BaseException) -> dict[str, Any]:
    """The ``kind="failed"`` record of a row that raised: the first line of the error (what the
    leaderboard shows), its type, and the traceback's last lines."""
    trace = traceback.format_exception(err)
    return {
        **common,
        "kind": "failed",
        "error": error_line(err),
        "error_type": type(err).__name__,
        "traceback": "".join(trace[-6:])[-4000:],
    }
