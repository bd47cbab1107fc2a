"""Results records: JSON lines appended atomically, so a crashed or concurrent run never corrupts a file.

Each run appends to ``results_dir/runs/<run_id>/records.jsonl``; the leaderboard reads them all back.
A write is one ``os.write`` of whole lines on an ``O_APPEND`` descriptor, so readers only ever see
complete rows, except for a torn tail after a crash mid-write, which :func:`read_jsonl` drops with a
warning naming the file and line (never parsed). Only one process writes a run directory at a time:
it holds the directory's :class:`DirectoryLock`.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _to_json(obj: Any) -> Any:
    """``json.dumps`` fallback: numpy scalars/arrays and paths come out of the harness unconverted."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"record value {obj!r} of type {type(obj).__name__} is not JSON-serialisable")


def append_records(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` to ``path`` as JSON lines in a single write, then fsync.

    The text is fully built (and every value serialised) before the file is touched, so a bad value
    raises without writing anything. If a previous writer crashed mid-row, the torn tail is closed
    with a newline first so the new rows stay on lines of their own.
    """
    if not rows:
        return
    text = "".join(json.dumps(row, default=_to_json) + "\n" for row in rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            text = "\n" + text
        data = text.encode()
        try:
            written = os.write(fd, data)
        except OSError as err:  # name the file: "No space left on device" alone says not where
            raise OSError(err.errno, err.strerror or str(err), str(path)) from None
        if written != len(data):
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes (disk full?)")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict]:
    """Complete rows of one file. Every record ends with a newline, so a last line without one is a
    write cut by a kill (or still in flight): it is dropped, never parsed, with a warning naming the
    file and line; so is a line that is not a JSON object (a torn row that a later append closed)."""
    lines = Path(path).read_bytes().split(b"\n")
    rows = []
    for lineno, line in enumerate(lines[:-1], start=1):  # lines[-1] is b"" or an unfinished row
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:  # only a crash mid-write leaves a fragment, and append_records closes it with a newline
            warnings.warn(
                f"{path}:{lineno}: skipping a torn record line (not a JSON object)", RuntimeWarning, stacklevel=3
            )
    if lines[-1].strip():
        warnings.warn(
            f"{path}:{len(lines)}: skipping an incomplete last record ({len(lines[-1])} bytes, no newline: "
            "a write cut by a kill, or still in flight)",
            RuntimeWarning,
            stacklevel=3,
        )
    return rows


def read_records(results_dir: Path) -> pd.DataFrame:
    """All records of every ``*.jsonl`` under ``results_dir`` (recursively), as one DataFrame."""
    results_dir = Path(results_dir)
    files = sorted(results_dir.rglob("*.jsonl")) if results_dir.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no *.jsonl records under results directory {results_dir}")
    rows = [row for f in files for row in read_jsonl(f)]
    if not rows:
        raise FileNotFoundError(f"the *.jsonl files under {results_dir} hold no complete records")
    return pd.DataFrame.from_records(rows)


class DirectoryLock:
    """An exclusive lock on one run directory (``fcntl.flock`` of ``<directory>/lock``), so two
    processes never write one run's records or checkpoint at once. The kernel releases it when its
    holder exits, killed or not, so a stale lock file never blocks anything. The file names the
    holder (host and pid) for the message of a process that waits."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / "lock"
        self._fd: int | None = None

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def acquire(self, wait: bool = True, on_wait=None) -> bool:
        """Take the lock; when another process holds it: False at once (``wait`` False), or call
        ``on_wait(holder)`` and block until it is free."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(fd)
                return False
            if on_wait is not None:
                on_wait(self.holder())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
