"""Checkpoints: the server state and where the clients' stored states are after the last completed
round, so a killed run resumes to the same records. Safetensors, never pickle, and checked on read.

The clients' states are already on disk, one immutable file per client and version in the run's
``clients/`` directory (:mod:`fedbench.client_store`), written when a client trains. A checkpoint
adds, in the run directory:

- ``server-<round>.safetensors``: the server state;
- ``checkpoint.json``, the manifest: the round to resume from, the server file's name, size and
  sha256, the trainable parameter names of the model that wrote it, and each client's file and size
  (the file name ends in its sha256).

So a round's checkpoint writes the server state, the manifest and the files of the clients that
trained in it: its bytes grow with the clients of the round (and a few dozen bytes of manifest per
client), not with every client's state. The manifest is renamed into place last, so it always names
complete files: a kill at any point leaves the previous checkpoint or the new one, and files the
current one no longer names are removed only once it is in place (or on resume). A manifest or file
that does not match (truncated, edited) stops the run with one line naming the file; a checkpoint
written by a model with other parameters, or by an earlier format, raises :class:`CheckpointMismatch`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedbench.client_store import ClientStore, StoredFile, unshared
from fedbench.integrity import IntegrityError, read_checked, sha256_bytes, write_atomic
from fedbench.payload import Payload
from fedbench.records import append_records, read_jsonl

State = dict[str, torch.Tensor]
FORMAT = "fedbench-checkpoint/2"
OLD_FORMATS = ("fedbench-checkpoint/1",)  # one tensor file holding every client's state
LEGACY = "checkpoint.pt"  # the pickle-based format of earlier versions: never read, removed on finish
CLIENTS = "clients"  # the run's client store, beside the manifest


class CheckpointMismatch(RuntimeError):
    """A checkpoint that the current code cannot resume."""


class Checkpoint:
    """``path`` is the manifest (``checkpoint.json``); the server state and the client store sit
    beside it (see the module). :attr:`clients` is the run's client store."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.clients = ClientStore(self.path.parent / CLIENTS)
        self.bytes_written = 0  # by the last save: server file + manifest + the clients' new files

    def _fix(self) -> str:
        return f"delete '{self.path.parent}' to run it again from round 0"

    def save(self, next_round: int, server: Payload, clients: ClientStore | None, init: State) -> None:
        """Write the server state and the manifest naming ``clients``' current files, then remove
        the files neither names any more. ``clients`` None: the states live on the clients' nodes,
        nothing here could resume them, nothing is written."""
        if clients is None:
            return
        if clients is not self.clients:
            raise TypeError("a checkpoint names the files of its own client store (Checkpoint.clients)")
        devices = {k: str(v.device) for k, v in server.items() if v.device.type != "cpu"}
        blob = st_save(unshared(server))
        data = self.path.with_name(f"server-{next_round:05d}.safetensors")
        write_atomic(data, blob)
        manifest = {
            "format": FORMAT,
            "round": next_round,
            "file": data.name,
            "bytes": len(blob),
            "sha256": sha256_bytes(blob),
            "trainable": sorted(init),
            "devices": devices,
            "clients": {str(c): [f.name, f.bytes] for c, f in sorted(clients.files().items())},
        }
        text = (json.dumps(manifest, separators=(",", ":")) + "\n").encode()
        new_files = sum(f.bytes for f in clients.written.values())
        write_atomic(self.path, text)
        clients.commit()
        self._remove_server_files(keep=data.name)
        self.bytes_written = len(blob) + len(text) + new_files

    def _manifest(self) -> dict:
        try:
            manifest = json.loads(self.path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError):
            manifest = None
        if isinstance(manifest, dict) and manifest.get("format") in OLD_FORMATS:
            raise CheckpointMismatch(
                f"checkpoint '{self.path}' was written by an earlier version of fedbench "
                f"({manifest['format']}); {self._fix()}"
            )
        keys = ("format", "round", "file", "sha256", "trainable", "clients")
        if not isinstance(manifest, dict) or any(k not in manifest for k in keys) or manifest["format"] != FORMAT:
            raise IntegrityError(
                f"checkpoint manifest '{self.path}' is damaged (not a {FORMAT} manifest); {self._fix()}"
            )
        clients = manifest["clients"]
        if not isinstance(clients, dict) or not all(
            str(c).isdigit() and isinstance(e, list) and len(e) == 2 and isinstance(e[1], int)
            for c, e in clients.items()
        ):
            raise IntegrityError(f"checkpoint manifest '{self.path}' is damaged (its clients); {self._fix()}")
        names = [manifest["file"]] + [e[0] for e in clients.values()]
        if any(not isinstance(n, str) or not n or Path(n).name != n for n in names):
            raise IntegrityError(f"checkpoint manifest '{self.path}' names a file outside its directory; {self._fix()}")
        return manifest

    def load(self, init: State) -> tuple[int, Payload] | None:
        """The round to resume from and the server state; :attr:`clients` then holds that round's
        states (files written after it are removed). None, with :attr:`clients` emptied, when there
        is no checkpoint."""
        if not self.path.is_file():
            self.clients.restore({})
            self._remove_server_files(keep=None)
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
        server: Payload = {k: t.to(devices[k]) if k in devices else t for k, t in tensors.items()}
        self.clients.restore({int(c): StoredFile(name, int(size)) for c, (name, size) in manifest["clients"].items()})
        self._remove_server_files(keep=data.name)
        return manifest["round"], server

    def _remove_server_files(self, keep: str | None) -> None:
        for pattern in ("server-*.safetensors", "checkpoint-*.safetensors"):  # checkpoint-*: format 1
            for old in self.path.parent.glob(pattern):
                if old.name != keep:
                    old.unlink(missing_ok=True)

    def remove(self) -> None:
        """Everything a finished run no longer needs: manifest, server state, the clients' files."""
        self.path.unlink(missing_ok=True)
        self._remove_server_files(keep=None)
        self.clients.remove()
        (self.path.parent / LEGACY).unlink(missing_ok=True)


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
