"""Results records: JSON lines appended atomically and sealed, so a crashed or concurrent run never
corrupts a file, and a truncated, edited or missing record is found on read.

Each run appends to ``results_dir/runs/<run_id>/records.jsonl``; the leaderboard reads exactly those
files back (:func:`read_records`), never other ``*.jsonl`` files. A write is one ``os.write`` of whole
lines on an ``O_APPEND`` descriptor, so readers only ever see complete rows, except for a torn tail
after a crash mid-write, which :func:`read_jsonl` drops with a warning naming the file and line (never
parsed). Only one process writes a run directory at a time: it holds the directory's
:class:`DirectoryLock`.

**Seals.** Every row is written with a ``seal``, its last field: the sha256 (hex) of the previous row's
seal (``""`` for the first row of a file) followed by the row's own line as written without the seal
(the exact bytes of ``json.dumps(row)``). The seals chain the rows of a file in order, so a row that
was edited, deleted, inserted or moved breaks the chain at the first row after it; a checkpoint
records the seal and the number of rows that its round ends at (:mod:`fedbench.runtime.checkpoint`), which
finds rows cut from the end while a run is in progress, and a completed run's ``kind="run"`` row is
sealed behind everything it completes. :func:`read_jsonl` verifies every sealed file it reads (and
returns the rows without their ``seal``); a broken file is one :class:`IntegrityError` naming the
file, the run and the round, and how to recover: run it again, and resume keeps the records that
verify and reruns from the last round its checkpoint and records both reach (round 0 without one).

**Legacy files.** Records written before seals existed carry none. A file whose *first* row has no
seal is legacy: readable, not verifiable, and appended to without seals (it stays legacy). A file
whose first row is sealed must be sealed throughout: a row without a seal there (or with one in a
legacy file) is a broken file. Both kinds get the same check that a completed run is whole
(:func:`incomplete_run`): its last evaluation scores every task and client it should.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedbench.utils.integrity import IntegrityError, sha256_bytes

SEAL = "seal"  # the field that holds a row's seal: always the last one of its line
GENESIS = ""  # the "previous seal" of a file's first row
RECOVER = (
    "run it again (`fedbench run` with the same protocol and --results): resume keeps the records that "
    "verify and reruns the rest, from round 0 when no checkpoint covers them"
)


def _to_json(obj: Any) -> Any:
    """``json.dumps`` fallback: numpy scalars/arrays and paths come out of the harness unconverted."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"record value {obj!r} of type {type(obj).__name__} is not JSON-serialisable")


def _seal(prev: str, body: bytes) -> str:
    """The seal of a row whose line without its seal is ``body``, after a row sealed ``prev``."""
    return sha256_bytes(prev.encode() + body)


def _with_seal(body: bytes, seal: str) -> bytes:
    """``body`` (a JSON object's text) with ``"seal": seal`` as its last field."""
    field_ = f'"{SEAL}": "{seal}"}}'.encode()
    return b"{" + field_ if body == b"{}" else body[:-1] + b", " + field_


def _body(line: bytes, seal: object) -> bytes | None:
    """The line as it was sealed (without its ``seal`` field), or None when the field is not where and
    how the writer puts it."""
    if not isinstance(seal, str):
        return None
    with_it = _with_seal(b"{}", seal)
    if line == with_it:
        return b"{}"
    suffix = with_it[1:]
    if line.endswith(b", " + suffix):
        return line[: -len(suffix) - 2] + b"}"
    return None


def _tail_row(fd: int, size: int) -> dict | None:
    """The last complete row of the open file (read backwards; a torn tail or fragment is skipped),
    or None when it holds none."""
    pos, buf, checked, chunk = size, b"", 0, 1 << 16
    while pos > 0:
        start = max(0, pos - chunk)
        buf = os.pread(fd, pos - start, start) + buf
        pos = start
        lines = buf.split(b"\n")
        complete = lines[:-1] if pos == 0 else lines[1:-1]  # lines[-1]: after the last newline (torn)
        for line in reversed(complete[: len(complete) - checked]):
            try:
                row = json.loads(line) if line.strip() else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                row = None
            if isinstance(row, dict):
                return row
        checked, chunk = len(complete), chunk * 2
    return None


def append_records(path: Path, rows: list[dict]) -> str | None:
    """Append ``rows`` to ``path`` as sealed JSON lines in a single write, then fsync; returns the
    last row's seal (None for a legacy file, which gets unsealed rows, or for no rows).

    The text is fully built (and every value serialised) before the file is touched, so a bad value
    raises without writing anything. If a previous writer crashed mid-row, the torn tail is closed
    with a newline first so the new rows stay on lines of their own; the chain goes on from the last
    complete row (a torn row was never part of it). A ``seal`` field in ``rows`` is replaced."""
    if not rows:
        return None
    bodies = [json.dumps({k: v for k, v in row.items() if k != SEAL}, default=_to_json).encode() for row in rows]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        last = _tail_row(fd, size) if size else None
        seal = None
        if last is None or SEAL in last:  # a new (or sealed) file: chain on
            seal = GENESIS if last is None else str(last[SEAL])
            lines = []
            for body in bodies:
                seal = _seal(seal, body)
                lines.append(_with_seal(body, seal))
            bodies = lines
        data = b"".join(line + b"\n" for line in bodies)
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        try:
            written = os.write(fd, data)
        except OSError as err:  # name the file: "No space left on device" alone says not where
            raise OSError(err.errno, err.strerror or str(err), str(path)) from None
        if written != len(data):
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes (disk full?)")
        os.fsync(fd)
    finally:
        os.close(fd)
    return seal


@dataclass
class RecordScan:
    """One records file as read: its complete rows (without ``seal``) in file order, their line numbers,
    raw lines and seals, and how far they verify. ``verified`` rows from the start are whole (all of
    them for a whole or a legacy file); ``problem`` says what is wrong with the row after them."""

    path: Path
    rows: list[dict] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    seals: list[str | None] = field(default_factory=list)
    sealed: bool = False
    verified: int = 0
    problem: str | None = None

    @property
    def whole(self) -> bool:
        return self.problem is None

    def head(self, n: int | None = None) -> str | None:
        """The seal after the first ``n`` rows (all verified ones by default): what a checkpoint records."""
        n = self.verified if n is None else n
        if not self.sealed:
            return None
        return self.seals[n - 1] if n else GENESIS

    def run_id(self) -> str:
        for row in self.rows:
            if isinstance(row.get("run_id"), str):
                return row["run_id"]
        return self.path.parent.name

    def last_round(self, n: int | None = None) -> int | None:
        """The highest ``round`` among the first ``n`` rows (the verified ones by default)."""
        rounds = [r["round"] for r in self.rows[: self.verified if n is None else n] if isinstance(r.get("round"), int)]
        return max(rounds) if rounds else None

    def error(self, recover: bool = True) -> str:
        """The one line that says what is broken, where, and (``recover``) how to recover."""
        i = self.verified
        row = self.rows[i] if i < len(self.rows) else {}
        rnd, before = row.get("round"), self.last_round()
        if isinstance(rnd, int):
            what = f"a record of round {rnd}"
        else:
            after = f", after round {before}" if before is not None else ""
            what = f"its {row.get('kind', 'unnamed')} record{after}"
        at = f"line {self.lines[i]} ({what})" if i < len(self.lines) else "its end"
        through = f" (through round {before})" if before is not None else ""
        head = f"records '{self.path}' of run '{self.run_id()}' are broken at {at}"
        tail = f"; {RECOVER}" if recover else ""
        return f"{head}: {self.problem}; the {i} record(s) before it verify{through}{tail}"


def scan_records(path: Path, warn: bool = True) -> RecordScan:
    """Every complete row of one records file and how far its seals verify (see the module): never
    raises on a broken file (:func:`read_jsonl` does). A last line without a newline is a write cut by
    a kill (or still in flight) and a line that is not a JSON object a torn row that a later append
    closed: both are skipped, with a warning naming the file and line when ``warn``."""
    path = Path(path)
    lines = path.read_bytes().split(b"\n")
    scan = RecordScan(path)
    prev = GENESIS
    for lineno, line in enumerate(lines[:-1], start=1):  # lines[-1] is b"" or an unfinished row
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            row = None
        if not isinstance(row, dict):  # only a crash mid-write leaves a fragment, and append_records closes it
            if warn:
                warnings.warn(
                    f"{path}:{lineno}: skipping a torn record line (not a JSON object)", RuntimeWarning, stacklevel=3
                )
            continue
        seal = row.pop(SEAL, None)
        if not scan.rows:
            scan.sealed = seal is not None
        if scan.problem is None:
            if not scan.sealed and seal is not None:
                scan.problem = "it carries a seal, but the file's first row does not (a legacy file holds none)"
            elif scan.sealed and seal is None:
                scan.problem = "it has no seal, but the file's rows are sealed (a seal removed, or a row inserted)"
            elif scan.sealed:
                body = _body(line, seal)
                if body is None or _seal(prev, body) != seal:
                    scan.problem = (
                        "its seal does not match (this record was edited, or one before it deleted, "
                        "inserted or changed)"
                    )
                else:
                    prev = seal
            if scan.problem is None:
                scan.verified += 1
        scan.rows.append(row)
        scan.lines.append(lineno)
        scan.raw.append(line)
        scan.seals.append(seal if isinstance(seal, str) else None)
    if lines[-1].strip() and warn:
        warnings.warn(
            f"{path}:{len(lines)}: skipping an incomplete last record ({len(lines[-1])} bytes, no newline: "
            "a write cut by a kill, or still in flight)",
            RuntimeWarning,
            stacklevel=3,
        )
    return scan


def rewrite_records(path: Path, scan: RecordScan, keep: list[int]) -> str | None:
    """Replace ``path`` by the rows ``keep`` (indices into ``scan.rows``, in order), through a temporary
    file renamed over it; returns the seal after them (None for a legacy file). Rows kept from the
    start of the file keep their lines (and seals) byte for byte; after the first row left out, the
    rest are sealed again. A full disk or a kill leaves the records as they were, and no stray file."""
    out, prev = [], GENESIS
    for j, i in enumerate(keep):
        if not scan.sealed or (i == j and scan.seals[i] is not None and j < scan.verified):
            out.append(scan.raw[i])
            prev = scan.seals[i] or GENESIS
        else:
            body = json.dumps(scan.rows[i], default=_to_json).encode()
            prev = _seal(prev, body)
            out.append(_with_seal(body, prev))
    tmp = Path(path).with_suffix(".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(b"".join(line + b"\n" for line in out))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return None if keep and not scan.sealed else prev  # an emptied file is sealed from its next row


def read_jsonl(path: Path) -> list[dict]:
    """Complete rows of one file, checked: every record ends with a newline, so a last line without one
    is a write cut by a kill (or still in flight): it is dropped, never parsed, with a warning naming
    the file and line; so is a line that is not a JSON object (a torn row that a later append closed).
    A sealed file whose seals do not verify raises :class:`IntegrityError` (one line naming the file,
    run and round); a legacy file (no seals) is read as it is. The rows come without their ``seal``."""
    scan = scan_records(path)
    if not scan.whole:
        raise IntegrityError(scan.error())
    return scan.rows


def _clients(rows: list[dict], scope: str) -> dict[int, dict[str, Any]]:
    """client -> {task: held} of the eval rows of one scope."""
    out: dict[int, dict[str, Any]] = {}
    for r in rows:
        if r.get("scope") == scope:
            out.setdefault(r.get("client"), {})[r.get("task")] = r.get("held")
    return out


def incomplete_run(rows: list[dict]) -> str | None:
    """Why the completed run that ``rows`` (one run's records, in file order) holds is not whole, or
    None (also for a run that does not claim to be complete). Its last evaluation must be of its last
    round and score every task that an earlier one scored (unless a client dropped out of it) and every
    task a scored client holds; in a run that scores clients, every client that took part (trained,
    was scored, is in the partition) is scored or recorded as dropped, each on every task it was asked
    and on its own tasks on its own test split; a global score over ``clients`` clients has that many
    client scores; and the majority reference covers the scored tasks. Only what the records show is
    checked, so hand-made records with fewer kinds of rows pass on what they hold."""
    run = next((r for r in reversed(rows) if r.get("kind") == "run" and r.get("completed")), None)
    if run is None:
        return None
    evals = [r for r in rows if r.get("kind") == "eval" and isinstance(r.get("round"), int)]
    if not evals:
        return "it has no evaluation"
    final = max(r["round"] for r in evals)
    rounds = run.get("rounds")
    if isinstance(rounds, int) and final < rounds - 1:
        return f"its last evaluation is of round {final}, not of its last round {rounds - 1}"
    last = [r for r in evals if r["round"] == final]
    of = f"its last evaluation (round {final})"
    dropped = {r.get("client") for r in rows if r.get("kind") == "drop" and r.get("round") == final}
    scored_global = {r.get("task") for r in last if r.get("scope") == "global"}
    asked, own = _clients(last, "client_global"), _clients(last, "client")
    held = {c: {t for t, h in tasks.items() if h} for c, tasks in asked.items()}
    expected = {t for tasks in held.values() for t in tasks} | {t for tasks in own.values() for t in tasks}
    if not dropped:
        expected |= {r.get("task") for r in evals if r.get("scope") == "global"}
    missing = sorted(map(str, expected - scored_global))
    if missing:
        return f"{of} has no global score of task(s) {', '.join(missing)}"
    takers = {r.get("client") for r in evals if r.get("scope") in ("client", "client_global")}
    if takers:  # the run scores clients: its last evaluation scores each one that took part
        takers |= {r.get("client") for r in rows if r.get("kind") == "train" and isinstance(r.get("client"), int)}
        partition = run.get("partition")
        if isinstance(partition, list):
            takers |= {p.get("client") for p in partition if isinstance(p, dict)}
    takers = {c for c in takers if isinstance(c, int) and c >= 0}
    missing = sorted(takers - set(asked) - set(own) - dropped)
    if missing:
        return f"{of} has no score of client(s) {', '.join(map(str, missing))}"
    every = {t for tasks in asked.values() for t in tasks}
    for client in sorted(set(asked) | set(own)):
        gaps = sorted(map(str, every - set(asked.get(client, {})))) if asked else []
        if gaps:
            return f"{of} has no global-test score of client {client} for task(s) {', '.join(gaps)}"
        gaps = sorted(map(str, held.get(client, set()) - set(own.get(client, {}))))
        if gaps:
            return f"{of} has no own-test score of client {client} for task(s) {', '.join(gaps)}"
    if asked and not dropped:
        for r in last:
            if r.get("scope") == "global" and isinstance(r.get("clients"), int):
                holders = sum(r.get("task") in tasks for tasks in held.values())
                if r["clients"] != holders:
                    return (
                        f"{of} scores task {r.get('task')} over {r['clients']} client(s), "
                        f"but {holders} client score(s) of it are recorded"
                    )
    majority = {r.get("task") for r in rows if r.get("kind") == "majority"}
    missing = sorted(map(str, scored_global - majority)) if majority else []
    if missing:
        return f"its majority reference has no score of task(s) {', '.join(missing)}"
    return None


def check_run_file(scan: RecordScan) -> None:
    """A file under ``runs/<run_id>/`` read as records: whole (see :func:`read_jsonl`), every row a
    fedbench record (with its ``run_id``), every completed run in it whole (:func:`incomplete_run`);
    else one :class:`IntegrityError` naming the file (and the run and round)."""
    if not scan.whole:
        raise IntegrityError(scan.error())
    for row, lineno in zip(scan.rows, scan.lines, strict=True):
        if not isinstance(row.get("run_id"), str):
            raise IntegrityError(
                f"records '{scan.path}' line {lineno} has no run_id: it is not a fedbench record "
                "(only `fedbench run` writes runs/<run_id>/records.jsonl); move that file out of the results directory"
            )
    by_run: dict[str, list[dict]] = {}
    for row in scan.rows:
        by_run.setdefault(row["run_id"], []).append(row)
    for run_id, rows in by_run.items():
        why = incomplete_run(rows)
        if why is not None:
            raise IntegrityError(
                f"records '{scan.path}' of run '{run_id}' claim a completed run, but {why} "
                f"(a record deleted or cut off?); {RECOVER}"
            )


def read_records(results_dir: Path) -> pd.DataFrame:
    """The records of every run of a results directory (``results_dir/runs/<run_id>/records.jsonl``, the
    files `fedbench run` writes; no other file is read), each file checked (:func:`check_run_file`),
    as one DataFrame."""
    results_dir = Path(results_dir)
    files = sorted(p for p in results_dir.glob("runs/*/records.jsonl") if p.is_file()) if results_dir.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no runs/<run_id>/records.jsonl under results directory {results_dir}")
    rows = []
    for path in files:
        scan = scan_records(path)
        check_run_file(scan)
        rows += scan.rows
    if not rows:
        raise FileNotFoundError(f"the runs/<run_id>/records.jsonl files under {results_dir} hold no complete records")
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
