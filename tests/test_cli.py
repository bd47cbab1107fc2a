"""Bad input ends with one line naming the value and the choices, exit code 2, no traceback."""

import errno
import json
import os
from importlib import resources
from pathlib import Path

import pytest
from typer.testing import CliRunner

import fedbench
from fedbench.api.registry import METHODS
from fedbench.backends.inprocess import in_process
from fedbench.cli import app

runner = CliRunner()
SMOKE = resources.files("fedbench.config.presets").joinpath("smoke.toml").read_text()
# a protocol that runs in seconds: one row, two rounds, three clients
TINY_FIELDS = {
    "name": "tiny-cli",
    "methods": ["fedavg-lora"],
    "data.num_clients": 3,
    "data.train_images": 8,
    "data.test_images": 4,
    "data.global_test_images": 6,
    "local.steps": 2,
    "local.batch_size": 8,
    "eval.every": 1,
}


def _toml(path: Path, fields: dict) -> Path:
    """The smoke preset with ``fields`` ("section.key" or "key" -> value) replaced, written to ``path``."""
    lines, section = [], ""
    for line in SMOKE.splitlines():
        if line.startswith("["):
            section = line.strip("[]") + "."
        key = line.partition("=")[0].strip()
        for name in (section + key, key if not section else None):
            if "=" in line and name in fields:
                line = f"{key} = {json.dumps(fields[name])}"
        lines.append(line)
    path.write_text("\n".join(lines) + "\n")
    return path


def _snapshot(directory: Path) -> dict:
    return {p: p.read_bytes() for p in Path(directory).rglob("*") if p.is_file()}


def _committed(results: Path) -> dict:
    """The snapshot less the client-state files no checkpoint names: what a cut round had begun to
    write, which the next attempt removes as it resumes from the checkpoint (everything else is kept)."""
    named = {
        run / "clients" / name
        for run in Path(results).glob("runs/*")
        if (run / "checkpoint.json").is_file()
        for name, _ in json.loads((run / "checkpoint.json").read_text())["clients"].values()
    }
    return {p: b for p, b in _snapshot(results).items() if p.parent.name != "clients" or p in named}


def _fails_cleanly(args, needle):
    result = runner.invoke(app, args)
    out = result.output.strip()
    assert result.exit_code == 2, out
    assert "Traceback" not in out
    assert needle in " ".join(out.split()), out
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:"), result.stderr
    return out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "--methods", "fedavg-lroa"], "Unknown method 'fedavg-lroa'. Did you mean: fedavg-lora? Available:"),
        (["run", "--tasks", "vqa,captioning"], "Unknown task 'captioning'"),
        (
            ["run", "--preset", "smok"],
            "Unknown preset 'smok'. Available: default, paper, parity, routing, routing-frozen, smoke",
        ),
        (["run", "--seeds", "0,x"], "--seeds '0,x' must be comma-separated integers"),
        (["run", "--rounds", "0"], "--rounds 0 is invalid: expected an integer >= 1"),
        (["run", "--methods", "fedavg-lora:rank=zero"], "option 'rank' of method 'fedavg-lora' = 'zero' is invalid"),
        (["run", "--methods", "fedavg-lora:rnk=2"], "unknown option 'rnk' for method 'fedavg-lora'. Valid options:"),
        (["leaderboard", "--results", ".", "--format", "xml"], "--format 'xml' is invalid. Choose one of: table"),
        (["describe", "fedmx"], "Unknown method 'fedmx'"),
        (["run", "--methods", "feddpa:weighting=median"], "'median' is invalid: choose one of uniform, examples"),
        # top-1 routing leaves the router without gradient (tests/test_pilot_ctmoa.py)
        (
            ["run", "--methods", "pilot-ctmoa:top_k=1"],
            "method 'pilot-ctmoa': top_k = 1 is invalid: expected 0 (dense routing) or an integer >= 2",
        ),
        (["run", "--methods", "mmrouter-moa:top_k=1"], "method 'mmrouter-moa': top_k = 1 is invalid: expected 0"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, needle):
    _fails_cleanly(args, needle)


def test_malformed_toml_and_unwritable_results(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = [")
    _fails_cleanly(["run", "--preset", str(bad)], "malformed TOML")
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    _fails_cleanly(["run", "--results", str(blocker / "sub")], "is not writable")
    assert blocker.read_text() == "keep me"


def test_bad_input_leaves_existing_results_untouched(tmp_path, tiny_prep):
    from fedbench.config.protocol import MethodEntry
    from fedbench.runtime.server import Run

    run = Run(tiny_prep, MethodEntry("ffa-lora"), tmp_path, backend=in_process)
    run.execute()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    _fails_cleanly(["run", "--results", str(tmp_path), "--methods", "nope"], "Unknown method 'nope'")
    _fails_cleanly(["leaderboard", "--results", str(tmp_path), "--format", "html"], "--format 'html'")
    _fails_cleanly(["leaderboard", "--results", str(tmp_path), "--usage"], "no expert-usage records in")
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert before == after


def test_leaderboard_command_prints_markdown_and_csv(tmp_path, tiny_prep):
    from fedbench.config.protocol import MethodEntry
    from fedbench.runtime.server import Run

    Run(tiny_prep, MethodEntry("fedavg-lora"), tmp_path, backend=in_process).execute()
    md = runner.invoke(app, ["leaderboard", "--results", str(tmp_path), "--format", "markdown"])
    assert md.exit_code == 0 and "| fedavg-lora" in md.output and "majority" in md.output
    out = tmp_path / "board.csv"
    csv = runner.invoke(app, ["leaderboard", "--results", str(tmp_path), "--format", "csv", "--out", str(out)])
    assert csv.exit_code == 0
    header = out.read_text().splitlines()[0].split(",")
    assert header[:2] == ["method", "acc_classification"] and "mean_acc_std" in header


def test_list_and_describe():
    listed = runner.invoke(app, ["list"])
    assert listed.exit_code == 0 and "fedavg-lora" in listed.output and "smoke" in listed.output
    described = runner.invoke(app, ["describe", "fedsa-lora"], env={"COLUMNS": "200"})
    assert described.exit_code == 0, described.output
    text = described.output
    assert "lora_A" in text and "shared" in text and "local" in text and "upload" in text


@pytest.mark.parametrize("name", METHODS.names())
def test_describe_says_where_the_method_acts_on_each_family(name):
    """Every registered method runs on both families, and its description says what it does on the
    generative VLM (issue 22), not only on CLIP."""
    described = runner.invoke(app, ["describe", name], env={"COLUMNS": "200"})
    assert described.exit_code == 0, described.output
    head, _, body = described.output.partition("backbone families: clip, vlm\n")
    assert head and body, described.output[:300]
    assert "``vlm``" in body or "vlm family" in body, f"{name}: describe says nothing of the vlm family"


def test_leaderboard_usage_renders_the_routed_methods_matrix(tmp_path, tiny_prep):
    from fedbench.config.protocol import MethodEntry
    from fedbench.runtime.server import Run

    Run(tiny_prep, MethodEntry("pfedmoe"), tmp_path, backend=in_process).execute()
    csv = runner.invoke(app, ["leaderboard", "--results", str(tmp_path), "--usage", "--format", "csv"])
    assert csv.exit_code == 0, csv.output
    lines = csv.output.splitlines()
    assert lines[0] == "method,task,global,local,entropy,mutual_info,global_std,local_std,entropy_std,mutual_info_std"
    weights = [list(map(float, line.split(",")[2:4])) for line in lines[1:]]
    assert len(weights) == len(tiny_prep.store.task_names) and all(abs(sum(w) - 1) < 1e-6 for w in weights)


def _results_with_history(tmp_path: Path) -> Path:
    """A results directory that already holds files a bad command must leave as they are."""
    results = tmp_path / "results"
    (results / "runs" / "earlier").mkdir(parents=True)
    (results / "protocol.toml").write_text("# an earlier protocol\n")
    (results / "command.txt").write_text("fedbench run --preset smoke\n")
    (results / "runs" / "earlier" / "records.jsonl").write_text('{"kind": "round", "round": 0}\n')
    return results


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"rounds": -3}, "protocol field 'rounds' = -3 is invalid: expected an integer >= 1"),
        ({"data.num_clients": 0}, "protocol field 'data.num_clients' = 0 is invalid: expected an integer >= 1"),
        ({"data.num_clients": -2}, "protocol field 'data.num_clients' = -2 is invalid: expected an integer >= 1"),
        ({"local.steps": 0}, "protocol field 'local.steps' = 0 is invalid: expected an integer >= 1"),
        ({"local.steps": -1}, "protocol field 'local.steps' = -1 is invalid: expected an integer >= 1"),
        ({"local.batch_size": 0}, "protocol field 'local.batch_size' = 0 is invalid: expected an integer >= 1"),
        ({"local.batch_size": -16}, "protocol field 'local.batch_size' = -16 is invalid: expected an integer >= 1"),
        (
            {"clients.sample_fraction": 0.0},
            "protocol field 'clients.sample_fraction' = 0.0 is invalid: expected a number in (0, 1]",
        ),
        (
            {"clients.sample_fraction": 1.5},
            "protocol field 'clients.sample_fraction' = 1.5 is invalid: expected a number in (0, 1]",
        ),
        (
            {"clients.sample_fraction": -0.5},
            "protocol field 'clients.sample_fraction' = -0.5 is invalid: expected a number in (0, 1]",
        ),
        # dirichlet_alpha = 0 is valid (IID labels); a negative alpha is not
        (
            {"data.dirichlet_alpha": -0.1},
            "protocol field 'data.dirichlet_alpha' = -0.1 is invalid: expected a number >= 0 (0 = IID labels)",
        ),
        (
            {"data.tasks_per_client": 5},
            "protocol field 'data.tasks_per_client' = 5 is invalid: expected an integer in [0, 4] "
            "(the protocol has 4 task(s); 0 = every task)",
        ),
        ({"backbone.name": "vit-huge"}, "Unknown backbone 'vit-huge'"),
        # the backbone resizes any image to its own input side; below 16 pixels there is no scene to draw
        ({"data.image_size": 8}, "protocol field 'data.image_size' = 8 is invalid: expected an integer >= 16"),
        (
            {"methods": ["fedavg-lora", "ffa-lora", "fedavg-lora"]},
            "protocol field 'methods' lists the row 'fedavg-lora' twice: list each method row once "
            "(rows: fedavg-lora, ffa-lora, fedavg-lora)",
        ),
    ],
)
def test_bad_protocol_field_is_one_line_exit_2_and_changes_nothing(tmp_path, fields, needle):
    results = _results_with_history(tmp_path)
    preset = _toml(tmp_path / "bad.toml", fields)
    before = _snapshot(tmp_path)
    _fails_cleanly(["run", "--preset", str(preset), "--results", str(results)], needle)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--rounds", "-1"], "--rounds -1 is invalid: expected an integer >= 1"),
        (["--methods", "fedavg-lora,fedavg-lora"], "lists the row 'fedavg-lora' twice"),
        (["--methods", ""], "--methods '' names no method. Available: "),
        (["--methods", " , "], "--methods ' , ' names no method. Available: "),
        (["--seeds", "-1"], "--seeds '-1' must list integers >= 0"),
        (["--seeds", ""], "--seeds '' names no seed: give comma-separated integers >= 0, e.g. 0,1,2"),
        (["--seeds", " , "], "--seeds ' , ' names no seed"),
        (["--tasks", ""], "--tasks '' names no task. Available: "),
    ],
)
def test_bad_run_option_is_one_line_exit_2_and_changes_nothing(tmp_path, args, needle):
    results = _results_with_history(tmp_path)
    before = _snapshot(tmp_path)
    _fails_cleanly(["run", *args, "--results", str(results)], needle)
    assert _snapshot(tmp_path) == before


def test_fewer_tasks_on_the_command_line_than_the_preset_holds_per_client_runs_them():
    from fedbench.cli.protocol_flags import resolve_protocol

    assert resolve_protocol("smoke", None, "vqa", None, None).data.tasks_per_client == 1


def test_results_inside_the_installed_package_are_refused():
    package = Path(fedbench.__file__).resolve().parent
    target = package / "runs-by-mistake"
    before = _snapshot(package)
    _fails_cleanly(["run", "--results", str(target)], f"results path '{target}' is inside the installed fedbench")
    assert not target.exists() and _snapshot(package) == before


def test_read_only_results_directory_is_refused(tmp_path, monkeypatch):
    from fedbench.config.toml_file import load
    from fedbench.runtime.results_dir import write_marker

    results = _results_with_history(tmp_path)
    write_marker(results, load("smoke"))  # fedbench's own directory, of this protocol: only the mode refuses it
    before = _snapshot(tmp_path)
    results.chmod(0o555)
    real_write = Path.write_bytes

    def read_only(self, data):  # root ignores the mode bits: refuse as the kernel would for anyone else
        if self.parent == results:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    try:
        _fails_cleanly(
            ["run", "--results", str(results)], f"results path '{results}' is not writable: Permission denied"
        )
    finally:
        results.chmod(0o755)
    assert _snapshot(tmp_path) == before


def _fault_in_round_2(monkeypatch, kind):
    """From round 2 (index 1) of the run on: ``kind`` "disk" makes every record write fail with ENOSPC,
    "interrupt" raises KeyboardInterrupt (Ctrl-C) as the round starts."""
    import fedbench.utils.records as records
    from fedbench.runtime.server import Run

    real_round = Run._round
    state = {"round": 0}

    def watched_round(self, r, model, fed):
        state["round"] = r
        if kind == "interrupt" and r >= 1:
            raise KeyboardInterrupt
        return real_round(self, r, model, fed)

    class FullDisk:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def write(fd, data):
            if state["round"] >= 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return os.write(fd, data)

    monkeypatch.setattr(Run, "_round", watched_round)
    if kind == "disk":
        monkeypatch.setattr(records, "os", FullDisk())


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("disk", "No space left on device; completed rounds are checkpointed: rerun the same command to resume"),
        ("interrupt", "interrupted; the run is resumable: rerun the same command to resume from its last completed"),
    ],
)
def test_a_run_cut_mid_way_exits_2_resumable_and_a_rerun_resumes(tmp_path, monkeypatch, kind, needle):
    preset = _toml(tmp_path / "tiny.toml", TINY_FIELDS)
    results = tmp_path / "results"
    args = ["run", "--preset", str(preset), "--results", str(results), "--no-plots"]
    with monkeypatch.context() as patch:
        _fault_in_round_2(patch, kind)
        out = _fails_cleanly(args, needle)
        if kind == "disk":
            assert "records.jsonl" in out
        before = _committed(results)
        _fails_cleanly(args, needle)  # cut again: what the first left (round 1, its checkpoint) stays
        assert _committed(results) == before
    assert any(p.name == "checkpoint.json" for p in before)
    rerun = runner.invoke(app, args)
    assert rerun.exit_code == 0, rerun.output
    said = " ".join(rerun.output.split())
    assert (
        "resumed fedavg-lora__seed0__" in said and " from round 2 (rounds 1-1 restored from its checkpoint)" in said
    ), said
