"""Results records: JSON lines appended atomically, so a crashed or concurrent run never corrupts a file.

Each run appends to ``results_dir/runs/<run_id>/records.jsonl``; the leaderboard reads them all back.
A write is one ``os.write`` of whole lines on an ``O_APPEND`` descriptor, so readers only ever see
complete rows, except for a torn tail after a crash mid-write, which :func:`read_records` ignores.
"""

from __future__ import annotations

import json
import os
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
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes (disk full?)")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict]:
    """Complete rows of one file; a last line without newline is a write still in flight or torn."""
    lines = path.read_bytes().split(b"\n")
    rows = []
    for lineno, line in enumerate(lines[:-1], start=1):  # lines[-1] is b"" or an unfinished row
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # Only a crash mid-write leaves a fragment, and append_records closes it with a newline.
            warnings.warn(f"{path}:{lineno}: skipping torn record line", RuntimeWarning, stacklevel=3)
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
