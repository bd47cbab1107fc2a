"""Bytes to a target accuracy (`fedbench compare`) against hand-computed answers on a tiny record set."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.reporting.compare import CompareError, build_compare, render_compare
from fedbench.utils.records import append_records

REF, OTHER, POOLED = "fedavg-lora", "mmrouter-moa[ocr_expert=false,router_inputs=image]", "centralized"


def _run(label, seed, *, glob, clients_per_round, up, down, federated=True):
    """3 rounds (0, 1, 2), global evals at rounds 0 and 2 only; glob: {task: (round-0, round-2) score};
    clients_per_round: clients trained in rounds 0, 1, 2, each sending ``up`` and receiving ``down``."""
    common = dict(run_id=f"{label}-{seed}", label=label, method=label.split("[")[0], seed=seed, synthetic=True)
    rows = [
        dict(common, kind="train", round=rnd, client=c, up_bytes=up, down_bytes=down, compute_s=1.0)
        for rnd, n in enumerate(clients_per_round)
        for c in range(n)
    ]
    for task, scores in glob.items():
        rows += [
            dict(common, kind="eval", scope="global", task=task, round=rnd, value=v)
            for rnd, v in zip((0, 2), scores, strict=True)
        ]
    rows.append(dict(common, kind="run", completed=True, federated=federated, rounds=3))
    return rows


def _records() -> list[dict]:
    rows = []
    rows += _run(
        REF, 0, glob={"ta": (0.4, 0.6), "tb": (0.2, 0.3)}, clients_per_round=(2, 2, 2), up=100_000, down=200_000
    )
    rows += _run(
        REF, 1, glob={"ta": (0.5, 0.7), "tb": (0.2, 0.5)}, clients_per_round=(2, 2, 2), up=100_000, down=200_000
    )
    rows += _run(
        OTHER, 0, glob={"ta": (0.5, 0.6), "tb": (0.1, 0.6)}, clients_per_round=(2, 2, 2), up=50_000, down=50_000
    )
    rows += _run(
        OTHER, 1, glob={"ta": (0.6, 0.6), "tb": (0.1, 0.3)}, clients_per_round=(1, 2, 2), up=50_000, down=50_000
    )
    rows += _run(
        POOLED,
        0,
        glob={"ta": (0.9, 0.9), "tb": (0.1, 0.55)},
        clients_per_round=(1, 1, 1),
        up=0,
        down=0,
        federated=False,
    )
    # an unfinished run never counts
    rows += [r if r["kind"] != "run" else {**r, "completed": False} for r in _run(REF, 2, **_PERFECT)]
    return rows


_PERFECT = dict(glob={"ta": (1.0, 1.0), "tb": (1.0, 1.0)}, clients_per_round=(9, 9, 9), up=1, down=1)


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return build_compare(pd.DataFrame(_records()), 0.5)


def _get(table, label, family):
    return table[(table["method"] == label) & (table["family"] == family)].iloc[0]


def test_rounds_and_bytes_to_target_are_the_hand_computed_ones(table):
    # ta: fedavg-lora's seed mean is 0.45 after round 0, 0.65 after round 2 -> 3 rounds; bytes through
    # round 2 = 3 rounds x 2 clients x (0.1 MB up, 0.2 MB down), the same in both seeds.
    ref = _get(table, REF, "ta")
    assert ref["reached"] and ref["rounds"] == 3
    assert ref[["up_mb", "down_mb", "total_mb"]].tolist() == pytest.approx([0.6, 1.2, 1.8])
    assert ref["vs_reference"] == pytest.approx(1.0)
    # OTHER reaches 0.55 after round 0: seed 0 sent 2 x 0.05 MB each way, seed 1 (one client) 0.05.
    other = _get(table, OTHER, "ta")
    assert other["reached"] and other["rounds"] == 1
    assert other[["up_mb", "down_mb", "total_mb"]].tolist() == pytest.approx([0.075, 0.075, 0.15])
    assert other["vs_reference"] == pytest.approx(0.15 / 1.8)
    # tb: fedavg-lora ends at 0.40, OTHER at 0.45: neither reaches; the pooled row reaches 0.55 after
    # round 2 with no bytes to count.
    assert not _get(table, REF, "tb")["reached"] and not _get(table, OTHER, "tb")["reached"]
    assert _get(table, OTHER, "tb")["best_acc"] == pytest.approx(0.45)
    pooled = _get(table, POOLED, "tb")
    assert pooled["reached"] and pooled["rounds"] == 3 and pd.isna(pooled["total_mb"])
    # all tasks (mean_acc): fedavg-lora 0.325 then 0.525 -> 3 rounds, 1.8 MB; OTHER per seed 0.3 / 0.35,
    # then 0.6 / 0.45 -> 0.525 after round 2: seed 0 sent 6 x 0.05 MB each way, seed 1 5 x 0.05.
    mean = _get(table, OTHER, "mean_acc")
    assert mean["rounds"] == 3
    assert mean[["up_mb", "down_mb", "total_mb"]].tolist() == pytest.approx([0.275, 0.275, 0.55])
    assert mean["vs_reference"] == pytest.approx(0.55 / 1.8)
    assert _get(table, POOLED, "mean_acc")["rounds"] == 1  # (0.9 + 0.1) / 2 = 0.5 already after round 0
    assert table.attrs["evaluated"] == [1, 3]


def test_order_task_filter_and_bad_input(table):
    ta = table[table["family"] == "ta"]["method"].tolist()
    assert ta == [OTHER, REF, POOLED]  # reached, fewest bytes first; not federated after
    only = build_compare(pd.DataFrame(_records()), 0.5, task="tb")
    assert set(only["family"]) == {"tb"}
    with pytest.raises(CompareError, match=r"unknown task 'tc'; tasks in these results: mean_acc, ta, tb"):
        build_compare(pd.DataFrame(_records()), 0.5, task="tc")
    with pytest.raises(CompareError, match=r"--target 1.5 is outside \[0, 1\]"):
        build_compare(pd.DataFrame(_records()), 1.5)


def test_render_says_not_reached_and_fits_the_width(table):
    text = render_compare(table, "table", width=80)
    assert "not reached" in text and "n/a" in text and "0.08×" in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "Row options: oe = ocr_expert, ri = router_inputs." in " ".join(text.split())
    md = render_compare(table, "markdown")
    assert f"| {OTHER} | ta | 1 | 0.075 | 0.075 | 0.150 | 0.08× | 0.600 |" in md
    assert render_compare(table, "csv").splitlines()[0].startswith("method,family,reached,rounds,up_mb")


def test_compare_command(tmp_path):
    append_records(tmp_path / "runs" / "x" / "records.jsonl", _records())
    runner = CliRunner()
    ok = runner.invoke(app, ["compare", "--results", str(tmp_path), "--target", "0.5", "--format", "csv"])
    assert ok.exit_code == 0, ok.output
    assert f'"{OTHER}",ta,True,1,' in ok.output
    for args, needle in [
        (["--target", "1.5"], "--target 1.5 is outside [0, 1]"),
        (["--target", "0.5", "--task", "tc"], "unknown task 'tc'; tasks in these results: mean_acc, ta, tb"),
    ]:
        bad = runner.invoke(app, ["compare", "--results", str(tmp_path), *args])
        assert bad.exit_code == 2 and "Traceback" not in bad.output
        assert needle in " ".join(bad.output.split())
    missing = runner.invoke(app, ["compare", "--results", str(tmp_path / "nope"), "--target", "0.5"])
    assert missing.exit_code == 2 and "results directory" in missing.output and "nope" in missing.output
