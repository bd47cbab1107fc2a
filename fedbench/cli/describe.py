"""`fedbench describe`: what a method shares, what it keeps, and what one round costs on the wire."""

from __future__ import annotations

import inspect
import re

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedbench.api.data import GLOBAL_TEST
from fedbench.api.method import Method, count_params, create_method
from fedbench.api.model import ClientModel
from fedbench.api.payload import META, serialize
from fedbench.config.protocol import Protocol
from fedbench.runtime.client import ClientRuntime
from fedbench.staging.prepare import Prepared, prepare


def module_group(name: str) -> str:
    """One line per module kind: layer indices collapsed (``resblocks.*``), heads per task."""
    name = re.sub(r"\.parametrizations\.(\w+)\.\d+\.", r".\1.", name)
    name = re.sub(r"\.\d+\.", ".*.", name)
    parts = name.removesuffix(".default").split(".")
    per_task = ("heads", "task_adapters", "aoa")  # one line per task's module, not per tensor
    if parts[:2] == ["router", "task"]:  # the router's task table: one parameter row per task
        return "router.task.*"
    return ".".join(parts[:2]) if parts[0] in per_task else ".".join(parts)


def describe_method(proto: Protocol, console: Console) -> dict:
    entry = proto.methods[0]
    prep = prepare(proto, proto.seeds[0])
    client = ClientRuntime(prep, create_method(entry.name, entry.options))  # a client, nothing is run
    method, model = client.method, client.model
    tags = method.tags(model)
    params = dict(model.named_parameters())
    groups: dict[tuple[str, str], int] = {}
    for name, tag in tags.items():
        key = (module_group(name), tag)
        groups[key] = groups.get(key, 0) + params[name].numel()
    console.print(f"[bold]{escape(entry.label)}[/]  {method.paper}")
    console.print(f"options: {method.describe()['options']}", markup=False)
    console.print(f"backbone families: {', '.join(type(method).families)}", markup=False)
    doc = inspect.getdoc(type(method)) or ""
    if doc:
        console.print(doc, markup=False, soft_wrap=True)  # the terminal wraps; rich would re-wrap mid-line
    table = Table(title="trainable parameters")
    table.add_column("module", overflow="fold")  # long LoRA names wrap rather than truncate
    table.add_column("tag")
    table.add_column("params", justify="right")
    for (group, tag), n in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        table.add_row(group, tag, f"{n:,}")
    console.print(table)
    counts = count_params(model, tags)
    console.print(", ".join(f"{k}={v:,}" for k, v in counts.items()))
    if not method.federated:
        console.print("not federated: one pooled trainer, nothing is sent (bytes n/a)")
        console.print(
            "privacy: none promised; this reference row pools every client's training rows in one place.",
            markup=False,
            soft_wrap=True,
        )
        return {"counts": counts, "groups": groups, "bytes": None}
    server_state = method.init_server_state(model)
    last = proto.rounds - 1  # the steady state: per-client stages (task-expert methods) have moved on
    wire = Table(title=f"bytes per client taking part in the last round (safetensors, protocol {proto.name})")
    for col in ("client", "tasks", "ocr", "examples", "download", "upload"):
        wire.add_column(col)
    sizes = []
    for info in prep.infos:
        ctx = client.context(info, last)
        method.prepare_client(model, ctx)
        down = len(serialize(method.download(server_state, info)))
        ask = method.request(model, ctx)  # a two-message download (FedMix)
        if ask is not None:
            down += len(serialize(method.answer(server_state, info, ask)))
        up = len(serialize(method.upload(model, info))) + (len(serialize(ask)) if ask is not None else 0)
        sizes.append((down, up))
        ocr = "yes" if info.has_ocr else "no"
        wire.add_row(str(info.client), ",".join(info.tasks), ocr, f"{info.num_examples:,}", f"{down:,}", f"{up:,}")
    console.print(wire)
    console.print(privacy_promise(method, model, tags, prep), markup=False, soft_wrap=True)
    return {"counts": counts, "groups": groups, "bytes": sizes}


def privacy_promise(method: Method, model: ClientModel, tags: dict[str, str], prep: Prepared) -> str:
    """What never leaves a client, and everything that does cross (``tests/test_privacy.py`` checks
    the promise on the bytes of every registered method's messages, records and checkpoints)."""
    params = dict(model.named_parameters())
    local = [n for n, t in tags.items() if t == "local"]
    n_local = sum(params[n].numel() for n in local)
    local_bytes = sum(params[n].numel() * params[n].element_size() for n in local)
    two = method.two_messages
    meta = any(k.startswith(META) for info in prep.infos for k in method.upload(model, info))
    n_global = len(prep.table.rows(split=GLOBAL_TEST))
    upload = "the upload above (shared tensors" + (" and meta.* message tensors" if meta else "") + ", safetensors)"
    lines = [
        "privacy promise:",
        (
            f"  never leaves a client: its training and test rows, and its {len(local)} local tensor(s) ({n_local:,} "
            f"parameters, {local_bytes:,} bytes): no upload, request, record, metric or checkpoint the server writes "
            "holds their values (tests/test_privacy.py searches those bytes, for every registered method)."
            if local
            else "  never leaves a client: its training and test rows (every trainable tensor of this method is shared)"
        ),
        f"  crosses, per round a client is sampled: {upload}"
        + ("; before it, its request (the first half of a two-message download)" if two else "")
        + "; its number of training examples ('examples' above: the aggregation weight); its training compute time"
        + "; the method's train-record fields, if any.",
        "  crosses at each evaluation: per example of its own test split, whether its model answered correctly; the "
        f"same for the {n_global:,} global-test examples (the same for every client); with a router, its routing "
        "weights on the global test set.",
        "  the server knows of each client without asking: its id, its task families, whether it has OCR text and "
        "its example count (the partition is part of the protocol).",
    ]
    return "\n".join(lines)
