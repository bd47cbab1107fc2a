"""Integrity on disk: torn records, two processes on one results directory, checked checkpoints and
backbone weights (never pickle), and one failing method row that stops no other."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedbench.api.method import register_method
from fedbench.api.registry import METHODS
from fedbench.backends.inprocess import in_process
from fedbench.cli import app
from fedbench.config.protocol import MethodEntry
from fedbench.config.toml_file import to_toml
from fedbench.reporting.board import build_leaderboard
from fedbench.reporting.terminal_table import render_terminal
from fedbench.reporting.text import render
from fedbench.runtime.checkpoint import Checkpoint
from fedbench.runtime.rows import RowsFailed, run_rows
from fedbench.runtime.server import Run
from fedbench.utils.integrity import IntegrityError
from fedbench.utils.records import DirectoryLock, append_records, read_jsonl, read_records

VOLATILE = {"compute_s", "git_commit", "versions"}
runner = CliRunner()


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


# --- records ---------------------------------------------------------------------------------------------
def test_a_record_cut_by_a_kill_is_dropped_with_a_warning_and_never_parsed(tmp_path):
    path = tmp_path / "runs" / "r" / "records.jsonl"
    append_records(path, [{"kind": "eval", "run_id": "r", "value": 0.5}, {"kind": "eval", "run_id": "r", "value": 1}])
    whole = path.read_bytes()
    path.write_bytes(whole[: whole.rindex(b'"value"') + 5])  # the last line cut mid-record, no newline
    with pytest.warns(RuntimeWarning, match=rf"{path}:2: skipping an incomplete last record"):
        assert read_jsonl(path) == [{"kind": "eval", "run_id": "r", "value": 0.5}]
    append_records(path, [{"kind": "eval", "run_id": "r", "value": 0.25}])  # closes the torn line first
    with pytest.warns(RuntimeWarning, match=rf"{path}:2: skipping a torn record line"):
        rows = read_jsonl(path)
    assert [r["value"] for r in rows] == [0.5, 0.25]
    path.write_bytes(path.read_bytes() + b"7\n")  # valid JSON, not a record
    with pytest.warns(RuntimeWarning) as caught:
        assert len(read_records(tmp_path)) == 2
    assert [str(w.message).split(": ")[0] for w in caught] == [f"{path}:2", f"{path}:4"]


def test_a_killed_append_resumes_to_the_same_records(tiny_prep, tmp_path, monkeypatch):
    clean = Run(tiny_prep, MethodEntry("fedsa-lora"), tmp_path / "clean", backend=in_process)
    clean.execute()
    original = Checkpoint.save

    def killed_after_a_torn_append(self, next_round, *args):
        original(self, next_round, *args)
        if next_round == 1:  # round 1's records half written, then the process dies
            with open(self.path.parent / "records.jsonl", "ab") as f:
                f.write(b'{"kind": "train", "round": 1, "cli')
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "save", killed_after_a_torn_append)
    with pytest.raises(KeyboardInterrupt):
        Run(tiny_prep, MethodEntry("fedsa-lora"), tmp_path / "killed", backend=in_process).execute()
    monkeypatch.setattr(Checkpoint, "save", original)
    resumed = Run(tiny_prep, MethodEntry("fedsa-lora"), tmp_path / "killed", backend=in_process)
    with pytest.warns(RuntimeWarning, match="incomplete last record"):
        resumed.execute()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the resumed file is whole again
        assert _stable(read_jsonl(resumed.records_path)) == _stable(read_jsonl(clean.records_path))


# --- checkpoints ----------------------------------------------------------------------------------------
def _killed_after_round_0(prep, results, monkeypatch, name="fedsa-lora") -> Run:
    original = Run._round

    def crash(self, r, *args, **kwargs):
        if r == 1:
            raise KeyboardInterrupt
        return original(self, r, *args, **kwargs)

    monkeypatch.setattr(Run, "_round", crash)
    with pytest.raises(KeyboardInterrupt):
        Run(prep, MethodEntry(name), results, backend=in_process).execute()
    monkeypatch.setattr(Run, "_round", original)
    return Run(prep, MethodEntry(name), results, backend=in_process)


def test_the_checkpoint_is_safetensors_with_a_checked_manifest(tiny_prep, tmp_path, monkeypatch):
    run = _killed_after_round_0(tiny_prep, tmp_path, monkeypatch)
    manifest = json.loads(run.checkpoint.path.read_text())
    data = run.checkpoint.path.with_name(manifest["file"])
    assert manifest["round"] == 1 and manifest["bytes"] == data.stat().st_size and len(manifest["sha256"]) == 64
    files = [data] + [run.dir / "clients" / name for name, _ in manifest["clients"].values()]
    for path in files:  # safetensors, no pickle: the server state, then one file per client
        header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
        assert header and all(v["dtype"] for k, v in header.items() if k != "__metadata__")
    assert not list(tmp_path.rglob("*.pt"))
    trained = sorted(r["client"] for r in read_jsonl(run.records_path) if r["kind"] == "train")
    assert trained and sorted(int(c) for c in manifest["clients"]) == trained  # round 0's: only those trained
    loaded = run.checkpoint.load(dict.fromkeys(manifest["trainable"]))
    assert loaded is not None and loaded[0] == 1
    assert loaded[1] and sorted(run.checkpoint.clients) == trained


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest", "missing"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(tiny_prep, tmp_path, monkeypatch, damage):
    run = _killed_after_round_0(tiny_prep, tmp_path, monkeypatch)
    manifest = json.loads(run.checkpoint.path.read_text())
    data = run.checkpoint.path.with_name(manifest["file"])
    blob = bytearray(data.read_bytes())
    if damage == "flip":
        blob[-5] ^= 0xFF
        data.write_bytes(bytes(blob))
    elif damage == "truncate":
        data.write_bytes(bytes(blob[: len(blob) // 2]))
    elif damage == "missing":
        data.unlink()
    else:
        run.checkpoint.path.write_text('{"format": "fedbench-checkpoint/1", "round": ')
    with pytest.raises(IntegrityError) as err:
        run.execute()
    message = str(err.value)
    assert "\n" not in message and str(data if damage != "manifest" else run.checkpoint.path) in message
    assert f"delete '{run.dir}'" in message


def test_the_cli_refuses_a_tampered_checkpoint_in_one_line(tiny_prep, tmp_path, monkeypatch):
    toml = tmp_path / "tiny.toml"
    toml.write_text(to_toml(tiny_prep.protocol.replace(methods=(MethodEntry("fedsa-lora"),))))
    run = _killed_after_round_0(tiny_prep, tmp_path / "results", monkeypatch)
    data = run.checkpoint.path.with_name(json.loads(run.checkpoint.path.read_text())["file"])
    data.write_bytes(data.read_bytes()[:-3] + b"xyz")
    result = runner.invoke(app, ["run", "--preset", str(toml), "--results", str(tmp_path / "results"), "--no-plots"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and f"checkpoint '{data}' is damaged" in " ".join(result.output.split())


# --- backbone weights -----------------------------------------------------------------------------------
def test_the_committed_backbone_weights_match_their_recorded_checksum():
    from fedbench.backbones.embedded import WEIGHTS_PATH, checksum_path
    from fedbench.utils.integrity import sha256_file

    assert checksum_path(WEIGHTS_PATH).read_text().split() == [sha256_file(WEIGHTS_PATH), WEIGHTS_PATH.name]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_backbone_weights_are_one_line_naming_the_file(tmp_path, damage):
    from fedbench.backbones.embedded import WEIGHTS_PATH, checksum_path, load_embedded

    weights = tmp_path / WEIGHTS_PATH.name
    shutil.copy(WEIGHTS_PATH, weights)
    shutil.copy(checksum_path(WEIGHTS_PATH), checksum_path(weights))
    blob = bytearray(weights.read_bytes())
    if damage == "flip":
        blob[len(blob) // 2] ^= 0x01
    else:
        blob = blob[: len(blob) - 1000]
    weights.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError, match=f"embedded backbone weights '{weights}' is damaged"):
        load_embedded(weights)
    checksum_path(weights).unlink()  # no recorded checksum: still one line, not a crash in safetensors
    if damage == "truncate":
        with pytest.raises(IntegrityError, match=f"embedded backbone weights '{weights}' cannot be read"):
            load_embedded(weights)


def test_a_tampered_client_state_on_a_flower_node_is_one_line(tmp_path):
    from fedbench.runtime.client_store import ClientStore

    states = ClientStore(tmp_path, shared=True)  # as a Flower node keeps them
    states[3] = {"w": torch.arange(8, dtype=torch.float32)}
    assert torch.equal(states[3]["w"], torch.arange(8, dtype=torch.float32))
    (path,) = tmp_path.glob("3-*.safetensors")
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(IntegrityError, match=f"stored state of client 3 '{path}' is damaged"):
        states[3]


# --- one results directory, two processes -----------------------------------------------------------------
def test_a_locked_run_is_left_for_later_and_waited_for(tiny_prep, tmp_path, monkeypatch):
    """While another process holds row A's run directory, run_rows does row B first, then waits for A
    (and, once it is free, runs it: the holder here left it unfinished)."""
    proto = tiny_prep.protocol.replace(methods=(MethodEntry("fedavg-lora"), MethodEntry("ffa-lora")))
    first = Run(tiny_prep, proto.methods[0], tmp_path, backend=in_process)
    lock = DirectoryLock(first.dir)
    assert lock.acquire(wait=False)
    assert Run(tiny_prep, proto.methods[0], tmp_path, backend=in_process).execute(wait=False) is None
    events = []

    def progress(event, info):
        events.append((event, info.get("label") or info.get("run_id")))
        if event == "wait":
            threading.Timer(0.2, lock.release).start()

    monkeypatch.setattr("fedbench.runtime.rows.prepare", lambda protocol, seed, **_: tiny_prep)
    run_rows(proto, tmp_path, progress, backend=in_process)
    order = [label for event, label in events if event == "row"]
    assert order == ["ffa-lora", "fedavg-lora"] and ("wait", first.run_id) in events
    assert all(Run(tiny_prep, m, tmp_path, backend=in_process).completed() for m in proto.methods)


def test_two_fedbench_run_processes_share_one_results_directory(tiny_prep, tmp_path):
    """Two `fedbench run` processes on one results directory, made to collide: row A's directory is
    held (as a third process would) until both processes wait for it, so they have raced for row B
    and both come back to A. Both succeed, every run is recorded exactly once, and the records are
    those of one process alone."""
    proto = tiny_prep.protocol.replace(rounds=1, methods=(MethodEntry("fedavg-lora"), MethodEntry("fedsa-lora")))
    toml = tmp_path / "two.toml"
    toml.write_text(to_toml(proto))
    results = tmp_path / "shared"
    prep = dataclasses.replace(tiny_prep, protocol=proto)
    held = Run(prep, proto.methods[0], results, backend=in_process)
    lock = DirectoryLock(held.dir)
    assert lock.acquire(wait=False)
    exe = Path(sys.executable).with_name("fedbench")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120", "PYTHONUNBUFFERED": "1"}
    cmd = [str(exe), "run", "--preset", str(toml), "--results", str(results), "--no-plots"]
    logs = [tmp_path / f"out{i}.txt" for i in range(2)]
    procs = [subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env) for log in logs]
    try:
        deadline = time.monotonic() + 240
        while not all(f"waiting for {held.run_id}" in log.read_text() for log in logs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [x.read_text() for x in logs]
            time.sleep(0.1)
    finally:
        lock.release()
    codes = [p.wait(timeout=240) for p in procs]
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], outputs
    assert sum(out.count(f"skip (already complete): {held.run_id}") for out in outputs) == 1  # one ran A, one waited
    files = sorted(results.glob("runs/*/records.jsonl"))
    assert len(files) == len(proto.methods)
    for path in files:
        rows = read_jsonl(path)
        keys = [(r["kind"], r.get("round"), r.get("client"), r.get("scope"), r.get("task")) for r in rows]
        assert len(keys) == len(set(keys)) and sum(r["kind"] == "run" for r in rows) == 1, path
    alone = tmp_path / "alone"
    for entry in proto.methods:
        Run(prep, entry, alone, backend=in_process).execute()
    drop = VOLATILE | {"machine", "device"}
    for path in files:
        other = alone / "runs" / path.parent.name / "records.jsonl"
        ours = [{k: v for k, v in r.items() if k not in drop} for r in read_jsonl(path)]
        assert ours == [{k: v for k, v in r.items() if k not in drop} for r in read_jsonl(other)]


# --- one failing row ---------------------------------------------------------------------------------------
@pytest.fixture
def broken_method():
    base = METHODS.get("ffa-lora")

    @register_method("toy-broken")
    class Broken(base):
        """FFA-LoRA whose server rule raises: the row fails after its first round."""

        def aggregate(self, server_state, replies):
            raise ValueError("toy-broken cannot aggregate\nsecond line of the error")

    yield "toy-broken"
    METHODS.unregister("toy-broken")


def test_a_failing_row_stops_no_other_and_the_leaderboard_says_failed(tiny_prep, tmp_path, broken_method, monkeypatch):
    proto = tiny_prep.protocol.replace(
        methods=(MethodEntry("fedavg-lora"), MethodEntry(broken_method), MethodEntry("fedsa-lora"))
    )
    monkeypatch.setattr("fedbench.runtime.rows.prepare", lambda protocol, seed, **_: tiny_prep)
    with pytest.raises(RowsFailed) as err:
        run_rows(proto, tmp_path, backend=in_process)
    (failure,) = err.value.failures
    assert (failure.label, failure.seed) == (broken_method, 0)
    assert failure.error == "ValueError: toy-broken cannot aggregate"
    assert all(
        Run(tiny_prep, MethodEntry(m), tmp_path, backend=in_process).completed() for m in ("fedavg-lora", "fedsa-lora")
    )
    board = build_leaderboard(read_records(tmp_path), with_failed=True)
    row = board.set_index("method").loc[broken_method]
    assert (
        row["failed"] == "seed 0: ValueError: toy-broken cannot aggregate" and list(board["method"])[-1] == "majority"
    )
    md = render(board, "markdown")
    assert f"| {broken_method} |" in md and "| failed |" in md and "toy-broken cannot aggregate" in md
    text = render_terminal(board, 100)
    assert (
        "failed" in text
        and f"failed: {broken_method} (seed 0: ValueError: toy-broken cannot aggregate)" in " ".join(text.split())
    )
    assert broken_method not in set(build_leaderboard(read_records(tmp_path))["method"])  # plots, reports: not shown


def test_fedbench_run_finishes_the_other_rows_and_exits_non_zero(tiny_prep, tmp_path, broken_method):
    toml = tmp_path / "tiny.toml"
    toml.write_text(to_toml(tiny_prep.protocol.replace(rounds=1)))
    results = tmp_path / "results"
    args = ["run", "--preset", str(toml), "--results", str(results), "--no-plots"]
    result = runner.invoke(app, [*args, "--methods", f"{broken_method},fedavg-lora"], env={"COLUMNS": "120"})
    assert result.exit_code == 1, result.output
    out = " ".join(result.output.split())
    assert "Traceback" not in out and f"error: row {broken_method} (seed 0) failed: ValueError: toy-broken" in out
    assert f"| {broken_method} |" in (results / "leaderboard.md").read_text()
    assert any(r["kind"] == "failed" for p in results.glob("runs/toy-broken*/records.jsonl") for r in read_jsonl(p))
    again = runner.invoke(app, [*args, "--methods", "fedavg-lora"], env={"COLUMNS": "120"})
    assert again.exit_code == 0 and "skip (already complete)" in again.output


def test_a_board_of_failed_rows_alone_renders():
    """Nothing completed: the leaderboard is the failed rows (the exit code says the rest)."""
    import pandas as pd

    row = {"kind": "failed", "run_id": "m__seed0__h", "label": "m", "seed": 0, "error": "E: boom"}
    df = pd.DataFrame([{**row, "protocol": "p", "protocol_hash": "h", "synthetic": True, "suite": "scenes"}])
    board = build_leaderboard(df, with_failed=True)
    assert "| m | failed | seed 0: E: boom |" in render(board, "markdown")
    assert "failed: m (seed 0: E: boom)" in " ".join(render_terminal(board, 100).split())
    with pytest.raises(ValueError, match="no completed runs"):
        build_leaderboard(df)
