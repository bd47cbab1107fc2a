"""The in-process backend: the round loop written once, sequential and deterministic.

The harness owns client sampling, local training, (de)serialization and the byte ledger,
timers, evaluation, client-state storage, checkpoints / resume and results records; the
method only builds its model and decides download / upload / aggregate.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedbench.backbone import Backbone, create_backbone
from fedbench.data import GLOBAL_CLIENT, GLOBAL_TEST, TEST, TRAIN, ClientPlan, ExampleTable
from fedbench.method import ClientInfo, Method, Reply, count_params, create_method
from fedbench.model import OCR_TOKENS, Batch, ClientModel, sub_batch
from fedbench.payload import META, Payload, analytic_bytes, check_upload, deserialize, serialize
from fedbench.prompt_view import PromptViews
from fedbench.protocol import MethodEntry, Protocol
from fedbench.provenance import git_commit, library_versions, machine
from fedbench.records import append_records, read_jsonl
from fedbench.registry import SUITES, TASKS
from fedbench.statistics import routing_entropy, task_expert_mi
from fedbench.task import TaskSpec
from fedbench.tasks.partition import make_plans, partition_summary  # partitioners live with the tasks
from fedbench.timing import ComputeTimer, device_label

State = dict[str, torch.Tensor]


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple (run seed, round, client, purpose): independent streams."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class RowStore:
    """Every row of a table as tensors; text is encoded once by the frozen text tower."""

    def __init__(
        self, table: ExampleTable, specs: Sequence[TaskSpec], backbone: Backbone, device: torch.device
    ) -> None:
        self.table = table
        self.device = device
        self.task_names = [s.name for s in specs]
        self.images = table.images.to(device)
        self.image_index = torch.as_tensor(table.image_index, dtype=torch.long)
        self.task_id = torch.as_tensor([self.task_names.index(t) for t in table.task], dtype=torch.long, device=device)
        self.question = self._encode(backbone, table.question)
        self.ocr, self.ocr_mask = self._encode_tokens(backbone, table.ocr_text)
        self.label = torch.as_tensor(table.label, dtype=torch.long, device=device)
        self.box = torch.as_tensor(table.box, dtype=torch.float32, device=device)

    @staticmethod
    def _encode(backbone: Backbone, texts: np.ndarray) -> torch.Tensor:
        unique, inverse = np.unique(texts.astype(str), return_inverse=True)
        return backbone.encode_text(list(unique))[torch.as_tensor(inverse, device=backbone.mean.device)]

    @staticmethod
    def _encode_tokens(backbone: Backbone, texts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """OCR text -> one embedding per whitespace token (reading order), at most OCR_TOKENS."""
        tokens = [str(t).split()[:OCR_TOKENS] for t in texts]
        vocab = sorted({w for ts in tokens for w in ts})
        device = backbone.mean.device
        k = max((len(ts) for ts in tokens), default=0) or 1
        emb = torch.zeros(len(texts), k, backbone.embed_dim, device=device)
        mask = torch.zeros(len(texts), k, dtype=torch.bool, device=device)
        if vocab:
            table = backbone.encode_text(vocab)
            index = {w: i for i, w in enumerate(vocab)}
            for row, ts in enumerate(tokens):
                if ts:
                    emb[row, : len(ts)] = table[[index[w] for w in ts]]
                    mask[row, : len(ts)] = True
        return emb, mask

    def batch(self, rows: np.ndarray) -> Batch:
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        image_index = self.image_index[rows]
        images = self.images[image_index.to(self.device)]
        return Batch(
            images,
            image_index,
            self.table.task[rows],
            self.task_id[idx],
            self.question[idx],
            self.ocr[idx],
            self.ocr_mask[idx],
            self.label[idx],
            self.box[idx],
            idx,
        )


@dataclass
class Prepared:
    """Everything a run needs that does not depend on the method (shared by all rows of a seed)."""

    protocol: Protocol
    seed: int
    plans: list[ClientPlan]
    table: ExampleTable
    specs: list[TaskSpec]
    backbone: Backbone
    store: RowStore
    device: torch.device
    majority: dict[str, float]
    features: FeatureCache

    @property
    def infos(self) -> list[ClientInfo]:
        return [
            ClientInfo(
                p.client,
                tuple(t for t in p.tasks if t in self.store.task_names),
                p.has_ocr,
                len(self.table.rows(client=p.client, split=TRAIN)),
            )
            for p in self.plans
        ]


def prepare(
    protocol: Protocol, seed: int, backbone: Backbone | None = None, device: torch.device | None = None
) -> Prepared:
    """Partition, draw the suite and encode text for one seed."""

    device = device or default_device()
    specs = [TASKS.get(name) for name in protocol.tasks]
    suite = SUITES.get(protocol.data.suite)
    wrong = [s.name for s in specs if s.suite != protocol.data.suite]
    if wrong:
        raise ValueError(f"task(s) {wrong} do not belong to suite '{protocol.data.suite}'")
    n_classes = max((s.num_answers for s in specs if s.family == "classification"), default=1)
    plans = make_plans(protocol.data, list(protocol.tasks), suite.n_domains, n_classes, seed)
    table = suite(plans, protocol.data, list(protocol.tasks), seed)
    backbone = backbone or create_backbone(protocol.backbone.name, device)
    store = RowStore(table, specs, backbone, device)
    prompts = PromptViews(table, {s.name: s.family for s in specs}, backbone, protocol.eval.batch_size)
    features = FeatureCache(backbone, store.images, protocol.eval.batch_size, prompts)
    return Prepared(
        protocol, seed, plans, table, specs, backbone, store, device, majority_scores(table, specs), features
    )


def majority_scores(table: ExampleTable, specs: Sequence[TaskSpec]) -> dict[str, float]:
    """Reference row: the majority training answer (mean training box for grounding) on the global test."""
    from torchvision.ops import box_iou

    scores = {}
    for spec in specs:
        train = np.flatnonzero((table.task == spec.name) & (table.split == TRAIN))
        test = np.flatnonzero((table.task == spec.name) & (table.split == GLOBAL_TEST))
        if spec.is_box:
            mean_box = torch.as_tensor(table.box[train].mean(0, keepdims=True))
            ious = box_iou(mean_box.expand(len(test), 4), torch.as_tensor(table.box[test])).diagonal()
            scores[spec.name] = float((ious >= 0.5).float().mean())
        else:
            answer = np.bincount(table.label[train], minlength=spec.num_answers).argmax()
            scores[spec.name] = float((table.label[test] == answer).mean())
    return scores


def trainable_state(model: ClientModel) -> State:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_state(model: ClientModel, *states: State | None) -> None:
    """Copy the given states into the model's parameters, later states winning (``meta.*`` message
    tensors are not parameters and are skipped)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for state in states:
            for name, tensor in (state or {}).items():
                if name.startswith(META):
                    continue
                if name not in params:
                    raise KeyError(f"payload tensor '{name}' is not a parameter of the model")
                params[name].copy_(tensor)


def sample_clients(seed: int, round_: int, num_clients: int, fraction: float) -> list[int]:
    k = max(1, round(fraction * num_clients))
    rng = np.random.default_rng(derive_seed(seed, round_, "sample"))
    return sorted(rng.choice(num_clients, size=k, replace=False).tolist())


class FeatureCache:
    """Frozen-backbone image features of every image, computed once per seed and shared by all
    methods whose trainable parts sit after the towers (keyed by the backbone and the table)."""

    def __init__(
        self, backbone: Backbone, images: torch.Tensor, batch_size: int = 256, prompts: PromptViews | None = None
    ) -> None:
        self.backbone, self.images, self.batch_size = backbone, images, batch_size
        self.prompts = prompts  # per-row prompt views (text drawn around the image), for routers that read them
        self._tokens: torch.Tensor | None = None
        self._pooled: torch.Tensor | None = None

    @torch.no_grad()
    def _fill(self) -> None:
        tokens, pooled = [], []
        for i in range(0, len(self.images), self.batch_size):
            t, p = self.backbone.encode_image(self.images[i : i + self.batch_size])
            tokens.append(t)
            pooled.append(p)
        self._tokens, self._pooled = torch.cat(tokens), torch.cat(pooled)

    def get(self, image_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tokens is None:
            self._fill()
        idx = image_index.to(self._tokens.device)
        return self._tokens[idx], self._pooled[idx]


@dataclass
class ClientContext:
    """What a method may use on a client during its local update: its info, its training rows and
    the harness's training loop (so no method writes its own optimiser loop)."""

    info: ClientInfo
    round: int
    store: RowStore
    train_rows: np.ndarray
    protocol: Protocol
    seed: int
    features: FeatureCache
    # local updates already in the client's loaded state: the rounds before ``round`` it was sampled
    # in (at training), those up to and including ``round`` (at evaluation after that round)
    participations: int = 0

    def inputs(self, model: ClientModel, rows: np.ndarray) -> tuple[Batch, tuple[torch.Tensor, torch.Tensor] | None]:
        """A batch of ``rows`` and, when the backbone is frozen, its cached image features."""
        batch = self.store.batch(rows)
        return batch, None if model.uses_backbone_grad() else self.features.get(batch.image_index)

    def sample(self, n: int, purpose: str) -> np.ndarray:
        """``n`` training rows drawn with replacement, from a stream named by ``purpose``."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.round, self.info.client, purpose))
        return self.train_rows[torch.randint(len(self.train_rows), (n,), generator=gen).numpy()]

    def train(
        self,
        model: ClientModel,
        params: Sequence[torch.nn.Parameter],
        phase: str = "train",
        lr_scales: Sequence[float] | None = None,
    ) -> None:
        """``local.steps`` AdamW steps on ``params`` over batches drawn from the client's train rows;
        ``lr_scales`` (aligned with ``params``) multiplies the protocol's learning rate per parameter."""
        cfg = self.protocol.local
        scales = list(lr_scales) if lr_scales is not None else [1.0] * len(params)
        groups = [
            {"params": [p for p, s in zip(params, scales, strict=True) if s == scale], "lr": cfg.lr * scale}
            for scale in dict.fromkeys(scales)
        ]
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.round, self.info.client, phase))
        torch.manual_seed(derive_seed(self.seed, self.round, self.info.client, phase, "dropout"))
        model.train()
        bs = min(cfg.batch_size, len(self.train_rows))
        for _ in range(cfg.steps):
            pick = self.train_rows[torch.randint(len(self.train_rows), (bs,), generator=gen).numpy()]
            loss = model.loss(*self.inputs(model, pick))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()


@torch.no_grad()
def evaluate_rows(
    model: ClientModel, method: Method, ctx: ClientContext, rows: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per row: 1.0 where the model answers correctly (IoU >= 0.5 for boxes); images encoded once.

    Also returns, when the model routes, each row's routing weights over experts [rows, E] (what the
    expert-usage matrix and the routing entropy / mutual information are computed from); else None.
    """
    model.eval()
    out = np.zeros(len(rows), dtype=np.float64)
    routing: np.ndarray | None = None
    if len(rows) == 0:
        return out, routing
    images, position = np.unique(ctx.store.image_index[rows].numpy(), return_inverse=True)
    image_ids = torch.as_tensor(images)
    if model.uses_backbone_grad() or type(method).encode_images is not Method.encode_images:
        parts = [
            method.encode_images(model, image_ids[i : i + batch_size], ctx) for i in range(0, len(images), batch_size)
        ]
        tokens_all, pooled_all = torch.cat([t for t, _ in parts]), torch.cat([p for _, p in parts])
    else:
        tokens_all, pooled_all = ctx.features.get(image_ids)
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        pos = torch.as_tensor(position[i : i + batch_size], device=tokens_all.device)
        batch = ctx.store.batch(chunk)
        for name, (idx, head_out) in model.forward(batch, cached=(tokens_all[pos], pooled_all[pos])).items():
            head = model.heads[name]
            out[i + idx.cpu().numpy()] = head.correct(head_out, sub_batch(batch, idx)).cpu().numpy()
        if model.routing is not None:
            weights = model.routing.detach().cpu().numpy()
            if routing is None:  # NaN marks rows of a batch that did not route, should one not
                routing = np.full((len(rows), weights.shape[1]), np.nan)
            routing[i : i + len(chunk)] = weights
    return out, routing


def run_id_for(entry: MethodEntry, seed: int, protocol: Protocol) -> str:
    slug = re.sub(r"[^A-Za-z0-9._=+-]+", "_", entry.label)
    return f"{slug}__seed{seed}__{protocol.hash}"


@dataclass
class Federation:
    """What persists between rounds: the server's state, every client's stored trainable state,
    and the initial state every client starts from (one seeded build)."""

    server: Payload
    clients: dict[int, State]
    init: State
    infos: list[ClientInfo]
    shared: set[str]
    local: set[str]


class CheckpointMismatch(RuntimeError):
    """A checkpoint that the current code cannot resume."""


Progress = Callable[[str, dict[str, Any]], None]


def _noop(event: str, info: dict[str, Any]) -> None:
    return None


class Run:
    """One (method row, seed) run of a protocol, resumable from its last completed round."""

    def __init__(self, prep: Prepared, entry: MethodEntry, results_dir: Path, progress: Progress = _noop) -> None:
        self.prep, self.entry, self.progress = prep, entry, progress
        self.protocol = prep.protocol
        self.method: Method = create_method(entry.name, entry.options)
        self.run_id = run_id_for(entry, prep.seed, self.protocol)
        self.dir = Path(results_dir) / "runs" / self.run_id
        self.records_path = self.dir / "records.jsonl"
        self.checkpoint_path = self.dir / "checkpoint.pt"
        self.device_name = device_label(prep.device)

    def common(self) -> dict[str, Any]:
        p = self.protocol
        return {
            "run_id": self.run_id,
            "method": self.entry.name,
            "label": self.entry.label,
            "seed": self.prep.seed,
            "protocol": p.name,
            "protocol_hash": p.hash,
            "git_commit": git_commit(),
            "suite": p.data.suite,
            "synthetic": bool(self.prep.table.synthetic),
            "device": self.device_name,
            "versions": library_versions(),
        }

    def context(self, info: ClientInfo, r: int, evaluating: bool = False) -> ClientContext:
        """The client's context in round ``r``: for its local update, or (``evaluating``) for its
        evaluation after that round (``participations`` then counts round ``r`` too)."""
        rows = self.prep.table.rows(client=info.client, split=TRAIN)
        prep, fraction = self.prep, self.protocol.clients.sample_fraction
        done = sum(
            info.client in sample_clients(prep.seed, q, len(prep.plans), fraction) for q in range(r + evaluating)
        )
        return ClientContext(info, r, prep.store, rows, self.protocol, prep.seed, prep.features, done)

    def completed(self) -> bool:
        if not self.records_path.is_file():
            return False
        return any(r.get("kind") == "run" and r.get("completed") for r in read_jsonl(self.records_path))

    def build(self) -> ClientModel:
        torch.manual_seed(derive_seed(self.prep.seed, "init"))  # every client starts from this init
        model = self.method.build_model(
            copy.deepcopy(self.prep.backbone), self.prep.specs, self.protocol.model.answer_side
        )
        return model.to(self.prep.device)

    def execute(self) -> str:
        """Run (or resume, or skip when complete); returns the run id."""
        if self.completed():
            self.progress("skip", {"run_id": self.run_id})
            return self.run_id
        self.dir.mkdir(parents=True, exist_ok=True)
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
            clients={},
            init=init,
            infos=self.prep.infos,
            shared={n for n, t in tags.items() if t == "shared"},
            local={n for n, t in tags.items() if t == "local"},
        )
        start = 0
        if self.checkpoint_path.is_file():
            ckpt = torch.load(self.checkpoint_path, weights_only=True)
            if sorted(ckpt.get("trainable", [])) != sorted(init):
                raise CheckpointMismatch(
                    f"checkpoint '{self.checkpoint_path}' was written by a model with other parameters "
                    "(code changed since); remove that run directory or use another --results"
                )
            start, fed.server, fed.clients = ckpt["round"], ckpt["server_state"], ckpt["client_states"]
            self._truncate_records(start)
            self.progress("resume", {"run_id": self.run_id, "round": start})
        rounds = self.protocol.rounds
        self.progress("start", {"run_id": self.run_id, "label": self.entry.label, "rounds": rounds, "start": start})
        for r in range(start, rounds):
            rows = self._round(r, model, fed)
            if (r + 1) == rounds or (self.protocol.eval.every and (r + 1) % self.protocol.eval.every == 0):
                rows += self._evaluate(r, model, fed)
            append_records(self.records_path, rows)
            self._save_checkpoint(r + 1, fed)
            self.progress("round", {"run_id": self.run_id, "round": r + 1, "rounds": rounds})
        self._finish(model, tags)
        return self.run_id

    def _load_client(
        self, model: ClientModel, fed: Federation, info: ClientInfo, r: int, asking: ClientInfo | None = None
    ) -> tuple[ClientContext, dict[str, Any]]:
        """Initial state, then the client's stored state, then what the server sent it, as it
        crossed the wire: ``download``, then, for a method with a two-message download, the
        client's ``request`` and the server's ``answer``, loaded on top. The same exchange at
        training and at evaluation (``asking``, given at evaluation only: the client as the server
        sees it, there asking for every task). Returns the context and the messages' bytes as
        train-record fields, with ``request`` (what the client asked for) when it asked."""
        evaluating, asking = asking is not None, asking or info
        down = self.method.download(fed.server, asking)
        blob = serialize(down)
        load_state(model, fed.init, fed.clients.get(info.client), deserialize(blob))
        ctx = self.context(info, r, evaluating)
        self.method.prepare_client(model, ctx)
        wire: dict[str, Any] = {
            "up_bytes": 0,
            "down_bytes": len(blob),
            "up_bytes_analytic": 0,
            "down_bytes_analytic": analytic_bytes(down),
        }
        ask = self.method.request(model, ctx)
        if ask is not None:
            check_upload(ask, fed.shared, fed.local, self.entry.name)
            ask_blob = serialize(ask)
            more = self.method.answer(fed.server, asking, deserialize(ask_blob))
            more_blob = serialize(more)
            load_state(model, deserialize(more_blob))
            wire["up_bytes"] += len(ask_blob)
            wire["down_bytes"] += len(more_blob)
            wire["up_bytes_analytic"] += analytic_bytes(ask)
            wire["down_bytes_analytic"] += analytic_bytes(more)
            wire["request"] = {k: v.tolist() for k, v in ask.items()}
        return ctx, wire

    def _round(self, r: int, model: ClientModel, fed: Federation) -> list[dict]:
        """Sample, download, train, upload, aggregate (updates ``fed`` in place); train records."""
        if not self.method.federated:
            return self._pooled_round(r, model, fed)
        proto, seed = self.protocol, self.prep.seed
        sampled = sample_clients(seed, r, len(fed.infos), proto.clients.sample_fraction)
        replies, rows = [], []
        for c in sampled:
            info = fed.infos[c]
            ctx, wire = self._load_client(model, fed, info, r)
            train_rows = ctx.train_rows
            with ComputeTimer(self.prep.device) as timer:
                self.method.local_update(model, ctx)
            up = self.method.upload(model, info)
            check_upload(up, fed.shared, fed.local, self.entry.name)
            up_blob = serialize(up)
            replies.append(Reply(info, deserialize(up_blob), len(train_rows)))
            fed.clients[c] = trainable_state(model)
            wire["up_bytes"] += len(up_blob)
            wire["up_bytes_analytic"] += analytic_bytes(up)
            rows.append(self._train_record(r, c, wire, timer, len(train_rows), model, ctx))
            self.progress("client", {"run_id": self.run_id, "round": r, "client": c})
        fed.server = self.method.aggregate(fed.server, replies)
        return rows

    def _train_record(
        self,
        r: int,
        client: int,
        wire: dict[str, Any],
        timer: ComputeTimer,
        n_examples: int,
        model: ClientModel,
        ctx: ClientContext,
    ) -> dict:
        """One ``kind="train"`` record: the message bytes (``wire``), the compute time, plus the
        method's own fields (:meth:`Method.train_record`), which may not overwrite the harness's."""
        record = {
            **self.common(),
            "kind": "train",
            "round": r,
            "client": client,
            **wire,
            "compute_s": timer.seconds,
            "timer": timer.kind,
            "n_examples": n_examples,
        }
        extra = self.method.train_record(model, ctx)
        clash = sorted(set(extra) & set(record))
        if clash:
            raise ValueError(f"method '{self.entry.name}' train_record overwrites harness field(s) {clash}")
        return {**record, **extra}

    def _pooled_round(self, r: int, model: ClientModel, fed: Federation) -> list[dict]:
        """A reference row that is not federated (``Method.federated`` False): one trainer on the
        union of every client's training rows (all tasks; OCR as each row has it) for ``local.steps``
        × (clients sampled this round) steps, so it takes as many gradient steps as a federated row.
        Nothing is sent: one train record per round with 0 bytes and ``federated: false``. The pooled
        model's trainable state is ``fed.server``, so :meth:`_evaluate` scores it as every client's."""
        proto, prep = self.protocol, self.prep
        sampled = sample_clients(prep.seed, r, len(fed.infos), proto.clients.sample_fraction)
        train_rows = prep.table.rows(split=TRAIN)
        steps = proto.local.steps * len(sampled)
        held = {t for info in fed.infos for t in info.tasks}
        info = ClientInfo(
            GLOBAL_CLIENT,
            tuple(t for t in prep.store.task_names if t in held),
            any(i.has_ocr for i in fed.infos),
            len(train_rows),
        )
        pooled = proto.replace(local=dataclasses.replace(proto.local, steps=steps))
        ctx = ClientContext(info, r, prep.store, train_rows, pooled, prep.seed, prep.features)
        load_state(model, fed.init, fed.server)
        self.method.prepare_client(model, ctx)
        with ComputeTimer(prep.device) as timer:
            self.method.local_update(model, ctx)
        fed.server = trainable_state(model)
        for c in sampled:  # the clients whose share of steps the pooled trainer took
            self.progress("client", {"run_id": self.run_id, "round": r, "client": c})
        nothing = {"up_bytes": 0, "down_bytes": 0, "up_bytes_analytic": 0, "down_bytes_analytic": 0}
        record = self._train_record(r, GLOBAL_CLIENT, nothing, timer, len(train_rows), model, ctx)
        return [{**record, "federated": False, "steps": steps, "sampled": sampled}]

    def _evaluate(self, r: int, model: ClientModel, fed: Federation) -> list[dict]:
        """Every client's model: its own state + what the server would send a client asking for
        every task. Scored on its own test split (scope ``client``) and on the global test set of
        every task (scope ``client_global``, with ``held`` telling own tasks: P averages those,
        TTP all). A task's ``global`` score is the mean over the clients that hold it; its
        ``per_example`` lists, per global-test row in table order, that mean of the row's correctness,
        so rows of one seed (same table) are paired example by example for the bootstrap."""
        table, bs = self.prep.table, self.protocol.eval.batch_size
        all_tasks = tuple(self.prep.store.task_names)
        global_rows = table.rows(split=GLOBAL_TEST)
        rows, per_task, usage, routed = [], {}, {}, {}
        for info in fed.infos:
            asking_all = dataclasses.replace(info, tasks=all_tasks)
            ctx, _ = self._load_client(model, fed, info, r, asking=asking_all)
            own = table.rows(client=info.client, split=TEST)
            correct, _ = evaluate_rows(model, self.method, ctx, own, bs)
            for task in info.tasks:
                rows.append(self._eval_row(r, "client", info.client, task, "test", correct[table.task[own] == task]))
            global_correct, routing = evaluate_rows(model, self.method, ctx, global_rows, bs)
            if routing is not None:
                routed[info.client] = routing
            for task in all_tasks:
                mask = table.task[global_rows] == task
                row = self._eval_row(r, "client_global", info.client, task, "global_test", global_correct[mask])
                rows.append({**row, "held": task in info.tasks})
                if task in info.tasks:
                    per_task.setdefault(task, []).append(global_correct[mask])
                    if routing is not None:
                        usage.setdefault(task, []).append(routing[mask].mean(0))
        for task, per_client in per_task.items():
            rows.append(
                {
                    **self._eval_row(r, "global", GLOBAL_CLIENT, task, "global_test", np.array([])),
                    "value": float(np.mean([float(c.mean()) for c in per_client])),
                    "n": len(per_client[0]),
                    "clients": len(per_client),
                    "per_example": np.mean(per_client, 0).round(6).tolist(),
                }
            )
        return rows + self._usage_rows(r, model, usage, routed, table.task[global_rows])

    def _usage_rows(
        self,
        r: int,
        model: ClientModel,
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
            for expert, value in zip(model.expert_names, np.mean(per_client, 0), strict=True)
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

    def _eval_row(self, r: int, scope: str, client: int, task: str, split: str, correct: np.ndarray) -> dict:
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

    def _save_checkpoint(self, next_round: int, fed: Federation) -> None:
        tmp = self.checkpoint_path.with_suffix(".tmp")
        body = {"round": next_round, "server_state": fed.server, "client_states": fed.clients}
        torch.save({**body, "trainable": sorted(fed.init)}, tmp)
        tmp.replace(self.checkpoint_path)

    def _truncate_records(self, next_round: int) -> None:
        """Drop records of rounds after the checkpoint (a kill between append and checkpoint)."""
        if not self.records_path.is_file():
            return
        keep = [r for r in read_jsonl(self.records_path) if r.get("round", -1) < next_round]
        tmp = self.records_path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        append_records(tmp, keep)
        tmp.replace(self.records_path)

    def _finish(self, model: ClientModel, tags: dict[str, str]) -> None:
        common = self.common()
        rows = [{**common, "kind": "majority", "task": t, "value": v} for t, v in self.prep.majority.items()]
        rows.append(
            {
                **common,
                "kind": "run",
                "completed": True,
                "federated": self.method.federated,
                "rounds": self.protocol.rounds,
                "tasks": list(self.protocol.tasks),
                **count_params(model, tags),
                "options": dataclasses.asdict(self.method.options),
                "protocol_config": self.protocol.as_dict(),
                "backbone": self.prep.backbone.name,
                "backbone_meta": self.prep.backbone.meta,
                "partition": [p.as_record() for p in self.prep.plans],
                "partition_summary": partition_summary(self.prep.table),
                "data_fingerprint": self.prep.table.fingerprint(),
                "machine": machine(),
            }
        )
        append_records(self.records_path, rows)
        self.checkpoint_path.unlink(missing_ok=True)
