"""`fedbench describe`: what a method shares, what it keeps, and what one round costs on the wire."""

from __future__ import annotations

import inspect
import re

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedbench.client import ClientRuntime
from fedbench.method import count_params, create_method
from fedbench.payload import serialize
from fedbench.protocol import Protocol
from fedbench.staging import prepare


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
        return {"counts": counts, "groups": groups, "bytes": None}
    server_state = method.init_server_state(model)
    last = proto.rounds - 1  # the steady state: per-client stages (task-expert methods) have moved on
    wire = Table(title=f"bytes per client taking part in the last round (safetensors, protocol {proto.name})")
    for col in ("client", "tasks", "ocr", "download", "upload"):
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
        wire.add_row(str(info.client), ",".join(info.tasks), "yes" if info.has_ocr else "no", f"{down:,}", f"{up:,}")
    console.print(wire)
    return {"counts": counts, "groups": groups, "bytes": sizes}
