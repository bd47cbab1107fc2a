"""Results you can trust (issue 18): one protocol per results directory, only fedbench's own files,
completed rows tied to the code that made them, and reading commands that refuse what they cannot
rank. Every `fedbench run` here is TINY with one round (seconds)."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY
from typer.testing import CliRunner

from fedbench.api.registry import METHODS
from fedbench.cli import app
from fedbench.config.protocol import MethodEntry
from fedbench.config.toml_file import to_toml
from fedbench.runtime import provenance
from fedbench.runtime.results_dir import MARKER, claim, legacy_hashes, plan_run
from fedbench.utils.records import read_jsonl

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent
ONE_ROUND = TINY.replace(rounds=1)


def _toml(path: Path, proto=ONE_ROUND) -> Path:
    path.write_text(to_toml(proto))
    return path


def _files(directory: Path) -> dict:
    """Every file under ``directory`` with its bytes and modification time (ns)."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in Path(directory).rglob("*") if p.is_file()}


def _one_line_exit_2(args: list[str]) -> str:
    result = runner.invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    return errors[0]


@pytest.fixture
def frozen_sources(monkeypatch):
    """The source files as they are now, whatever other checkouts' editors save meanwhile: a test that
    runs twice into one directory must see the same code both times unless it changes it itself."""
    snapshot = provenance.source_files()
    monkeypatch.setattr(provenance, "source_files", lambda roots=None: dict(snapshot))
    return snapshot


def _legacy(tmp_path: Path, tiny_run, name: str = "legacy") -> Path:
    """A results directory as an earlier fedbench left it: protocol.toml, command.txt, a completed
    run's records without seals or code digests (no marker, no code.json)."""
    done = tiny_run("fedavg-lora").run
    results = tmp_path / name
    shutil.copytree(done.dir, results / "runs" / done.run_id, ignore=shutil.ignore_patterns("lock", "code.json"))
    records = results / "runs" / done.run_id / "records.jsonl"
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    old = ("seal", "code_digest")  # fields an earlier fedbench did not write
    records.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in old}) + "\n" for r in rows))
    _toml(results / "protocol.toml", TINY)
    (results / "command.txt").write_text("fedbench run --preset tiny.toml\n")
    return results


# --- one protocol per results directory -------------------------------------------------------------
def test_a_changed_protocol_is_refused_before_anything_is_written(tmp_path, frozen_sources):
    preset = _toml(tmp_path / "tiny.toml")
    results = tmp_path / "results"
    first = runner.invoke(app, ["run", "--preset", str(preset), "--results", str(results), "--no-plots"])
    assert first.exit_code == 0, first.output
    marker = json.loads((results / MARKER).read_text())
    assert marker["protocol_hash"] == ONE_ROUND.hash and marker["format"] == 1
    before = _files(results)
    changed = ONE_ROUND.replace(rounds=2)
    line = _one_line_exit_2(["run", "--preset", str(preset), "--results", str(results), "--rounds", "2", "--no-plots"])
    assert (
        f"error: '{results}' holds the results of protocol {ONE_ROUND.hash} (tiny); this run's protocol tiny is "
        f"{changed.hash}: a results directory holds one protocol: choose a new --results (e.g. results-{changed.hash})"
    ) == line
    assert _files(results) == before
    # seeds are not hashed: more seeds extend the study in the same directory
    assert plan_run(ONE_ROUND.replace(seeds=(0, 1)), results).claims[0].how == "own"


def test_a_directory_fedbench_did_not_write_is_refused_and_untouched(tmp_path):
    preset = _toml(tmp_path / "tiny.toml")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "protocol.toml").write_text("# my own experiment settings\nlr = 0.1\n")
    (theirs / "leaderboard.csv").write_text("model,acc\nmine,0.9\n")
    (theirs / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    before = _files(theirs)
    line = _one_line_exit_2(["run", "--preset", str(preset), "--results", str(theirs), "--no-plots"])
    assert f"'{theirs}' is not empty and was not written by fedbench (no .fedbench marker" in line
    assert "choose another --results" in line
    assert _files(theirs) == before and not (theirs / MARKER).exists()


def test_a_legacy_directory_of_the_same_protocol_is_adopted(tmp_path, tiny_run, frozen_sources):
    results = _legacy(tmp_path, tiny_run)
    board = runner.invoke(app, ["leaderboard", "--results", str(results), "--format", "csv"])
    assert board.exit_code == 0, board.output
    assert not (results / MARKER).exists()  # reading commands never write a marker
    records = {p: p.read_bytes() for p in results.rglob("records.jsonl")}
    preset = _toml(tmp_path / "tiny.toml", TINY)
    done = runner.invoke(app, ["run", "--preset", str(preset), "--results", str(results), "--no-plots"])
    assert done.exit_code == 0, done.output
    run_id = tiny_run("fedavg-lora").run.run_id
    assert f"skip (already complete): {run_id} (code unknown: recorded before code digests)" in " ".join(
        done.output.split()
    )
    marker = json.loads((results / MARKER).read_text())
    assert marker["protocol_hash"] == TINY.hash and marker["adopted"] is True
    assert {p: p.read_bytes() for p in results.rglob("records.jsonl")} == records


def test_a_legacy_directory_of_another_protocol_is_refused_and_untouched(tmp_path, tiny_run):
    results = _legacy(tmp_path, tiny_run)
    before = _files(results)
    preset = _toml(tmp_path / "tiny.toml")  # one round: another hash
    line = _one_line_exit_2(["run", "--preset", str(preset), "--results", str(results), "--no-plots"])
    assert f"'{results}' holds the results of protocol {TINY.hash} (written by an earlier fedbench)" in line
    assert f"this run's protocol tiny is {ONE_ROUND.hash}" in line
    assert _files(results) == before


@pytest.mark.parametrize("name", ["default", "routing", "routing-frozen"])
def test_the_committed_results_are_fedbench_s_own(name):
    """The committed directories (and a sweep's value directories) are adopted by a rerun of their
    own protocol, and refused for another; checking writes nothing."""
    from fedbench.config import toml_file

    top = REPO / "results" / name
    proto = toml_file.load(str(top / "protocol.toml"))
    before = sorted(p.name for p in top.iterdir())
    dirs = [(top, proto)]
    if proto.sweep is not None:
        dirs += [(top / proto.sweep.dir_name(v), variant) for v, variant in proto.variants()]
    for directory, p in dirs:
        assert legacy_hashes(directory) == {p.hash}
        assert claim(directory, p).how in ("adopt", "own")
        with pytest.raises(ValueError, match="holds the results of protocol"):
            claim(directory, p.replace(rounds=p.rounds + 1))
    assert sorted(p.name for p in top.iterdir()) == before


# --- reading commands refuse records of several protocols -------------------------------------------
def _second_protocol(results: Path, run_dir: Path, fake_hash: str = "0123456789ab") -> str:
    """A copy of ``run_dir``'s run as if made under another protocol hash (another run id)."""
    run_id = run_dir.name.rsplit("__", 1)[0] + "__" + fake_hash
    target = results / "runs" / run_id
    target.mkdir(parents=True)
    rows = [{**r, "protocol_hash": fake_hash, "run_id": run_id} for r in read_jsonl(run_dir / "records.jsonl")]
    (target / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_id


def test_leaderboard_compare_and_report_refuse_records_of_several_protocols(tmp_path, tiny_run):
    results = _legacy(tmp_path, tiny_run)
    run_dir = next((results / "runs").iterdir())
    _second_protocol(results, run_dir)
    listed = "; ".join(f"{h} (tiny, 1 run(s))" for h in sorted(["0123456789ab", TINY.hash]))
    expected = f"error: '{results}': the records mix runs of 2 protocols: {listed}; a leaderboard ranks one protocol"
    for args in (
        ["leaderboard", "--results", str(results)],
        ["leaderboard", "--results", str(results), "--versus", "fedavg-lora"],
        ["compare", "--results", str(results), "--target", "0.1"],
        ["report", "--results", str(results), "--out", str(tmp_path / "page.html")],
    ):
        assert _one_line_exit_2(args).startswith(expected), args
    assert not (tmp_path / "page.html").exists()


# --- in-flight runs ------------------------------------------------------------------------------------
def test_leaderboard_of_in_flight_runs_only_is_one_line_and_notes_them_beside_completed_ones(tmp_path, tiny_run):
    done = tiny_run("fedavg-lora").run
    results = tmp_path / "flight"
    flying = results / "runs" / done.run_id
    flying.mkdir(parents=True)
    rows = [r for r in read_jsonl(done.records_path) if r["kind"] != "run"]  # no completion record yet
    (flying / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = _one_line_exit_2(["leaderboard", "--results", str(results)])
    assert line == (
        f"error: nothing in '{results}' is complete yet: 1 run(s) in flight (or interrupted, resumable by "
        f"rerunning their `fedbench run`): {done.run_id}"
    )
    # beside a completed run: the leaderboard of what is complete, and a note on what is not
    other = "ffa-lora__seed0__" + TINY.hash
    (results / "runs" / other).mkdir()
    renamed = [{**r, "run_id": other, "label": "ffa-lora", "method": "ffa-lora"} for r in rows]
    (results / "runs" / other / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in renamed))
    shutil.copy(done.records_path, flying / "records.jsonl")
    board = runner.invoke(app, ["leaderboard", "--results", str(results), "--format", "csv"])
    assert board.exit_code == 0, board.output
    assert "fedavg-lora" in board.stdout and "ffa-lora" not in board.stdout
    assert f"note: 1 run(s) in flight (or interrupted), not counted: {other}" in " ".join(board.stderr.split())


# --- the code that made a row -------------------------------------------------------------------------
PLUGIN = '''"""A method shipped outside the repo: FedAvg-LoRA under another name."""

from fedbench.api.method import register_method
from fedbench.api.registry import METHODS


@register_method("toy-plugged")
class Plugged(METHODS.get("fedavg-lora")):
    """FedAvg-LoRA from a plug-in module outside fedbench's folders."""
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    folder = tmp_path / "plugins"
    folder.mkdir()
    module = folder / "toy_plugin_issue18.py"
    module.write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(folder))
    importlib.import_module("toy_plugin_issue18")
    yield module
    METHODS.unregister("toy-plugged")
    sys.modules.pop("toy_plugin_issue18", None)


def test_a_completed_row_made_by_other_code_is_refused_and_rerun_changed_replaces_it(tmp_path, plugin, frozen_sources):
    preset = _toml(tmp_path / "tiny.toml")
    results = tmp_path / "results"
    args = ["run", "--preset", str(preset), "--results", str(results), "--methods", "toy-plugged", "--no-plots"]
    first = runner.invoke(app, args, env={"COLUMNS": "250"})
    assert first.exit_code == 0, first.output
    (run_dir,) = (results / "runs").iterdir()
    code = json.loads((run_dir / "code.json").read_text())
    assert "plugin:toy_plugin_issue18" in code["files"] and "methods/fedavg_lora.py" in code["files"]
    again = runner.invoke(app, args, env={"COLUMNS": "250"})  # the same code: skipped, and said why
    assert again.exit_code == 0, again.output
    said = " ".join(again.output.split())
    assert f"skip (already complete): {run_dir.name} (same code {code['code_digest']})" in said

    plugin.write_text(PLUGIN + "\n# a contributor's change\n")
    before = _files(results)
    line = _one_line_exit_2(args)
    assert line == (
        f"error: 1 row(s) in '{results}' were run by other code than this checkout's (changed since: "
        "plugin:toy_plugin_issue18): toy-plugged seed 0; --rerun-changed reruns them (their records are "
        "replaced), or choose a new --results"
    )
    assert _files(results) == before

    rerun = runner.invoke(app, [*args, "--rerun-changed"], env={"COLUMNS": "250"})
    assert rerun.exit_code == 0, rerun.output
    said = " ".join(rerun.output.split())
    assert f"rerun {run_dir.name}: its records were made by other code (--rerun-changed)" in said
    assert "skip (already complete)" not in said
    now = json.loads((run_dir / "code.json").read_text())
    assert now["code_digest"] != code["code_digest"]
    assert sum(r["kind"] == "run" for r in read_jsonl(run_dir / "records.jsonl")) == 1  # replaced, not appended


def test_the_code_digest_covers_untracked_files_and_plugins(tmp_path, plugin):
    roots = [("fedbench", tmp_path / "fedbench"), ("methods", tmp_path / "methods")]
    for _, folder in roots:
        folder.mkdir()
    (tmp_path / "fedbench" / "core.py").write_text("X = 1\n")
    before = provenance.source_files(roots)
    (tmp_path / "methods" / "new_method.py").write_text("Y = 2\n")  # new, untracked by any git
    after = provenance.source_files(roots)
    assert provenance.changed_code(before, after) == ["methods/new_method.py"]
    assert provenance.manifest_digest(before) != provenance.manifest_digest(after)
    entry = MethodEntry("toy-plugged")
    assert set(provenance.plugin_code(TINY, entry)) == {"plugin:toy_plugin_issue18"}
    assert provenance.plugin_code(TINY, MethodEntry("fedavg-lora")) == {}


def test_an_untracked_source_file_makes_the_commit_dirty(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True)

    git("init", "-q")
    (tmp_path / "methods").mkdir()
    (tmp_path / "methods" / "a.py").write_text("A = 1\n")
    git("add", ".")
    git("commit", "-q", "-m", "one")
    assert not provenance.git_commit(tmp_path).endswith("+dirty")
    (tmp_path / "methods" / "new_method.py").write_text("B = 2\n")
    provenance.git_commit.cache_clear()
    assert provenance.git_commit(tmp_path).endswith("+dirty")


# --- small ones ---------------------------------------------------------------------------------------
def test_leaderboard_out_leaves_no_tmp_behind_on_failure(tmp_path, tiny_run):
    results = _legacy(tmp_path, tiny_run)
    out = tmp_path / "board.md"
    out.mkdir()  # a directory where the file should go: the move into place fails
    line = _one_line_exit_2(["leaderboard", "--results", str(results), "--format", "markdown", "--out", str(out)])
    assert f"cannot write '{out}'" in line
    assert not list(tmp_path.glob("*.tmp"))
