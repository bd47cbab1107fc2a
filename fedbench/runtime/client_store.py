"""Clients' stored states on disk: one safetensors file per client, written only when it trains.

A federation of thousands of clients trains a few of them per round, so their states live in files,
not on the heap: memory holds the model and the clients of the round, plus a small index (file name
and size per client). Each write makes a new, immutable file ``<client>-<version>-<sha256>.safetensors``
(the name carries its checksum, checked on every read), so a file that a checkpoint names is never
overwritten: a kill while round ``r + 1`` writes its clients' files leaves round ``r``'s files, and its
checkpoint, intact.

Two ways to use one:

- the run's store (in process): its index is the truth, saved in each checkpoint's manifest
  (:mod:`fedbench.runtime.checkpoint`); a file superseded by a newer one stays until the checkpoint that no
  longer names it is in place (:meth:`ClientStore.commit`), and :meth:`ClientStore.restore` goes
  back to a manifest's files, removing any written after it;
- a Flower node's store (``shared=True``): several worker processes serve one node, so each look-up
  finds the client's newest file on disk, and a write removes the file it supersedes at once.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fedbench.api.payload import deserialize, serialize
from fedbench.utils.integrity import IntegrityError, read_checked, sha256_bytes, write_atomic

State = dict[str, torch.Tensor]
_NAME = re.compile(r"^(\d+)-(\d+)-([0-9a-f]{64})\.safetensors$")


@dataclass(frozen=True)
class StoredFile:
    """One client's state on disk: its file name (which ends in the sha256 of its bytes) and size."""

    name: str
    bytes: int

    @property
    def version(self) -> int:
        return int(self.name.split("-")[1])

    @property
    def sha256(self) -> str:
        return self.name.split("-")[2].removesuffix(".safetensors")


class ClientStore(MutableMapping[int, State]):
    """Client id -> stored state, each state a file under ``directory`` (see the module)."""

    def __init__(self, directory: Path, shared: bool = False) -> None:
        self.dir = Path(directory)
        self.shared = shared
        self.index: dict[int, StoredFile] = {}  # the run's store: every client's current file
        self.written: dict[int, StoredFile] = {}  # files written since the last commit (a checkpoint's new ones)
        self._superseded: list[str] = []  # files a newer one replaced, removed once no checkpoint names them

    # --- the mapping --------------------------------------------------------------------------------
    def _entry(self, client: int) -> StoredFile | None:
        if not self.shared:
            return self.index.get(int(client))
        newest = self._on_disk(int(client))
        return newest[-1] if newest else None

    def _on_disk(self, client: int) -> list[StoredFile]:
        """The client's files in this directory, oldest first."""
        files = []
        for path in self.dir.glob(f"{client}-*.safetensors"):
            if _NAME.match(path.name):
                files.append(StoredFile(path.name, path.stat().st_size))
        return sorted(files, key=lambda f: f.version)

    def __getitem__(self, client: int) -> State:
        """The stored state, read and checked against the sha256 in its name."""
        entry = self._entry(client)
        if entry is None:
            raise KeyError(client)
        fix = f"the state directory '{self.dir}' was changed; delete the run directory to run it again"
        return deserialize(read_checked(self.dir / entry.name, entry.sha256, f"stored state of client {client}", fix))

    def __setitem__(self, client: int, state: State) -> None:
        """A new file for the client (the one it replaces stays until :meth:`commit`, or, on a node's
        shared store, until this one is in place)."""
        client = int(client)
        blob = serialize(unshared(state))
        old = self._entry(client)
        version = 0 if old is None else old.version + 1
        entry = StoredFile(f"{client}-{version}-{sha256_bytes(blob)}.safetensors", len(blob))
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.dir / entry.name, blob)
        if self.shared:
            for stale in self._on_disk(client)[:-1]:
                (self.dir / stale.name).unlink(missing_ok=True)
            return
        if old is not None:
            self._superseded.append(old.name)
        self.index[client] = self.written[client] = entry

    def __delitem__(self, client: int) -> None:
        entry = self._entry(client)
        if entry is None:
            raise KeyError(client)
        if self.shared:
            for stale in self._on_disk(int(client)):
                (self.dir / stale.name).unlink(missing_ok=True)
            return
        del self.index[int(client)]
        self.written.pop(int(client), None)
        self._superseded.append(entry.name)

    def __contains__(self, client: object) -> bool:
        return isinstance(client, int) and self._entry(client) is not None

    def __iter__(self) -> Iterator[int]:
        if not self.shared:
            return iter(sorted(self.index))
        return iter(sorted({int(m.group(1)) for p in self.dir.glob("*.safetensors") if (m := _NAME.match(p.name))}))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    # --- checkpoints (the run's store) ---------------------------------------------------------------
    def files(self) -> dict[int, StoredFile]:
        """Every client's current file: what a checkpoint's manifest names."""
        return dict(self.index)

    def commit(self) -> None:
        """Called once a checkpoint naming :meth:`files` is in place: the files it replaced go."""
        for name in self._superseded:
            (self.dir / name).unlink(missing_ok=True)
        self._superseded, self.written = [], {}

    def restore(self, files: Mapping[int, StoredFile]) -> None:
        """Back to a checkpoint's files (checked for presence and size here, for their sha256 when
        read); every other file in the directory (written after that checkpoint, or superseded
        before it) is removed. An empty ``files`` empties the store."""
        files = {int(c): e for c, e in files.items()}
        for client, entry in files.items():
            path = self.dir / entry.name
            size = path.stat().st_size if path.is_file() else None
            named = _NAME.match(entry.name)
            if size != entry.bytes or named is None or int(named.group(1)) != client:
                what = "is missing" if size is None else f"has {size} bytes, not the {entry.bytes} recorded"
                raise IntegrityError(
                    f"stored state of client {client} '{path}' {what}; delete the run directory to run it again"
                )
        keep = {entry.name for entry in files.values()}
        if self.dir.is_dir():
            for path in self.dir.iterdir():
                if path.name not in keep:
                    path.unlink(missing_ok=True)
        self.index = files
        self._superseded, self.written = [], {}

    def remove(self) -> None:
        """Every file and the directory (a finished run); the store is empty afterwards."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.index, self._superseded, self.written = {}, [], {}


def unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
