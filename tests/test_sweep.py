"""Sweeps: validation of the [sweep] table, per-variant hashes, and a tiny end-to-end sweep whose
report matches the paired differences computed by hand on each variant's records."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fedbench import protocol
from fedbench.cli import app
from fedbench.leaderboard import plot_sweep_gain
from fedbench.protocol import ProtocolError
from fedbench.records import read_records
from fedbench.statistics import paired_differences

runner = CliRunner()

# tests/conftest.py's TINY, one round, two cheap rows
TINY = """
name = "tinysweep"
seeds = [0]
rounds = 2
methods = ["fedmix", "pfedmoe"]

[data]
num_clients = 3
train_images = 8
test_images = 4
global_test_images = 6
tasks_per_client = 2

[local]
steps = 2
batch_size = 8

[eval]
every = 1
batch_size = 64
"""
SWEEP = """
[sweep]
field = "data.domain_task_coupling"
values = [0.0, 1.0]
reference = "pfedmoe"
"""


def _write(tmp_path, text, name="p.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _fails_cleanly(args, needle):
    result = runner.invoke(app, args)
    out = result.output.strip()
    assert result.exit_code == 2, out
    assert "Traceback" not in out
    assert len(out.splitlines()) == 1, out
    assert needle in out, out
    return out


@pytest.mark.parametrize(
    ("sweep", "needle"),
    [
        (
            'field = "data.coupling"\nvalues = [0.0]\nreference = "pfedmoe"',
            "'sweep.field' = 'data.coupling' is not a field a sweep can vary. Did you mean: "
            "data.domain_task_coupling? Choose one of: rounds, data.suite,",
        ),
        (
            'field = "seeds"\nvalues = [[0]]\nreference = "pfedmoe"',
            "'sweep.field' = 'seeds' is not a field a sweep can vary.",
        ),
        (
            'field = "data.domain_task_coupling"\nvalues = [0.0, 1.5]\nreference = "pfedmoe"',
            "'sweep.values[1]' = 1.5 is invalid: 'data.domain_task_coupling' expects a number in [0, 1]",
        ),
        (
            'field = "data.domain_task_coupling"\nvalues = [0.0, "high"]\nreference = "pfedmoe"',
            "'sweep.values[1]' = 'high' is invalid: 'data.domain_task_coupling' expects a number in [0, 1]",
        ),
        (
            'field = "rounds"\nvalues = [1, 2.5]\nreference = "pfedmoe"',
            "'sweep.values[1]' = 2.5 is invalid: 'rounds' expects an integer >= 1",
        ),
        (
            'field = "model.answer_side"\nvalues = ["shared", "both"]\nreference = "pfedmoe"',
            "'sweep.values[1]' = 'both' is invalid: 'model.answer_side' expects one of: shared, per_task",
        ),
        (
            'field = "data.domain_task_coupling"\nvalues = [0, 0.0]\nreference = "pfedmoe"',
            "'sweep.values[1]' = 0.0 repeats sweep.values[0]",
        ),
        (
            'field = "data.domain_task_coupling"\nvalues = []\nreference = "pfedmoe"',
            "'sweep.values' = [] is invalid: expected a non-empty list of values",
        ),
        (
            'field = "data.domain_task_coupling"\nvalues = [0.0]\nreference = "pilot-ctmoa"',
            "'sweep.reference' = 'pilot-ctmoa' is not one of the protocol's method rows. Choose one of: fedmix, "
            "pfedmoe",
        ),
        (
            'field = "data.domain_task_coupling"\nvalues = [0.0]\nrefrence = "pfedmoe"',
            "unknown protocol field 'sweep.refrence'. Valid fields: sweep.field, sweep.values, sweep.reference",
        ),
        ('field = "data.domain_task_coupling"\nvalues = [0.0]', "protocol table 'sweep' lacks 'reference'"),
    ],
)
def test_bad_sweep_is_one_line_exit_2(tmp_path, sweep, needle):
    path = _write(tmp_path, TINY + "\n[sweep]\n" + sweep + "\n")
    _fails_cleanly(["run", "--preset", path, "--results", str(tmp_path / "out")], needle)
    assert not (tmp_path / "out").exists()  # nothing written before validation passes
    with pytest.raises(ProtocolError):
        protocol.load(path)


def test_overrides_are_validated_against_the_sweep(tmp_path):
    path = _write(tmp_path, TINY + SWEEP)
    _fails_cleanly(
        ["run", "--preset", path, "--methods", "fedmix,local-only", "--results", str(tmp_path / "out")],
        "'sweep.reference' = 'pfedmoe' is not one of the protocol's method rows. Choose one of: fedmix, local-only",
    )
    _fails_cleanly(  # labels with options keep their brackets in the message (no rich markup)
        ["run", "--preset", path, "--methods", "ffa-lora:rank=4", "--results", str(tmp_path / "out")],
        "Choose one of: ffa-lora[rank=4]",
    )
    assert not (tmp_path / "out").exists()
    _fails_cleanly(["sweep-report", "--results", str(tmp_path / "nope")], "results directory")
    _fails_cleanly(["sweep-report", "--results", str(tmp_path)], "holds no protocol.toml")


def test_variants_have_their_own_hash_equal_to_the_protocol_written_without_sweep(tmp_path):
    proto = protocol.load(_write(tmp_path, TINY + SWEEP.replace("[0.0, 1.0]", "[0, 0.5, 1]")))
    variants = proto.variants()
    assert [v for v, _ in variants] == [0.0, 0.5, 1.0]  # converted to the field's type
    hashes = [variant.hash for _, variant in variants]
    assert len(set(hashes)) == 3 and proto.hash not in hashes
    for value, variant in variants:
        plain = TINY.replace("tasks_per_client = 2", f"tasks_per_client = 2\ndomain_task_coupling = {value}")
        written = protocol.load(_write(tmp_path, plain, f"plain{value}.toml"))
        assert variant.hash == written.hash
        assert variant.sweep is None and variant.data.domain_task_coupling == value
        assert variant.name == f"tinysweep[domain_task_coupling={value}]"
        assert variant.methods == proto.methods and variant.rounds == proto.rounds
    assert protocol.load(_write(tmp_path, TINY, "nosweep.toml")).variants() == []
    assert "sweep" not in protocol.load("smoke").as_dict()  # protocols without a sweep hash as before


def _examples(records: pd.DataFrame) -> dict:
    """label -> seed -> task -> per-example scores of each run's last global eval, by hand."""
    ev = records[(records["kind"] == "eval") & (records["scope"] == "global")]
    ev = ev[ev["round"] == ev.groupby("run_id")["round"].transform("max")]
    out: dict = {}
    for label, seed, task, scores in zip(ev["label"], ev["seed"], ev["task"], ev["per_example"], strict=True):
        out.setdefault(label, {}).setdefault(int(seed), {})[task] = np.asarray(scores, dtype=float)
    return out


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    path = _write(tmp, TINY + SWEEP)
    out = tmp / "out"
    result = runner.invoke(app, ["run", "--preset", path, "--results", str(out), "--rounds", "1"])
    assert result.exit_code == 0, result.output
    return out


def test_sweep_run_writes_a_results_directory_per_value(sweep_dir):
    top = {p.name for p in sweep_dir.iterdir()}
    assert top == {
        "protocol.toml",
        "command.txt",
        "domain_task_coupling=0.0",
        "domain_task_coupling=1.0",
        "sweep.md",
        "sweep.csv",
        "sweep_gain.png",
    }
    assert (sweep_dir / "sweep_gain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep_proto = protocol.load(str(sweep_dir / "protocol.toml"))
    assert sweep_proto.sweep is not None and sweep_proto.rounds == 1  # --rounds reached the sweep
    for value, variant in sweep_proto.variants():
        sub = sweep_dir / f"domain_task_coupling={value}"
        for name in ("leaderboard.md", "leaderboard.csv", "protocol.toml", "acc_per_round.png"):
            assert (sub / name).is_file(), name
        written = protocol.load(str(sub / "protocol.toml"))
        assert written.sweep is None and written.rounds == 1 and written.hash == variant.hash
        records = read_records(sub)
        assert set(records["protocol_hash"]) == {variant.hash}
        assert set(records["label"]) == {"fedmix", "pfedmoe"}


def test_leaderboard_of_a_sweep_directory_points_to_sweep_report(sweep_dir):
    _fails_cleanly(["leaderboard", "--results", str(sweep_dir)], "holds a sweep")


def test_sweep_report_equals_paired_differences_of_each_directory(sweep_dir):
    md = (sweep_dir / "sweep.md").read_text()
    csv = pd.read_csv(sweep_dir / "sweep.csv")
    assert "over `pfedmoe`" in md and "SYNTHETIC" in md
    header = next(line for line in md.splitlines() if line.startswith("| method |"))
    assert header == "| method | domain_task_coupling=0.0 | domain_task_coupling=1.0 |"
    cells = next(line for line in md.splitlines() if line.startswith("| fedmix |")).strip("| ").split(" | ")[1:]
    for i, value in enumerate((0.0, 1.0)):
        records = read_records(sweep_dir / f"domain_task_coupling={value}")
        diff = paired_differences(_examples(records), "pfedmoe").loc["fedmix"]
        mean, lo, hi = diff["mean_acc"], diff["mean_acc_lo"], diff["mean_acc_hi"]
        star = " *" if lo > 0 or hi < 0 else ""
        assert cells[i] == f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]{star}"
        row = csv[(csv["domain_task_coupling"] == value) & (csv["method"] == "fedmix")].iloc[0]
        figures = [c for c in diff.index if c.startswith(("acc_", "mean_acc"))]
        assert len(figures) == 3 * 5  # four tasks and the mean, each with its interval
        np.testing.assert_allclose(row[figures].astype(float), diff[figures].astype(float))
        assert row["seeds"] == 1


def test_sweep_report_rebuilds_and_notes_missing_values(sweep_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(sweep_dir, copy)
    for name in ("sweep.md", "sweep.csv", "sweep_gain.png"):
        (copy / name).unlink()
    result = runner.invoke(app, ["sweep-report", "--results", str(copy)])
    assert result.exit_code == 0, result.output
    assert (copy / "sweep.md").read_text() == (sweep_dir / "sweep.md").read_text()
    assert (copy / "sweep.csv").read_text() == (sweep_dir / "sweep.csv").read_text()
    assert (copy / "sweep_gain.png").is_file()

    shutil.rmtree(copy / "domain_task_coupling=1.0")
    result = runner.invoke(app, ["sweep-report", "--results", str(copy), "--no-plots"])
    assert result.exit_code == 0, result.output
    md = (copy / "sweep.md").read_text()
    assert "domain_task_coupling=1.0 |" not in md and "Left out" in md and "domain_task_coupling=1.0." in md

    shutil.rmtree(copy / "domain_task_coupling=0.0")
    _fails_cleanly(["sweep-report", "--results", str(copy)], "no completed run of the reference row 'pfedmoe'")
    single = tmp_path / "single"
    single.mkdir()
    (single / "protocol.toml").write_text(TINY)
    _fails_cleanly(["sweep-report", "--results", str(single)], "declares no [sweep]")


def test_plot_sweep_gain_draws_one_line_per_row_with_ci(tmp_path):
    rows = []
    for v in ("shared", "per_task"):
        for i, label in enumerate(["a", "b[x=1]", "c"]):
            mean = np.nan if (label == "c" and v == "shared") else 0.01 * i
            rows.append({"answer_side": v, "method": label, "mean_acc": mean, "mean_acc_lo": mean - 0.02})
    table = pd.DataFrame(rows).assign(mean_acc_hi=lambda t: t["mean_acc"] + 0.02)
    table.attrs = {
        "short": "answer_side",
        "values": ["shared", "per_task"],
        "field": "model.answer_side",
        "reference": "ref",
        "synthetic": True,
    }
    path = plot_sweep_gain(table, tmp_path / "gain.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
