"""Sweeps: validation of the [sweep] table, per-variant hashes, and a tiny end-to-end sweep whose
report matches the paired differences computed by hand on each variant's records."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.cli.protocol_flags import resolve_protocol
from fedbench.config import toml_file
from fedbench.config.protocol import ProtocolError
from fedbench.config.toml_file import to_toml
from fedbench.reporting.plots import plot_sweep_gain
from fedbench.utils.records import read_records

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
            "unknown protocol field 'sweep.refrence'. Valid fields: sweep.field, sweep.values, sweep.reference, "
            "sweep.seeds",
        ),
        ('field = "data.domain_task_coupling"\nvalues = [0.0]', "protocol table 'sweep' lacks 'reference'"),
        # per-value seeds: one non-empty list of distinct integers >= 0 per value
        (
            'field = "data.domain_task_coupling"\nvalues = [0.0, 1.0]\nreference = "pfedmoe"\nseeds = [[0, 1]]',
            "protocol field 'sweep.seeds' has 1 list(s) for 2 value(s): expected one list of seeds per entry of "
            "sweep.values, in the same order",
        ),
        (
            'field = "data.domain_task_coupling"\nvalues = [0.0, 1.0]\nreference = "pfedmoe"\nseeds = []',
            "protocol field 'sweep.seeds' has 0 list(s) for 2 value(s)",
        ),
        (
            'field = "data.domain_task_coupling"\nvalues = [0.0, 1.0]\nreference = "pfedmoe"\nseeds = [[0], []]',
            "protocol field 'sweep.seeds[1]' = [] is invalid: expected a non-empty list of distinct integers >= 0 "
            "(the seeds of sweep.values[1])",
        ),
        (
            'field = "data.domain_task_coupling"\nvalues = [0.0, 1.0]\nreference = "pfedmoe"\nseeds = [[0, -1], [2]]',
            "protocol field 'sweep.seeds[0]' = [0, -1] is invalid: expected a non-empty list of distinct integers",
        ),
        (
            'field = "data.domain_task_coupling"\nvalues = [0.0, 1.0]\nreference = "pfedmoe"\nseeds = [[0], [2, 2]]',
            "protocol field 'sweep.seeds[1]' = [2, 2] is invalid: expected a non-empty list of distinct integers",
        ),
        (
            'field = "data.domain_task_coupling"\nvalues = [0.0, 1.0]\nreference = "pfedmoe"\nseeds = [[0], [1.5]]',
            "protocol field 'sweep.seeds[1]' = [1.5] is invalid: expected a non-empty list of distinct integers",
        ),
        (
            'field = "data.domain_task_coupling"\nvalues = [0.0, 1.0]\nreference = "pfedmoe"\nseeds = [0, 1]',
            "protocol field 'sweep.seeds[0]' = 0 is invalid: expected a non-empty list of distinct integers",
        ),
        (
            'field = "data.domain_task_coupling"\nvalues = [0.0, 1.0]\nreference = "pfedmoe"\nseeds = "0-9"',
            "protocol field 'sweep.seeds' must be a list of seed lists (one per entry of sweep.values), got '0-9'",
        ),
    ],
)
def test_bad_sweep_is_one_line_exit_2(tmp_path, sweep, needle):
    path = _write(tmp_path, TINY + "\n[sweep]\n" + sweep + "\n")
    _fails_cleanly(["run", "--preset", path, "--results", str(tmp_path / "out")], needle)
    assert not (tmp_path / "out").exists()  # nothing written before validation passes
    with pytest.raises(ProtocolError):
        toml_file.load(path)


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
    proto = toml_file.load(_write(tmp_path, TINY + SWEEP.replace("[0.0, 1.0]", "[0, 0.5, 1]")))
    variants = proto.variants()
    assert [v for v, _ in variants] == [0.0, 0.5, 1.0]  # converted to the field's type
    hashes = [variant.hash for _, variant in variants]
    assert len(set(hashes)) == 3 and proto.hash not in hashes
    for value, variant in variants:
        plain = TINY.replace("tasks_per_client = 2", f"tasks_per_client = 2\ndomain_task_coupling = {value}")
        written = toml_file.load(_write(tmp_path, plain, f"plain{value}.toml"))
        assert variant.hash == written.hash
        assert variant.sweep is None and variant.data.domain_task_coupling == value
        assert variant.name == f"tinysweep[domain_task_coupling={value}]"
        assert variant.methods == proto.methods and variant.rounds == proto.rounds
    assert toml_file.load(_write(tmp_path, TINY, "nosweep.toml")).variants() == []
    assert "sweep" not in toml_file.load("smoke").as_dict()  # protocols without a sweep hash as before


PER_VALUE = SWEEP + "seeds = [[3], [4, 5]]\n"


def test_per_value_seeds_give_each_variant_its_seeds_and_keep_every_hash(tmp_path):
    """``sweep.seeds``: value i runs seeds[i]; seeds are replicates, so the variants' hashes (and the sweep
    protocol's own) are those of the same sweep without them, and the results of before stay valid."""
    plain = toml_file.load(_write(tmp_path, TINY + SWEEP, "plain.toml"))
    per_value = toml_file.load(_write(tmp_path, TINY.replace("seeds = [0]\n", "") + PER_VALUE, "per_value.toml"))
    assert per_value.sweep.seeds == ((3,), (4, 5))
    assert per_value.seeds == (3, 4, 5)  # left out beside them: every seed the sweep runs
    assert per_value.hash == plain.hash
    assert [(v, p.seeds) for v, p in per_value.variants()] == [(0.0, (3,)), (1.0, (4, 5))]
    assert [p.hash for _, p in per_value.variants()] == [p.hash for _, p in plain.variants()]
    assert [p.name for _, p in per_value.variants()] == [p.name for _, p in plain.variants()]
    # a top-level list written beside them is kept in the file but not run
    explicit = toml_file.load(_write(tmp_path, TINY + PER_VALUE, "explicit.toml"))
    assert explicit.seeds == (0,) and [p.seeds for _, p in explicit.variants()] == [(3,), (4, 5)]
    # without the key: every value runs the protocol's seeds, and the table reads as before
    assert [p.seeds for _, p in plain.variants()] == [(0,), (0,)]
    assert plain.sweep.seeds is None and "seeds" not in plain.as_dict()["sweep"]


def test_per_value_seeds_round_trip_through_the_written_protocol_toml(tmp_path):
    for text in (TINY + PER_VALUE, TINY.replace("seeds = [0]\n", "") + PER_VALUE, TINY + SWEEP):
        proto = toml_file.load(_write(tmp_path, text))
        written = to_toml(proto)
        assert ("seeds = [\n    [\n" in written) == (proto.sweep.seeds is not None)
        again = toml_file.load(_write(tmp_path, written, "written.toml"))
        assert again == proto and again.hash == proto.hash
        assert [(v, p.seeds, p.hash) for v, p in again.variants()] == [
            (v, p.seeds, p.hash) for v, p in proto.variants()
        ]
    frozen = toml_file.load("routing-frozen")  # the preset: disjoint seeds, hashes of the committed study
    again = toml_file.load(_write(tmp_path, to_toml(frozen), "frozen.toml"))
    assert again == frozen
    assert [(p.seeds, p.hash) for _, p in frozen.variants()] == [
        ((100, 101, 102, 103, 104), "30e39c5a9a14"),
        (tuple(range(10)), "32a20eb30263"),
        ((200, 201, 202, 203, 204), "9926d1363b3e"),
    ]
    assert frozen.hash == "53269ba4585c"  # results/routing-frozen/protocol.toml's


def test_seeds_option_replaces_per_value_seeds_for_every_value(tmp_path):
    path = _write(tmp_path, TINY + PER_VALUE)
    proto = resolve_protocol(path, None, None, "7,8", None)
    assert proto.sweep is not None and proto.sweep.seeds is None
    assert [p.seeds for _, p in proto.variants()] == [(7, 8), (7, 8)]
    assert resolve_protocol(path, None, None, None, None).sweep.seeds == ((3,), (4, 5))


def test_sweep_run_gives_each_value_directory_exactly_its_seeds(tmp_path):
    out = tmp_path / "out"
    path = _write(tmp_path, TINY + SWEEP + "seeds = [[4], [3]]\n")  # disjoint, not in sorted order
    result = runner.invoke(app, ["run", "--preset", path, "--results", str(out), "--rounds", "1", "--no-plots"])
    assert result.exit_code == 0, result.output
    assert toml_file.load(str(out / "protocol.toml")).sweep.seeds == ((4,), (3,))
    for value, seeds in ((0.0, {4}), (1.0, {3})):
        sub = out / f"domain_task_coupling={value}"
        assert toml_file.load(str(sub / "protocol.toml")).seeds == tuple(sorted(seeds))
        runs = read_records(sub).query("kind == 'run'")
        assert set(runs["seed"]) == seeds
        assert sorted(runs["label"]) == sorted(["fedmix", "pfedmoe"] * len(seeds))


def _per_seed_mean_acc(records: pd.DataFrame) -> dict[str, dict[int, float]]:
    """label -> seed -> mean_acc of each run's last global eval (mean over tasks), by hand."""
    ev = records[(records["kind"] == "eval") & (records["scope"] == "global")]
    ev = ev[ev["round"] == ev.groupby("run_id")["round"].transform("max")]
    means = ev.groupby(["label", "seed"])["value"].mean()
    return {
        label: {int(seed): v for (lab, seed), v in means.items() if lab == label} for label in means.index.levels[0]
    }


def _t(values: list[float]) -> tuple[float, float, float]:
    """mean and 95% t-interval, written out with scipy (not fedbench's function)."""
    mean, half = np.mean(values), stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values))
    return mean, mean - half, mean + half


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    path = _write(tmp, TINY + SWEEP + "seeds = [[0, 1], [1, 2]]\n")  # seed 1 runs at both values
    out = tmp / "out"
    result = runner.invoke(app, ["run", "--preset", path, "--results", str(out), "--rounds", "1"])
    assert result.exit_code == 0, result.output
    return out


def test_sweep_run_writes_a_results_directory_per_value(sweep_dir):
    top = {p.name for p in sweep_dir.iterdir()}
    assert top == {
        ".fedbench",
        "protocol.toml",
        "command.txt",
        "domain_task_coupling=0.0",
        "domain_task_coupling=1.0",
        "sweep.md",
        "sweep.csv",
        "sweep_gain.png",
    }
    assert (sweep_dir / "sweep_gain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep_proto = toml_file.load(str(sweep_dir / "protocol.toml"))
    assert sweep_proto.sweep is not None and sweep_proto.rounds == 1  # --rounds reached the sweep
    # one protocol per directory: the top holds the sweep's hash, each value directory its variant's
    assert json.loads((sweep_dir / ".fedbench").read_text())["protocol_hash"] == sweep_proto.hash
    for value, variant in sweep_proto.variants():
        sub = sweep_dir / f"domain_task_coupling={value}"
        assert json.loads((sub / ".fedbench").read_text())["protocol_hash"] == variant.hash
        for name in ("leaderboard.md", "leaderboard.csv", "protocol.toml", "acc_per_round.png"):
            assert (sub / name).is_file(), name
        written = toml_file.load(str(sub / "protocol.toml"))
        assert written.sweep is None and written.rounds == 1 and written.hash == variant.hash
        records = read_records(sub)
        assert set(records["protocol_hash"]) == {variant.hash}
        assert set(records["label"]) == {"fedmix", "pfedmoe"}


def test_leaderboard_of_a_sweep_directory_points_to_sweep_report(sweep_dir):
    _fails_cleanly(["leaderboard", "--results", str(sweep_dir)], "holds a sweep")


def test_sweep_report_equals_paired_differences_of_each_directory(sweep_dir):
    """Each cell is the t-interval over seeds of the per-seed mean_acc difference, recomputed from the
    raw records; the pooled column counts seed 1 (run at both values) once, with its mean difference."""
    md = (sweep_dir / "sweep.md").read_text()
    csv = pd.read_csv(sweep_dir / "sweep.csv")
    assert "over `pfedmoe`" in md and "SYNTHETIC" in md
    header = next(line for line in md.splitlines() if line.startswith("| method |"))
    assert header == (
        "| method | domain_task_coupling=0.0 (2 seeds) | domain_task_coupling=1.0 (2 seeds) | pooled (3 seeds) |"
    )
    cells = next(line for line in md.splitlines() if line.startswith("| fedmix |")).strip("| ").split(" | ")[1:]
    by_seed: dict[int, list[float]] = {}
    for i, value in enumerate((0.0, 1.0)):
        per_seed = _per_seed_mean_acc(read_records(sweep_dir / f"domain_task_coupling={value}"))
        diffs = {s: per_seed["fedmix"][s] - per_seed["pfedmoe"][s] for s in per_seed["pfedmoe"]}
        assert sorted(diffs) == [[0, 1], [1, 2]][i]
        for seed, d in diffs.items():
            by_seed.setdefault(seed, []).append(d)
        mean, lo, hi = _t(list(diffs.values()))
        assert cells[i].startswith(f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        row = csv[(csv["domain_task_coupling"] == str(value)) & (csv["method"] == "fedmix")].iloc[0]
        np.testing.assert_allclose(row[["mean_acc", "mean_acc_lo", "mean_acc_hi"]].astype(float), [mean, lo, hi])
        figures = [c for c in row.index if c.startswith(("acc_", "mean_acc")) and not c.endswith(("_lo", "_hi"))]
        assert len(figures) == 5 and row["seeds"] == 2  # four tasks and the mean, each with its interval
    assert sorted(by_seed) == [0, 1, 2] and len(by_seed[1]) == 2
    mean, lo, hi = _t([float(np.mean(d)) for d in by_seed.values()])
    assert cells[2].startswith(f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    pooled = csv[(csv["domain_task_coupling"] == "pooled") & (csv["method"] == "fedmix")].iloc[0]
    np.testing.assert_allclose(pooled[["mean_acc", "mean_acc_lo", "mean_acc_hi"]].astype(float), [mean, lo, hi])
    assert pooled["seeds"] == 3
    assert "Holm's adjustment for the 3 mean_acc comparisons" in md and "each counts once" in md


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
