"""Files checked on read: a sha256 recorded when a file is written, compared when it is read.

A damaged file (truncated by a full disk or a kill, changed by hand) then stops with one line naming
it, never with an error deep in torch or safetensors. Nothing here (or anywhere in fedbench) reads
with pickle.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


class IntegrityError(RuntimeError):
    """A file whose bytes are not the ones recorded when it was written; the message names it."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_checked(path: Path, sha256: str, what: str, fix: str) -> bytes:
    """The bytes of ``path`` when they hash to ``sha256``; else :class:`IntegrityError` naming the
    file, what it is (``what``) and what to do (``fix``)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"{what} '{path}' is missing; {fix}") from None
    got = sha256_bytes(data)
    if got != sha256:
        raise IntegrityError(
            f"{what} '{path}' is damaged: its sha256 is {got[:12]}…, not the {sha256[:12]}… recorded when it "
            f"was written ({len(data)} bytes; truncated or changed); {fix}"
        )
    return data


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsynced, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
