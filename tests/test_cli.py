"""Bad input ends with one line naming the value and the choices, exit code 2, no traceback."""

import pytest
from typer.testing import CliRunner

from fedbench.cli import app

runner = CliRunner()


def _fails_cleanly(args, needle):
    result = runner.invoke(app, args)
    out = result.output.strip()
    assert result.exit_code == 2, out
    assert "Traceback" not in out
    assert needle in " ".join(out.split()), out
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
    from fedbench.protocol import MethodEntry
    from fedbench.server import Run

    run = Run(tiny_prep, MethodEntry("ffa-lora"), tmp_path)
    run.execute()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    _fails_cleanly(["run", "--results", str(tmp_path), "--methods", "nope"], "Unknown method 'nope'")
    _fails_cleanly(["leaderboard", "--results", str(tmp_path), "--format", "html"], "--format 'html'")
    _fails_cleanly(["leaderboard", "--results", str(tmp_path), "--usage"], "no expert-usage records in")
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert before == after


def test_leaderboard_command_prints_markdown_and_csv(tmp_path, tiny_prep):
    from fedbench.protocol import MethodEntry
    from fedbench.server import Run

    Run(tiny_prep, MethodEntry("fedavg-lora"), tmp_path).execute()
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


def test_leaderboard_usage_renders_the_routed_methods_matrix(tmp_path, tiny_prep):
    from fedbench.protocol import MethodEntry
    from fedbench.server import Run

    Run(tiny_prep, MethodEntry("pfedmoe"), tmp_path).execute()
    csv = runner.invoke(app, ["leaderboard", "--results", str(tmp_path), "--usage", "--format", "csv"])
    assert csv.exit_code == 0, csv.output
    lines = csv.output.splitlines()
    assert lines[0] == "method,task,global,local,entropy,mutual_info,global_std,local_std,entropy_std,mutual_info_std"
    weights = [list(map(float, line.split(",")[2:4])) for line in lines[1:]]
    assert len(weights) == len(tiny_prep.store.task_names) and all(abs(sum(w) - 1) < 1e-6 for w in weights)
