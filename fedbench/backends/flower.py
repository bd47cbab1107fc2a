"""The Flower backends: the same server loop and client step, with Flower (flwr >= 1.42, Message
API) moving the messages.

- ``flower-sim``: Flower's simulation engine (Ray), one SuperNode per client (partition).
- ``flower-deploy``: a SuperLink and one SuperNode process per client, the ServerApp and ClientApp
  below run as a real deployment (see :mod:`fedbench.backends.flower_deploy`).

What travels: each fedbench message becomes a Flower ``Message`` whose ``RecordDict`` holds the
payload tensors as ``ArrayRecord`` s (``down``, ``more``; replies ``upload``, ``ask``, ``scores``),
and a ``ConfigRecord`` saying which protocol, seed, method row, client and round it belongs to (so
any worker process can stage the same data; it carries no tensor). The byte ledger stays the
server's: the safetensors length of each payload, exactly as in process; Flower's own count of
each message's arrays (``ArrayRecord.count_bytes()``: array payload + key names) is recorded
beside it as ``up_bytes_flower`` / ``down_bytes_flower``.

Client sampling is fedbench's seeded sampler over partition ids (Flower samples node ids from the
global ``random``); node ids are mapped to partition ids once, by asking every node. A client's
stored state stays on its node, one safetensors file per partition id under the node's state
directory (a shared :class:`~fedbench.runtime.client_store.ClientStore`), and never travels. A reply that
is an error, or missing at the deadline, is a dropped client: counted and recorded, and the round
goes on without it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fedbench.api.method import create_method
from fedbench.api.payload import deserialize, serialize
from fedbench.config.protocol import Protocol
from fedbench.config.toml_file import from_dict
from fedbench.runtime.backend import Progress
from fedbench.runtime.client import ClientRuntime, Message, State, TrainReply
from fedbench.runtime.client_store import ClientStore
from fedbench.runtime.evaluation import EvalReply
from fedbench.runtime.rows import run_rows
from fedbench.runtime.server import Run
from fedbench.staging.prepare import Prepared, prepare

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read when flwr is imported: no network calls

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.app import Message as FlowerMessage
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

REPLY_TIMEOUT_S = 3600.0  # a client that has not replied by then is dropped for the round
NODES_TIMEOUT_S = 120.0  # how long the server waits for every SuperNode to register
POLL_S = 0.05  # between pulls of replies (Flower's own send_and_receive sleeps 3 s)


def _arrays(payload: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in payload.items()})


def _tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict()) if len(record) else {}


# --- the ClientApp ---------------------------------------------------------------------------------
_PREPARED: dict[tuple[str, int], Prepared] = {}  # per worker process: staged once per (protocol, seed)
_RUNTIMES: dict[str, ClientRuntime] = {}  # per worker process and run


def node_state_dir(context: Context, run_id: str) -> Path:
    """Where a node keeps its clients' states: the node's ``state-dir`` config, else the temp dir."""
    root = context.node_config.get("state-dir") or Path(tempfile.gettempdir()) / "fedbench-node-states"
    return Path(str(root)) / run_id


def _runtime(cfg: ConfigRecord, context: Context) -> ClientRuntime:
    run_id = str(cfg["run_id"])
    if run_id not in _RUNTIMES:
        torch.set_num_threads(int(cfg["threads"]))  # the server's: the same float summation order
        protocol = from_dict(json.loads(str(cfg["protocol"])))
        seed = int(cfg["seed"])
        key = (protocol.hash, seed)
        if key not in _PREPARED:
            _PREPARED.clear()  # one seed staged at a time per worker
            _PREPARED[key] = prepare(protocol, seed, device=torch.device(str(cfg["device"])))
        method = create_method(str(cfg["method"]), json.loads(str(cfg["options"])))
        _RUNTIMES.clear()
        states = ClientStore(node_state_dir(context, run_id), shared=True)  # the node's workers share it
        _RUNTIMES[run_id] = ClientRuntime(_PREPARED[key], method, states)
    return _RUNTIMES[run_id]


def _message(msg: FlowerMessage, context: Context) -> tuple[ClientRuntime, Message]:
    cfg = msg.content["config"]
    partition = int(context.node_config["partition-id"])
    if int(cfg["client"]) != partition:
        raise RuntimeError(f"message for client {cfg['client']} reached the node of partition {partition}")
    content = msg.content
    more = serialize(_tensors(content["more"])) if "more" in content.array_records else None
    steps = int(cfg["steps"]) if "steps" in cfg else None  # a straggler's share of the local steps
    down = serialize(_tensors(content["down"]))
    body = Message(partition, int(cfg["round"]), down, more, bool(cfg["evaluating"]), steps)
    return _runtime(cfg, context), body


client_app = ClientApp()


@client_app.query("setup")
def _setup(msg: FlowerMessage, context: Context) -> FlowerMessage:
    """Who this node is (its partition id), with its state store for the run emptied: a run starts
    from round 0 on Flower, so states left by an earlier, killed attempt must not leak in."""
    run_id = str(msg.content["config"]["run_id"])
    shutil.rmtree(node_state_dir(context, run_id), ignore_errors=True)
    _RUNTIMES.pop(run_id, None)
    me = ConfigRecord({"partition-id": int(context.node_config["partition-id"]), "pid": os.getpid()})
    return FlowerMessage(RecordDict({"node": me}), reply_to=msg)


@client_app.query("request")
def _request(msg: FlowerMessage, context: Context) -> FlowerMessage:
    runtime, body = _message(msg, context)
    ask = deserialize(runtime.query(body))
    return FlowerMessage(RecordDict({"ask": _arrays(ask)}), reply_to=msg)


@client_app.train()
def _train(msg: FlowerMessage, context: Context) -> FlowerMessage:
    runtime, body = _message(msg, context)
    reply = runtime.train(body)
    metrics = MetricRecord(
        {
            "n_examples": reply.n_examples,
            "compute_s": reply.compute_s,
            "flops": reply.flops,
        }
    )
    info = ConfigRecord({"timer": reply.timer, "record": json.dumps(reply.record)})
    content = {"upload": _arrays(deserialize(reply.upload)), "metrics": metrics, "info": info}
    return FlowerMessage(RecordDict(content), reply_to=msg)


@client_app.evaluate()
def _evaluate(msg: FlowerMessage, context: Context) -> FlowerMessage:
    runtime, body = _message(msg, context)
    reply = runtime.evaluate(body)
    scores = {"own": torch.from_numpy(reply.own), "global": torch.from_numpy(reply.global_)}
    if reply.routing is not None:
        scores["routing"] = torch.from_numpy(reply.routing)
    for name in ("own_status", "global_status"):  # a generative VLM's parse / cut bits
        if getattr(reply, name) is not None:
            scores[name] = torch.from_numpy(getattr(reply, name))
    return FlowerMessage(RecordDict({"scores": _arrays(scores)}), reply_to=msg)


# --- the server side -------------------------------------------------------------------------------
class FlowerBackend:
    """Moves the server loop's messages over a Flower ``Grid`` (simulation or deployment)."""

    def __init__(self, grid: Any, name: str, run: Run) -> None:
        self.grid, self.name = grid, name
        prep = run.prep
        self.config = {
            "protocol": json.dumps(prep.protocol.as_dict(), default=list),
            "seed": prep.seed,
            "method": run.entry.name,
            "options": json.dumps(run.entry.options),
            "run_id": run.run_id,
            "threads": torch.get_num_threads(),
            "device": str(prep.device),
        }
        self.flower_bytes: dict[tuple[int, int], int] = {}  # (round, client) -> download count_bytes
        self.errors: dict[int, str] = {}  # client -> why its last reply is missing
        self.node_of = self._discover(len(prep.plans))

    def _discover(self, n: int) -> dict[int, int]:
        """Partition id -> node id, by asking every node (and emptying its state store for the run)."""
        deadline = time.monotonic() + NODES_TIMEOUT_S
        nodes = list(self.grid.get_node_ids())
        while len(nodes) < n and time.monotonic() < deadline:  # nodes may register after the server starts
            time.sleep(0.2)
            nodes = list(self.grid.get_node_ids())
        config = ConfigRecord({"run_id": self.config["run_id"]})
        asks = [
            FlowerMessage(RecordDict({"config": config}), dst_node_id=node, message_type="query.setup")
            for node in nodes
        ]
        node_of = {}
        for node, content in zip(nodes, self._exchange(asks, nodes), strict=True):
            if content is not None:
                node_of[int(content["node"]["partition-id"])] = node
        missing = sorted(set(range(n)) - set(node_of))
        if missing:
            raise RuntimeError(f"no Flower node answered for partition id(s) {missing} (of {n}; nodes: {len(nodes)})")
        return node_of

    def _send(self, kind: str, messages: Sequence[Message]) -> list[RecordDict | None]:
        """One Flower message per fedbench message; replies in message order, None where dropped."""
        out = []
        for m in messages:
            fields = {**self.config, "client": m.client, "round": m.round, "evaluating": m.evaluating}
            config = ConfigRecord(fields if m.steps is None else {**fields, "steps": m.steps})
            content = {"config": config, "down": _arrays(deserialize(m.down))}
            if m.more is not None:
                content["more"] = _arrays(deserialize(m.more))
            down_bytes = sum(r.count_bytes() for r in (content["down"], content.get("more")) if r is not None)
            self.flower_bytes[(m.round, m.client)] = down_bytes
            out.append(FlowerMessage(RecordDict(content), dst_node_id=self.node_of[m.client], message_type=kind))
        return self._exchange(out, [m.client for m in messages])

    def _exchange(self, out: list[FlowerMessage], clients: list[int]) -> list[RecordDict | None]:
        """Push, then pull until every reply is in or the deadline passes. Replies are matched to
        messages by ``reply_to_message_id``: an error the SuperLink makes for a node that is gone
        comes from the SuperLink, not from the node."""
        ids = list(self.grid.push_messages(out))
        client_of = {mid: c for mid, c in zip(ids, clients, strict=True) if mid}
        self.errors = {c: f"no reply within {REPLY_TIMEOUT_S:.0f} s" for c in clients}
        self.errors.update(
            {c: "message not accepted by the SuperLink" for mid, c in zip(ids, clients, strict=True) if not mid}
        )
        by_client: dict[int, RecordDict] = {}
        pending, deadline = set(client_of), time.monotonic() + REPLY_TIMEOUT_S
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                mid = reply.metadata.reply_to_message_id
                if mid not in pending:
                    continue
                pending.discard(mid)
                client = client_of[mid]
                if reply.has_error():  # Flower's strategies drop these silently; here each is recorded
                    self.errors[client] = f"error {reply.error.code}: {(reply.error.reason or '').strip()[-300:]}"
                else:
                    by_client[client] = reply.content
                    self.errors.pop(client)
            if pending:
                time.sleep(POLL_S)
        return [by_client.get(c) for c in clients]

    def query(self, messages: Sequence[Message]) -> list[bytes | None]:
        return [None if c is None else serialize(_tensors(c["ask"])) for c in self._send("query.request", messages)]

    def train(self, messages: Sequence[Message]) -> list[TrainReply | None]:
        replies: list[TrainReply | None] = []
        for m, c in zip(messages, self._send("train", messages), strict=True):
            if c is None:
                replies.append(None)
                continue
            metrics, info = c["metrics"], c["info"]
            upload = serialize(_tensors(c["upload"]))
            record = {
                **json.loads(str(info["record"])),
                "up_bytes_flower": c["upload"].count_bytes(),
                "down_bytes_flower": self.flower_bytes[(m.round, m.client)],
            }
            timer = str(info["timer"])
            n, seconds, flops = (metrics[k] for k in ("n_examples", "compute_s", "flops"))
            replies.append(TrainReply(upload, int(n), float(seconds), timer, record, int(flops)))
        return replies

    def evaluate(self, messages: Sequence[Message]) -> list[EvalReply | None]:
        replies: list[EvalReply | None] = []
        for c in self._send("evaluate", messages):
            if c is None:
                replies.append(None)
                continue
            scores = _tensors(c["scores"])
            routing = scores["routing"].numpy() if "routing" in scores else None
            status = {k: scores[k].numpy() for k in ("own_status", "global_status") if k in scores}
            replies.append(EvalReply(scores["own"].numpy(), scores["global"].numpy(), routing, **status))
        return replies

    def client_states(self) -> None:
        """The clients' states live on their nodes: a Flower run is not resumed mid-way."""
        return None

    def restore(self, states: Mapping[int, State]) -> None:
        raise NotImplementedError("a Flower run restarts from round 0")

    def drop_reason(self, client: int) -> str:
        return self.errors.get(client, "")


def server_app(
    protocol: Protocol,
    results: Path,
    progress: Progress,
    on_seed: Callable[[Prepared], None] | None,
    name: str,
    failures: list[BaseException],
) -> ServerApp:
    """A ServerApp whose main runs every row x seed of ``protocol`` through the server loop, with
    :class:`FlowerBackend` on the grid it is given; an exception is kept in ``failures`` (Flower
    would only log it) for the caller to raise."""
    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Context) -> None:
        try:
            run_rows(protocol, results, progress, backend=lambda run: FlowerBackend(grid, name, run), on_seed=on_seed)
        except BaseException as err:
            failures.append(err)

    return app


def quiet_flower() -> None:
    """Flower logs every message at INFO and deprecation notices at WARNING: keep errors only."""
    logging.getLogger("flwr").setLevel(logging.ERROR)


def run_flower_sim(
    protocol: Protocol, results: Path, progress: Progress, on_seed: Callable[[Prepared], None] | None = None
) -> None:
    """Every row x seed on Flower's simulation engine: one SuperNode per client (partition id),
    client resources from the protocol's ``[resources]``."""
    from flwr.simulation import run_simulation

    quiet_flower()
    failures: list[BaseException] = []
    app = server_app(protocol, results, progress, on_seed, "flower-sim", failures)
    resources = {"num_cpus": protocol.resources.num_cpus, "num_gpus": protocol.resources.num_gpus}
    backend_config = {
        "client_resources": resources,
        "init_args": {"num_cpus": os.cpu_count() or 1, "logging_level": "ERROR", "log_to_driver": False},
    }
    run_simulation(
        server_app=app,
        client_app=client_app,
        num_supernodes=protocol.data.num_clients,
        backend_config=backend_config,
        verbose_logging=False,
    )
    if failures:
        raise failures[0]
