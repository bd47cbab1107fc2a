"""The rules of a results directory (``fedbench run --results DIR``): one protocol per directory,
only fedbench's own files, and completed rows that match the code that would rerun them.

**Marker.** A directory fedbench writes into holds ``DIR/.fedbench``, JSON written when fedbench
first writes there: ``{"format": 1, "protocol_hash": ..., "protocol": <name>, "sweep": bool,
"created": <UTC time>, "adopted": bool}``. A sweep's top directory records the sweep protocol's hash,
each ``<field>=<value>/`` its variant's.

**Who may write.** ``fedbench run`` writes into DIR only when it is absent or empty (the marker is
written first), when its marker names this protocol's hash, or when it is a directory of an earlier
fedbench (no marker; a ``protocol.toml`` whose header names its hash, and/or ``runs/<run_id>/``
directories, whose ids end with the protocol hash, and their records' ``protocol_hash``): such a
directory is **adopted** (the marker is written) when every hash it shows is this protocol's.
Anything else is refused with one line before anything is written: a marker (or earlier runs) of
another protocol names both hashes; a directory fedbench did not write is left untouched. Seeds and
method rows are not part of the protocol hash, so adding seeds or rows to a directory is allowed.
Reading commands (leaderboard, report, compare, sweep-report) never write a marker.

**Code.** Before a row runs, ``runs/<run_id>/code.json`` records its code digest and the per-file
digests it covers (:func:`fedbench.runtime.provenance.code_manifest`). A row whose records were made by other
code (its ``code.json``, else its records' ``code_digest``, differs from the current one; completed or
not) is refused with one line naming the files that changed and the flag ``--rerun-changed``, which
**replaces** it: its run directory (records, checkpoint) is deleted and the row runs again under
the same run id. A row recorded before code digests existed (neither) has "code unknown": it is
skipped (or resumed) as before, and the skip line says so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedbench.config.protocol import Protocol

MARKER = ".fedbench"
FORMAT = 1
CODE_FILE = "code.json"
_HEADER = re.compile(r"^# (?:protocol hash|sweep protocol \(hash) ([0-9a-f]{6,64})\b")
_RUN_DIR = re.compile(r"^.+__seed\d+__([0-9a-f]{6,64})$")
_RECORD_HASH = re.compile(rb'"protocol_hash": "([0-9a-f]+)"')
_RECORD_CODE = re.compile(rb'"code_digest": "([0-9a-f]+)"')
_LIST = 4  # names shown in a one-line message before "and N more"


class ResultsDirError(ValueError):
    """A results directory fedbench may not write into, or rows it may not skip; one line."""


def _listed(items: list[str], limit: int = _LIST) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def read_marker(directory: Path) -> dict[str, Any] | None:
    """The marker of ``directory``, or None when it has none; a marker fedbench cannot read is an error."""
    path = Path(directory) / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ResultsDirError(f"'{path}' is not a readable fedbench marker ({err}): choose a new --results") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT or not marker.get("protocol_hash"):
        fmt = marker.get("format") if isinstance(marker, dict) else None
        raise ResultsDirError(
            f"'{path}' is a results marker fedbench cannot read (format {fmt!r}; this fedbench writes {FORMAT}): "
            "choose a new --results"
        )
    return marker


def legacy_hashes(directory: Path) -> set[str] | None:
    """The protocol hashes a directory written by an earlier fedbench (no marker) shows: its
    ``protocol.toml`` header, its ``runs/<run_id>`` names and its records' ``protocol_hash``; None
    when it does not look like one (no fedbench ``protocol.toml`` and no run directories, or a
    ``protocol.toml`` or a ``runs/`` entry fedbench would not have written)."""
    directory = Path(directory)
    hashes: set[str] = set()
    toml = directory / "protocol.toml"
    if toml.exists():
        try:
            first = toml.read_text(errors="replace").split("\n", 1)[0] if toml.is_file() else ""
        except OSError:
            return None
        header = _HEADER.match(first)
        if header is None:
            return None
        hashes.add(header.group(1))
    runs = directory / "runs"
    if runs.exists():
        if not runs.is_dir():
            return None
        for run in runs.iterdir():
            name = _RUN_DIR.match(run.name)
            if name is None or not run.is_dir():
                return None
            hashes.add(name.group(1))
            records = run / "records.jsonl"
            if records.is_file():
                hashes.update(h.decode() for h in _RECORD_HASH.findall(records.read_bytes()))
    return hashes or None


@dataclass
class Claim:
    """What ``fedbench run`` may do with one results directory: ``new`` (absent or empty: write the
    marker), ``own`` (its marker names this protocol) or ``adopt`` (an earlier fedbench's, of this
    protocol: write the marker)."""

    directory: Path
    protocol: Protocol
    how: str


def claim(directory: Path, proto: Protocol) -> Claim:
    """Whether ``fedbench run`` of ``proto`` may write into ``directory`` (reads only); raises
    :class:`ResultsDirError` with one line when it may not."""
    directory = Path(directory)
    suggest = f"choose a new --results (e.g. {directory.name or 'results'}-{proto.hash})"
    if not directory.exists():
        return Claim(directory, proto, "new")
    if not directory.is_dir():
        raise ResultsDirError(f"results path '{directory}' is not a directory: {suggest}")
    if not any(directory.iterdir()):
        return Claim(directory, proto, "new")
    marker = read_marker(directory)
    if marker is not None:
        if marker["protocol_hash"] == proto.hash:
            return Claim(directory, proto, "own")
        raise ResultsDirError(
            f"'{directory}' holds the results of protocol {marker['protocol_hash']} "
            f"({marker.get('protocol', '?')}); this run's protocol {proto.name} is {proto.hash}: a results "
            f"directory holds one protocol: {suggest}"
        )
    hashes = legacy_hashes(directory)
    if hashes is None:
        raise ResultsDirError(
            f"'{directory}' is not empty and was not written by fedbench (no {MARKER} marker, no fedbench "
            f"protocol.toml or runs/): fedbench writes only into a new or empty directory or its own: "
            "choose another --results"
        )
    if hashes != {proto.hash}:
        others = sorted(hashes - {proto.hash})
        raise ResultsDirError(
            f"'{directory}' holds the results of protocol {_listed(others)} (written by an earlier fedbench); "
            f"this run's protocol {proto.name} is {proto.hash}: a results directory holds one protocol: {suggest}"
        )
    return Claim(directory, proto, "adopt")


def write_marker(directory: Path, proto: Protocol, adopted: bool = False) -> None:
    """Write ``directory``'s marker (creating the directory) unless it has one; when another process
    wrote one first, it must name the same protocol."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    body = {
        "format": FORMAT,
        "protocol_hash": proto.hash,
        "protocol": proto.name,
        "sweep": proto.sweep is not None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "adopted": adopted,
    }
    try:
        fd = os.open(directory / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        claim(directory, proto)  # another fedbench run got there first: the same protocol, or refused
        return
    try:
        os.write(fd, (json.dumps(body, indent=1) + "\n").encode())
    finally:
        os.close(fd)


@dataclass
class RowCode:
    """The code of one (method row, seed) run in a results directory: ``fresh`` (no records yet),
    ``same`` (recorded by this code), ``changed`` (by other code: ``changed`` names what differs,
    empty when the records keep no per-file digests) or ``unknown`` (recorded before code digests)."""

    run_id: str
    label: str
    seed: int
    run_dir: Path
    state: str
    digest: str
    manifest: dict[str, str]
    changed: list[str] = field(default_factory=list)
    completed: bool = False


def _recorded_code(run_dir: Path) -> tuple[str | None, dict[str, str] | None]:
    """The code digest a run's records were made by, and its per-file digests when known."""
    side = run_dir / CODE_FILE
    if side.is_file():
        try:
            stored = json.loads(side.read_text())
            return str(stored["code_digest"]), dict(stored.get("files") or {})
        except (OSError, ValueError, KeyError, TypeError):
            return "unreadable", None
    records = run_dir / "records.jsonl"
    found = _RECORD_CODE.search(records.read_bytes()) if records.is_file() else None
    return (found.group(1).decode(), None) if found else (None, None)


def _has_records(run_dir: Path) -> tuple[bool, bool]:
    """(any records, a completed run record) of one run directory."""
    records = run_dir / "records.jsonl"
    if not records.is_file() or records.stat().st_size == 0:
        return False, False
    return True, b'"completed": true' in records.read_bytes()


def row_codes(proto: Protocol, results: Path) -> list[RowCode]:
    """Every (method row, seed) of ``proto`` (no sweep) in ``results``, with its code (reads only)."""
    from fedbench.runtime.provenance import manifest_digest, plugin_code, source_files
    from fedbench.runtime.server import run_id_for

    sources = source_files()
    out = []
    for entry in proto.methods:
        manifest = {**sources, **plugin_code(proto, entry)}
        digest = manifest_digest(manifest)
        for seed in proto.seeds:
            run_id = run_id_for(entry, seed, proto)
            run_dir = Path(results) / "runs" / run_id
            row = RowCode(run_id, entry.label, seed, run_dir, "fresh", digest, manifest)
            has, row.completed = _has_records(run_dir)
            if has:
                recorded, files = _recorded_code(run_dir)
                if recorded is None:
                    row.state = "unknown"
                elif recorded == digest:
                    row.state = "same"
                else:
                    row.state = "changed"
                    row.changed = [] if files is None else changed_files(files, manifest)
            out.append(row)
    return out


def changed_files(before: dict[str, str], now: dict[str, str]) -> list[str]:
    from fedbench.runtime.provenance import changed_code

    return changed_code(before, now)


@dataclass
class Plan:
    """What ``fedbench run`` will write, checked before anything is: the directories it claims (the
    sweep's top directory first) and every row's code."""

    claims: list[Claim]
    rows: list[RowCode]
    rerun_changed: bool = False

    def replaced(self) -> list[RowCode]:
        return [r for r in self.rows if r.state == "changed"]


def plan_run(proto: Protocol, results: Path, rerun_changed: bool = False) -> Plan:
    """Check every directory ``fedbench run`` of ``proto`` would write (a sweep: its top directory and
    each value's) and every row's code, reading only; raises :class:`ResultsDirError` with one line."""
    from fedbench.runtime import provenance

    provenance._DIGESTS.clear()  # this run's records: the code on disk now
    results = Path(results)
    targets = [(results, proto)]
    if proto.sweep is not None:
        targets += [(results / proto.sweep.dir_name(value), variant) for value, variant in proto.variants()]
    claims = [claim(directory, p) for directory, p in targets]
    rows = [row for directory, p in targets if p.sweep is None for row in row_codes(p, directory)]
    changed = [r for r in rows if r.state == "changed"]
    if changed and not rerun_changed:
        files = sorted({f for r in changed for f in r.changed})
        what = f"changed since: {_listed(files)}" if files else "their records keep no per-file digests"
        rows_text = _listed([f"{r.label} seed {r.seed}{'' if r.completed else ' (not complete)'}" for r in changed])
        raise ResultsDirError(
            f"{len(changed)} row(s) in '{results}' were run by other code than this checkout's ({what}): "
            f"{rows_text}; --rerun-changed reruns them (their records are replaced), or choose a new --results"
        )
    return Plan(claims, rows, rerun_changed)


def apply_plan(plan: Plan) -> None:
    """Write the markers, delete the runs that ``--rerun-changed`` replaces, and record the code of
    every row that will run (``runs/<run_id>/code.json``)."""
    from fedbench.utils.records import DirectoryLock

    for c in plan.claims:
        if c.how in ("new", "adopt"):
            write_marker(c.directory, c.protocol, adopted=c.how == "adopt")
    for row in plan.replaced():
        lock = DirectoryLock(row.run_dir)
        if not lock.acquire(wait=False):
            raise ResultsDirError(
                f"cannot replace {row.run_id}: another process ({lock.holder()}) is running it; rerun when it is done"
            )
        try:
            shutil.rmtree(row.run_dir)
        finally:
            lock.release()
    for row in plan.rows:
        if row.state in ("fresh", "changed"):
            _write_code(row)


def _write_code(row: RowCode) -> None:
    row.run_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"format": FORMAT, "code_digest": row.digest, "files": row.manifest}, indent=0) + "\n"
    path = row.run_dir / CODE_FILE
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def skip_reason(plan: Plan | None, run_id: str) -> str:
    """Why a completed row is skipped, for its ``skip`` line: recorded by this code, or code unknown."""
    row = next((r for r in (plan.rows if plan else []) if r.run_id == run_id), None)
    if row is not None and row.state == "unknown":
        return " (code unknown: recorded before code digests)"
    if row is not None and row.state == "same":
        return f" (same code {row.digest})"
    return ""
