"""Checkpoints: the server state and the clients' stored states after the last completed round, so
a killed run resumes to the same records. Safetensors, never pickle, and checked on read.

A checkpoint is two files in the run directory:

- ``checkpoint-<round>.safetensors``: every tensor, the server state's under ``server/<name>`` and
  client ``k``'s under ``client/<k>/<name>``;
- ``checkpoint.json``, the manifest: the round to resume from, the tensor file's name, size and
  sha256, the trainable parameter names of the model that wrote it and the clients it holds.

The manifest is renamed into place last, so it always names a complete tensor file: a kill at any
point leaves the previous checkpoint or the new one. A manifest or tensor file that does not match
(truncated, edited) stops the run with one line naming the file; a checkpoint written by a model with
other parameters raises :class:`CheckpointMismatch`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedbench.integrity import IntegrityError, read_checked, sha256_bytes, write_atomic
from fedbench.payload import Payload
from fedbench.records import append_records, read_jsonl

State = dict[str, torch.Tensor]
FORMAT = "fedbench-checkpoint/1"
LEGACY = "checkpoint.pt"  # the pickle-based format of earlier versions: never read, removed on finish


class CheckpointMismatch(RuntimeError):
    """A checkpoint that the current code cannot resume."""


class Checkpoint:
    """``path`` is the manifest (``checkpoint.json``); the tensors sit beside it (see the module)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _fix(self) -> str:
        return f"delete '{self.path.parent}' to run it again from round 0"

    def save(self, next_round: int, server: Payload, clients: dict[int, State] | None, init: State) -> None:
        if clients is None:  # the clients' states live on their nodes: nothing here resumes them
            return
        tensors = {f"server/{k}": v for k, v in server.items()}
        tensors.update({f"client/{c}/{k}": v for c, state in clients.items() for k, v in state.items()})
        devices = {k: str(v.device) for k, v in tensors.items() if v.device.type != "cpu"}
        blob = st_save(_unshared(tensors))
        data = self.path.with_name(f"checkpoint-{next_round:05d}.safetensors")
        write_atomic(data, blob)
        manifest = {
            "format": FORMAT,
            "round": next_round,
            "file": data.name,
            "bytes": len(blob),
            "sha256": sha256_bytes(blob),
            "trainable": sorted(init),
            "clients": sorted(int(c) for c in clients),
            "devices": devices,
        }
        write_atomic(self.path, (json.dumps(manifest, indent=1) + "\n").encode())
        for old in self.path.parent.glob("checkpoint-*.safetensors"):
            if old.name != data.name:
                old.unlink(missing_ok=True)

    def _manifest(self) -> dict:
        try:
            manifest = json.loads(self.path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError):
            manifest = None
        keys = ("format", "round", "file", "sha256", "trainable", "clients")
        if not isinstance(manifest, dict) or any(k not in manifest for k in keys) or manifest["format"] != FORMAT:
            raise IntegrityError(
                f"checkpoint manifest '{self.path}' is damaged (not a {FORMAT} manifest); {self._fix()}"
            )
        if Path(manifest["file"]).name != manifest["file"]:
            raise IntegrityError(f"checkpoint manifest '{self.path}' names a file outside its directory; {self._fix()}")
        return manifest

    def load(self, init: State) -> tuple[int, Payload, dict[int, State]] | None:
        if not self.path.is_file():
            return None
        manifest = self._manifest()
        if sorted(manifest["trainable"]) != sorted(init):
            raise CheckpointMismatch(
                f"checkpoint '{self.path}' was written by a model with other parameters "
                "(code changed since); remove that run directory or use another --results"
            )
        data = self.path.with_name(manifest["file"])
        blob = read_checked(data, manifest["sha256"], "checkpoint", self._fix())
        try:
            tensors = st_load(blob)
        except (SafetensorError, ValueError) as err:  # only if the recorded checksum was made for bad bytes
            raise IntegrityError(f"checkpoint '{data}' is not a safetensors file ({err}); {self._fix()}") from None
        devices = manifest.get("devices", {})
        server: Payload = {}
        clients: dict[int, State] = {int(c): {} for c in manifest["clients"]}
        for key, tensor in tensors.items():
            tensor = tensor.to(devices[key]) if key in devices else tensor
            scope, _, name = key.partition("/")
            if scope == "server":
                server[name] = tensor
            else:
                client, _, name = name.partition("/")
                clients[int(client)][name] = tensor
        return manifest["round"], server, clients

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        for old in self.path.parent.glob("checkpoint-*.safetensors"):
            old.unlink(missing_ok=True)
        (self.path.parent / LEGACY).unlink(missing_ok=True)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """On CPU and contiguous, a tensor whose storage another one already uses copied (safetensors
    refuses shared memory); the others are not copied."""
    out, seen = {}, set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr and ptr in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def truncate_records(path: Path, next_round: int) -> None:
    """Drop records of rounds from ``next_round`` on (a kill between append and checkpoint), a torn
    last line, and the ``kind="failed"`` record of an earlier attempt (this one runs again)."""
    if not path.is_file():
        return
    keep = [r for r in read_jsonl(path) if r.get("round", -1) < next_round and r.get("kind") != "failed"]
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_bytes(b"")
        append_records(tmp, keep)
        tmp.replace(path)
    except BaseException:  # a full disk or a kill: the records stay as they were, no stray .tmp
        tmp.unlink(missing_ok=True)
        raise
