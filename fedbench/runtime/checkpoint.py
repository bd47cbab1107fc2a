"""Checkpoints: the server state and where the clients' stored states are after the last completed
round, so a killed run resumes to the same records. Safetensors, never pickle, and checked on read.

The clients' states are already on disk, one immutable file per client and version in the run's
``clients/`` directory (:mod:`fedbench.runtime.client_store`), written when a client trains. A checkpoint
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

The manifest also ties the checkpoint to the run's sealed records (:mod:`fedbench.utils.records`): how many
rows the records file held after its round and the seal of the last one (``records``), and its own
sha256 (``digest``, over the manifest without it), so an edited manifest is refused. On resume
(:func:`truncate_records`) the records must verify through those rows, and those rows must end with
the round before the manifest's: a manifest that names other records (or another round) is refused
in one line; rows after them (a kill between append and checkpoint) are dropped; records cut short
or broken before them (the rounds in between are lost) make the run start again from round 0, with a
warning, since only the latest round's state is kept. A manifest of format 2 (before seals) still
resumes, unverified, as before.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedbench.api.payload import Payload
from fedbench.runtime.client_store import ClientStore, StoredFile, unshared
from fedbench.utils.integrity import IntegrityError, read_checked, sha256_bytes, write_atomic
from fedbench.utils.records import GENESIS, incomplete_run, rewrite_records, scan_records

State = dict[str, torch.Tensor]
FORMAT = "fedbench-checkpoint/3"
UNSEALED_FORMATS = ("fedbench-checkpoint/2",)  # before sealed records: no records head, no digest; still resumes
OLD_FORMATS = ("fedbench-checkpoint/1",)  # one tensor file holding every client's state
RecordsHead = tuple[int, "str | None"]  # rows of the records file after the checkpoint's round, last row's seal
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
        # the records a checkpoint covers: the rows of the run's records file after its round and the
        # last one's seal (None: a legacy file); set before save, read back by load (None: not known)
        self.covers: RecordsHead | None = None

    def _fix(self) -> str:
        return f"delete '{self.path.parent}' to run it again from round 0"

    def save(self, next_round: int, server: Payload, clients: ClientStore | None, init: State) -> None:
        """Write the server state and the manifest naming ``clients``' current files and the records
        it covers (:attr:`covers`, set by the caller), then remove the files neither names any more.
        ``clients`` None: the states live on the clients' nodes, nothing here could resume them,
        nothing is written."""
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
            "records": None if self.covers is None else [int(self.covers[0]), self.covers[1]],
        }
        manifest["digest"] = _digest(manifest)
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
        if (
            not isinstance(manifest, dict)
            or any(k not in manifest for k in keys)
            or manifest["format"] not in (FORMAT, *UNSEALED_FORMATS)
        ):
            raise IntegrityError(
                f"checkpoint manifest '{self.path}' is damaged (not a {FORMAT} manifest); {self._fix()}"
            )
        if manifest["format"] == FORMAT:
            if manifest.get("digest") != _digest({k: v for k, v in manifest.items() if k != "digest"}):
                raise IntegrityError(
                    f"checkpoint manifest '{self.path}' is damaged: its digest does not match its contents "
                    f"(edited by hand?); {self._fix()}"
                )
            head = manifest.get("records")
            if head is not None and not (
                isinstance(head, list)
                and len(head) == 2
                and isinstance(head[0], int)
                and head[0] >= 0
                and (head[1] is None or isinstance(head[1], str))
            ):
                raise IntegrityError(f"checkpoint manifest '{self.path}' is damaged (its records); {self._fix()}")
        if not isinstance(manifest["round"], int) or manifest["file"] != f"server-{manifest['round']:05d}.safetensors":
            raise IntegrityError(
                f"checkpoint manifest '{self.path}' is damaged: its round {manifest['round']!r} is not that of "
                f"its server state '{manifest['file']}'; {self._fix()}"
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
        head = manifest.get("records")
        self.covers = (head[0], head[1]) if head is not None else None
        return manifest["round"], server

    def discard(self) -> None:
        """Forget the checkpoint (its records are lost: the run starts again from round 0): the
        manifest first, so a kill meanwhile leaves no manifest naming removed files."""
        self.path.unlink(missing_ok=True)
        self._remove_server_files(keep=None)
        self.clients.restore({})
        self.covers = None

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


def _digest(manifest: dict) -> str:
    return sha256_bytes(json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode())


@dataclass(frozen=True)
class Kept:
    """What :func:`truncate_records` left: the round to run from, the rows kept and the seal after
    them (None: a legacy file, appended to without seals)."""

    start: int
    rows: int
    seal: str | None


def truncate_records(
    path: Path, next_round: int, head: RecordsHead | None = None, manifest: Path | None = None
) -> Kept:
    """The records of a run about to (re)start at ``next_round``, made to match: rows of rounds from
    ``next_round`` on (a kill between append and checkpoint), a torn last line and the ``kind="failed"``
    record of an earlier attempt (this one runs again) are dropped, and so is every row from the first
    one whose seal fails on.

    ``head`` is what the checkpoint (``manifest``) recorded: the rows after its round and the last
    one's seal. Those rows must verify and end with round ``next_round - 1``, and no row after them
    may be of an earlier round: else the manifest does not match the records, an
    :class:`IntegrityError`. Records that do not reach it (cut short, or broken before it) lose the
    rounds in between: a warning, and :attr:`Kept.start` 0 (the caller drops the checkpoint).
    Without ``head`` (no checkpoint, or one of format 2) the rows of rounds before ``next_round`` are
    kept, and must hold every one of those rounds (else, again, start 0)."""
    path = Path(path)
    if not path.is_file():
        lost = next_round > 0
        if lost:
            warnings.warn(
                f"{path} is missing, but its checkpoint resumes from round {next_round}: the records of the rounds "
                "before are lost; the run starts again from round 0",
                RuntimeWarning,
                stacklevel=2,
            )
        return Kept(0 if lost else next_round, 0, GENESIS)
    scan = scan_records(path)
    usable = scan.verified
    if not scan.whole:
        warnings.warn(
            f"{scan.error(recover=False)}; its rows from line {scan.lines[usable]} on are dropped and rerun",
            RuntimeWarning,
            stacklevel=2,
        )
    rows = scan.rows[:usable]
    why = incomplete_run(rows)
    if why is not None:
        warnings.warn(
            f"{path}: the records of run '{scan.run_id()}' claim a completed run, but {why}; it runs again",
            RuntimeWarning,
            stacklevel=2,
        )
    start = next_round
    if head is not None:
        n, seal = head
        if n > usable:
            keep = []
            start = 0
        else:
            problem = None
            if scan.head(n) != seal:
                problem = f"the seal after its {n} rows is not the one the checkpoint recorded"
            elif next_round > 0 and (n == 0 or rows[n - 1].get("round") != next_round - 1):
                got = rows[n - 1].get("round") if n else None
                problem = f"its row {n} is of round {got}, not of round {next_round - 1}"
            elif any(not isinstance(r.get("round"), int) or r["round"] >= next_round for r in rows[:n]):
                problem = f"its first {n} rows are not all of rounds before {next_round}"
            elif any(isinstance(r.get("round"), int) and r["round"] < next_round for r in rows[n:]):
                problem = f"rows after its first {n} are of rounds before {next_round}"
            if problem is not None:
                where = manifest.parent if manifest is not None else path.parent
                raise IntegrityError(
                    f"checkpoint manifest '{manifest}' does not match the records '{path}': it resumes from round "
                    f"{next_round} after {n} record(s), but {problem}; delete '{where}' to run it again from round 0"
                )
            keep = list(range(n))
    else:
        keep = [i for i, r in enumerate(rows) if isinstance(r.get("round"), int) and r["round"] < next_round]
        if {rows[i]["round"] for i in keep} != set(range(next_round)):
            keep, start = [], 0
    if start != next_round:
        last = scan.last_round()
        there = f"{usable} record(s) verify" + (f" (the last of round {last})" if last is not None else "")
        if head is not None:
            there += f", of the {head[0]} its checkpoint covers (rounds 0-{next_round - 1})"
        else:
            there += f", not every round before its checkpoint's round {next_round}"
        warnings.warn(
            f"{path}: {there}: the rest are lost (cut short or changed); run '{scan.run_id()}' starts again "
            "from round 0",
            RuntimeWarning,
            stacklevel=2,
        )
    seal = rewrite_records(path, scan, keep)
    return Kept(start, len(keep), seal)
