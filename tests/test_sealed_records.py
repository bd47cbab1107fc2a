"""Records that prove they are whole (issue 18): every row sealed as it is written, checked on every
read and on resume; a checkpoint tied to the records it covers; only runs/<run_id>/records.jsonl read
as records; records written before seals (legacy) still read."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import warnings
from pathlib import Path

import pandas as pd
import pytest
from conftest import kill_in_round
from typer.testing import CliRunner

from fedbench.backends.inprocess import in_process
from fedbench.cli import app
from fedbench.config.protocol import MethodEntry
from fedbench.runtime.checkpoint import Checkpoint
from fedbench.runtime.server import Run
from fedbench.utils.integrity import IntegrityError, sha256_bytes
from fedbench.utils.records import append_records, read_jsonl, read_records, scan_records

VOLATILE = {"compute_s", "git_commit", "versions"}
METHOD = "fedsa-lora"  # local state (its B matrices) that a resume must bring back
REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


@pytest.fixture(scope="module")
def prep(tiny_prep):
    """TINY with 3 rounds (evaluated after each): a checkpoint at round 2 has two rounds behind it."""
    return dataclasses.replace(tiny_prep, protocol=tiny_prep.protocol.replace(rounds=3))


@pytest.fixture(scope="module")
def clean(prep, tmp_path_factory) -> Run:
    """One uninterrupted, completed run."""
    run = Run(prep, MethodEntry(METHOD), tmp_path_factory.mktemp("clean"), backend=in_process)
    run.execute()
    return run


@pytest.fixture
def done(clean, tmp_path) -> Run:
    """A copy of the completed run in a results directory of its own."""
    shutil.copytree(clean.dir, tmp_path / "runs" / clean.run_id)
    return Run(clean.prep, clean.entry, tmp_path, backend=in_process)


def _killed_at(prep, results: Path, monkeypatch, at: int) -> Run:
    """A fresh Run of the run killed when round ``at`` started (what a rerun builds)."""
    kill_in_round(prep, results, monkeypatch, at, METHOD)
    return Run(prep, MethodEntry(METHOD), results, backend=in_process)


# --- the seal --------------------------------------------------------------------------------------------
def test_every_row_is_sealed_by_the_one_before_it(tmp_path):
    path = tmp_path / "runs" / "r" / "records.jsonl"
    big = {"run_id": "r", "kind": "eval", "per_example": [0.125] * 20_000}  # a line longer than one read-back chunk
    append_records(path, [{"run_id": "r", "kind": "train", "round": 0}, big])
    append_records(path, [{"run_id": "r", "kind": "eval", "round": 0, "value": 0.5}])
    prev = ""
    for line in _lines(path):
        row = json.loads(line)
        assert list(row)[-1] == "seal"
        body = line.rstrip(b"\n")[: -len(f', "seal": "{row["seal"]}"}}')] + b"}"
        assert row["seal"] == sha256_bytes(prev.encode() + body)  # the chain goes on across appends
        prev = row["seal"]
    assert [r["kind"] for r in read_jsonl(path)] == ["train", "eval", "eval"]
    assert all("seal" not in r for r in read_jsonl(path))  # readers get the rows as they were given


@pytest.mark.parametrize("edit", ["value", "delete", "swap", "unseal"])
def test_an_edited_record_is_refused_on_read(done, edit):
    path = done.records_path
    lines = _lines(path)
    i = next(i for i, line in enumerate(lines) if b'"scope": "global"' in line and b'"round": 1' in line)
    if edit == "value":
        row = json.loads(lines[i])
        lines[i] = lines[i].replace(f'"value": {row["value"]}'.encode(), f'"value": {row["value"] + 0.25}'.encode())
        assert lines[i] != _lines(path)[i]
    elif edit == "delete":
        del lines[i]
    elif edit == "swap":
        lines[i], lines[i + 1] = lines[i + 1], lines[i]
    else:  # the seal removed: a sealed file holds no unsealed row
        lines[i] = re.sub(rb', "seal": "[0-9a-f]{64}"', b"", lines[i])
    path.write_bytes(b"".join(lines))
    for read in (lambda: read_jsonl(path), lambda: read_records(done.dir.parents[1])):
        with pytest.raises(IntegrityError) as err:
            read()
        message = str(err.value)
        assert "\n" not in message and f"records '{path}' of run '{done.run_id}' are broken at line " in message
        assert "round 1" in message and "fedbench run" in message
    assert not done.completed()  # a run whose records are damaged is run again


# --- a completed run is whole ---------------------------------------------------------------------------
@pytest.mark.parametrize("legacy", [False, True], ids=["sealed", "legacy"])
def test_a_deleted_last_eval_line_is_one_line_and_exit_2(done, legacy):
    path = done.records_path
    results = done.dir.parents[1]
    before = runner.invoke(app, ["leaderboard", "--results", str(results), "--format", "csv"])
    assert before.exit_code == 0, before.output
    lines = _lines(path)
    if legacy:  # as written before seals existed
        lines = [re.sub(rb', "seal": "[0-9a-f]{64}"', b"", line) for line in lines]
    last_eval = max(i for i, line in enumerate(lines) if b'"kind": "eval"' in line)
    del lines[last_eval]
    path.write_bytes(b"".join(lines))
    result = runner.invoke(app, ["leaderboard", "--results", str(results), "--format", "csv"])
    out = result.output.strip()
    assert result.exit_code == 2, out
    assert "\n" not in out and "Traceback" not in out and "mean_acc" not in out
    assert out.startswith("error: records") and done.run_id in out and "round 2" in out, out
    assert not done.completed()


def test_a_damaged_completed_run_runs_again_to_the_same_records(done, clean):
    path = done.records_path
    lines = _lines(path)
    del lines[max(i for i, line in enumerate(lines) if b'"kind": "eval"' in line)]
    path.write_bytes(b"".join(lines))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Run(done.prep, done.entry, done.dir.parents[1], backend=in_process).execute()
    assert _stable(read_jsonl(path)) == _stable(read_jsonl(clean.records_path))
    assert any(re.search(rf"{re.escape(str(path))}.* broken .*round 2", str(w.message)) for w in caught), caught


# --- resume ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["cut-at-a-line", "cut-mid-line", "edit"])
def test_records_cut_or_changed_mid_run_rerun_to_identical_records(prep, clean, tmp_path, monkeypatch, damage):
    """The checkpoint is after round 1 (rows of rounds 0 and 1 behind it); the records lose (or change)
    rows of round 1: those rounds cannot come back from the checkpoint, so the run starts again and
    ends with the very records of an uninterrupted run, never with a round missing."""
    run = _killed_at(prep, tmp_path, monkeypatch, at=2)
    manifest = json.loads(run.checkpoint.path.read_text())
    assert manifest["round"] == 2
    lines = _lines(run.records_path)
    first = next(i for i, line in enumerate(lines) if b'"round": 1' in line)
    if damage == "cut-at-a-line":
        run.records_path.write_bytes(b"".join(lines[: first + 2]))
    elif damage == "cut-mid-line":
        run.records_path.write_bytes(b"".join(lines[: first + 2]) + lines[first + 2][:40])
    else:
        lines[first] = lines[first].replace(b'"round": 1, "client": ', b'"round": 1, "client": 1')
        run.records_path.write_bytes(b"".join(lines))
    events = []
    run.progress = lambda event, info: events.append((event, info.get("round")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.execute()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the records are whole again
        assert _stable(read_jsonl(run.records_path)) == _stable(read_jsonl(clean.records_path))
    assert ("restart", 2) in events and not any(event == "resume" for event, _ in events)
    said = [str(w.message) for w in caught if "starts again from round 0" in str(w.message)]
    assert said and str(run.records_path) in said[0], said
    assert f"of the {manifest['records'][0]} its checkpoint covers (rounds 0-1)" in said[0], said


def test_a_kill_between_append_and_checkpoint_still_resumes_from_the_checkpoint(prep, clean, tmp_path, monkeypatch):
    """Rows after the ones the checkpoint covers (a round appended, its checkpoint not written) are
    dropped and that round runs again from the checkpoint: the records end as an uninterrupted run's."""
    original = Checkpoint.save

    def killed(self, next_round, *args):
        if next_round == 2:  # round 1's records are appended, its checkpoint never written
            raise KeyboardInterrupt
        original(self, next_round, *args)

    monkeypatch.setattr(Checkpoint, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        Run(prep, MethodEntry(METHOD), tmp_path, backend=in_process).execute()
    monkeypatch.setattr(Checkpoint, "save", original)
    run = Run(prep, MethodEntry(METHOD), tmp_path, backend=in_process)
    assert json.loads(run.checkpoint.path.read_text())["records"][0] < len(read_jsonl(run.records_path))
    events = []
    run.progress = lambda event, info: events.append((event, info.get("round")))
    run.execute()
    assert ("resume", 1) in events
    assert _stable(read_jsonl(run.records_path)) == _stable(read_jsonl(clean.records_path))


def _manifest_with(path: Path, **fields) -> None:
    manifest = json.loads(path.read_text())
    manifest.update(fields)
    path.write_text(json.dumps(manifest, separators=(",", ":")) + "\n")


@pytest.mark.parametrize("edit", ["round", "round-and-digest"])
def test_an_edited_manifest_round_is_refused(prep, tmp_path, monkeypatch, edit):
    run = _killed_at(prep, tmp_path, monkeypatch, at=1)  # checkpoint after round 0: resume from round 1
    path = run.checkpoint.path
    before = path.read_text()
    if edit == "round":
        path.write_text(before.replace('"round":1', '"round":2'))
    else:  # made consistent by hand (server file renamed, digest recomputed): the records still say round 0
        manifest = json.loads(before)
        old = path.with_name(manifest["file"])
        old.rename(path.with_name("server-00002.safetensors"))
        manifest.update(round=2, file="server-00002.safetensors")
        manifest.pop("digest")
        digest = sha256_bytes(json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode())
        _manifest_with(path, **manifest, digest=digest)
    assert path.read_text() != before
    with pytest.raises(IntegrityError) as err:
        run.execute()
    message = str(err.value)
    assert "\n" not in message and f"checkpoint manifest '{path}'" in message and f"delete '{run.dir}'" in message
    if edit == "round-and-digest":
        assert f"does not match the records '{run.records_path}'" in message and "round 0, not of round 1" in message
    assert not any(json.loads(line).get("round") == 2 for line in _lines(run.records_path))  # nothing ran


# --- only a run's own records are read ----------------------------------------------------------------------
def test_other_jsonl_files_are_not_read_as_records(done):
    results = done.dir.parents[1]
    expected = read_records(results)
    metrics = {"step": 1, "loss": 0.5, "kind": "eval", "run_id": done.run_id, "value": 0.0}
    for where in (results / "metrics.jsonl", done.dir / "metrics.jsonl", results / "runs" / "notes" / "x.jsonl"):
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_text(json.dumps(metrics) + "\n")
    (results / "runs" / "deep" / "runs" / "r").mkdir(parents=True)
    shutil.copy(done.records_path, results / "runs" / "deep" / "runs" / "r" / "records.jsonl")
    pd.testing.assert_frame_equal(read_records(results), expected)


def test_a_records_file_without_run_id_is_one_line_naming_it(done):
    results = done.dir.parents[1]
    stray = results / "runs" / "someone-elses" / "records.jsonl"
    stray.parent.mkdir(parents=True)
    stray.write_text('{"kind": "eval", "value": 0.9}\n')
    with pytest.raises(IntegrityError, match=rf"records '{re.escape(str(stray))}' line 1 has no run_id"):
        read_records(results)
    result = runner.invoke(app, ["leaderboard", "--results", str(results), "--format", "csv"])
    out = result.output.strip()
    assert result.exit_code == 2 and "\n" not in out and "Traceback" not in out and str(stray) in out, out


# --- legacy records ----------------------------------------------------------------------------------------
def test_legacy_unsealed_records_still_read_and_stay_legacy(tmp_path):
    """The committed default results predate seals: they read as they are (and render the committed
    leaderboard); a legacy file appended to stays unsealed, and a sealed row in it is refused."""
    committed = REPO / "results" / "default"
    files = sorted(committed.glob("runs/*/records.jsonl"))
    assert files and not any(scan_records(f).sealed for f in files)
    df = read_records(committed)
    assert "seal" not in df and df["run_id"].nunique() == len(files)
    legacy = tmp_path / "runs" / "old" / "records.jsonl"
    shutil.copytree(files[0].parent, legacy.parent)
    rows = read_jsonl(legacy)
    append_records(legacy, [{**rows[0], "kind": "failed", "error": "E: x"}])
    assert b'"seal"' not in legacy.read_bytes() and len(read_jsonl(legacy)) == len(rows) + 1
    sealed = tmp_path / "new.jsonl"
    append_records(sealed, [rows[0]])
    legacy.write_bytes(legacy.read_bytes() + sealed.read_bytes())
    with pytest.raises(IntegrityError, match="carries a seal, but the file's first row does not"):
        read_jsonl(legacy)
