"""Leaderboard numbers against hand-computed values on a tiny hand-built record set."""

from __future__ import annotations

import io
import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from fedbench.backends.inprocess import in_process
from fedbench.reporting.board import (
    UnknownRowError,
    build_leaderboard,
    build_steps,
    build_usage,
    build_versus,
)
from fedbench.reporting.plots import plot
from fedbench.reporting.text import render
from fedbench.utils.records import append_records, read_records

A, B, C = "fedavg-lora", "mmrouter-moa[router_inputs=image]", "local-lora"
TASKS = ("ref", "vqa")
DEVICE = "cuda:NVIDIA H100"
S2 = math.sqrt(2)


def _common(run_id, label, seed=0, device="cpu"):
    """The provenance fields every record of a run carries."""
    return dict(
        run_id=run_id,
        method=label.split("[")[0],
        label=label,
        seed=seed,
        protocol="quick",
        protocol_hash="abc123",
        git_commit="deadbee",
        suite="scenes",
        synthetic=True,
        device=device,
    )


def _run(label, seed, *, glob, clients, up, down, params, completed=True, device=DEVICE, majority=None):
    """Records of one run: 2 rounds x 2 clients.

    glob: {task: last-round global accuracy} (round 1 is 0.0 everywhere, so a board using it fails);
    clients: {client: {task: last-round accuracy}}; up/down: bytes per client per round at round 1,
    doubled at round 2; params: (trainable, shared, local).
    """
    run_id = f"{label}-s{seed}-{completed}"
    common = _common(run_id, label, seed, device)
    rows = []
    for rnd in (1, 2):
        for client in (0, 1):
            rows.append(
                dict(
                    common,
                    kind="train",
                    round=rnd,
                    client=client,
                    up_bytes=up * rnd,
                    down_bytes=down * rnd,
                    up_bytes_analytic=up * rnd,
                    down_bytes_analytic=down * rnd,
                    compute_s=1.5,
                    timer="cuda_events",
                    n_examples=10,
                )
            )
        for task in TASKS:
            rows.append(
                dict(
                    common,
                    kind="eval",
                    round=rnd,
                    scope="global",
                    client=-1,
                    task=task,
                    split="global_test",
                    metric="accuracy",
                    value=glob[task] if rnd == 2 else 0.0,
                    n=100,
                )
            )
            for client, acc in clients.items():
                rows.append(
                    dict(
                        common,
                        kind="eval",
                        round=rnd,
                        scope="client",
                        client=client,
                        task=task,
                        split="test",
                        metric="accuracy",
                        value=acc[task] if rnd == 2 else 0.0,
                        n=20,
                    )
                )
    rows.append(
        dict(
            common,
            kind="run",
            params_trainable=params[0],
            params_shared=params[1],
            params_local=params[2],
            rounds=2,
            tasks=list(TASKS),
            completed=completed,
            versions={"torch": "2.14.1"},
            partition=[{"client": 0}, {"client": 1}],
        )
    )
    majority = majority or {"ref": 0.25, "vqa": 0.5 if seed == 0 else 0.3}
    rows += [dict(common, kind="majority", task=t, value=v) for t, v in majority.items()]
    return rows


def _records() -> list[dict]:
    rows = []
    # A: mean_acc per seed 0.70 / 0.60; worst client 0.5 / 0.4; seed 1 sends twice the bytes.
    rows += _run(
        A,
        0,
        glob={"vqa": 0.8, "ref": 0.6},
        clients={0: {"vqa": 0.8, "ref": 0.6}, 1: {"vqa": 0.4, "ref": 0.6}},
        up=1_000_000,
        down=2_000_000,
        params=(1000, 1000, 0),
    )
    rows += _run(
        A,
        1,
        glob={"vqa": 0.7, "ref": 0.5},
        clients={0: {"vqa": 0.3, "ref": 0.5}, 1: {"vqa": 0.9, "ref": 0.9}},
        up=2_000_000,
        down=4_000_000,
        params=(1000, 1000, 0),
        device="cpu",
    )
    # B: mean_acc per seed 0.9 / 0.8.
    rows += _run(
        B,
        0,
        glob={"vqa": 0.9, "ref": 0.9},
        clients={0: {"vqa": 0.6, "ref": 0.6}, 1: {"vqa": 0.8, "ref": 0.8}},
        up=500_000,
        down=500_000,
        params=(3000, 2000, 1000),
    )
    rows += _run(
        B,
        1,
        glob={"vqa": 0.9, "ref": 0.7},
        clients={0: {"vqa": 0.7, "ref": 0.7}, 1: {"vqa": 0.9, "ref": 0.9}},
        up=500_000,
        down=500_000,
        params=(3000, 2000, 1000),
    )
    # C: one seed only -> std is NaN.
    rows += _run(
        C,
        0,
        glob={"vqa": 0.5, "ref": 0.5},
        clients={0: {"vqa": 0.5, "ref": 0.5}, 1: {"vqa": 0.5, "ref": 0.5}},
        up=0,
        down=0,
        params=(500, 0, 500),
    )
    # Incomplete runs (an extra A seed, and a label with no completed run) must not count at all.
    perfect = {"vqa": 1.0, "ref": 1.0}
    rows += _run(
        A,
        2,
        glob=perfect,
        clients={0: perfect},
        up=9,
        down=9,
        params=(1, 1, 1),
        completed=False,
        majority={"vqa": 0.99, "ref": 0.99},
    )
    rows += _run("ghost", 0, glob=perfect, clients={0: perfect}, up=9, down=9, params=(1, 1, 1), completed=False)
    return rows


@pytest.fixture(scope="module")
def board() -> pd.DataFrame:
    return build_leaderboard(pd.DataFrame(_records()))


def _row(board: pd.DataFrame, method: str) -> pd.Series:
    return board.set_index("method").loc[method]


def test_column_order_and_rows(board):
    accs = ["acc_ref", "acc_vqa", "mean_acc", "local_acc", "worst_client_acc", "p_acc", "ttp_acc"]
    costs = ["up_mb_per_round", "down_mb_per_round", "total_mb", "compute_s", "compute_gflop"]
    params = ["params_trainable", "params_shared", "params_local"]
    assert list(board.columns) == [
        "method",
        *accs,
        "converged",
        *costs,
        "device",
        *params,
        "federated",
        *(f"{c}_std" for c in [*accs, *costs, *params]),
        *(f"{c}_{end}" for c in ["acc_ref", "acc_vqa", "mean_acc"] for end in ("lo", "hi")),
    ]
    assert list(board["method"]) == [B, A, C, "majority"]  # mean_acc desc, majority last; ghost dropped


def test_accuracy_uses_last_round_and_completed_runs(board):
    a = _row(board, A)
    assert a["acc_vqa"] == pytest.approx(0.75)
    assert a["acc_ref"] == pytest.approx(0.55)
    assert a["mean_acc"] == pytest.approx(0.65)
    assert a["worst_client_acc"] == pytest.approx(0.45)  # min over clients of per-client task mean
    assert _row(board, B)["worst_client_acc"] == pytest.approx(0.65)
    # local_acc: per client its own tasks on its own split, mean over clients, then over seeds:
    # A seed 0 ((0.8 + 0.6) / 2 + (0.4 + 0.6) / 2) / 2 = 0.6, seed 1 (0.4 + 0.9) / 2 = 0.65
    assert a["local_acc"] == pytest.approx(0.625)
    assert a["local_acc_std"] == pytest.approx(0.05 / S2)
    assert _row(board, B)["local_acc"] == pytest.approx((0.7 + 0.8) / 2)
    assert board.attrs["n_seeds"] == {A: 2, B: 2, C: 1}


def test_std_over_seeds(board):
    a, b = _row(board, A), _row(board, B)
    assert a["acc_vqa_std"] == pytest.approx(0.1 / S2)
    assert a["mean_acc_std"] == pytest.approx(0.1 / S2)
    assert b["acc_vqa_std"] == pytest.approx(0.0, abs=1e-12)
    assert b["acc_ref_std"] == pytest.approx(0.2 / S2)
    assert a["worst_client_acc_std"] == pytest.approx(0.1 / S2)
    assert a["params_trainable_std"] == 0.0
    assert np.isnan(_row(board, C)["mean_acc_std"])


def test_communication_and_compute(board):
    a = _row(board, A)
    # seed 0: rounds send 2 MB and 4 MB up (2 clients) -> 3 MB/round; seed 1 twice that -> 6.
    assert a["up_mb_per_round"] == pytest.approx(4.5)
    assert a["up_mb_per_round_std"] == pytest.approx(3 / S2)
    assert a["down_mb_per_round"] == pytest.approx(9.0)
    # seed 0: (2 + 4) up + (4 + 8) down = 18 MB; seed 1: 36 MB.
    assert a["total_mb"] == pytest.approx(27.0)
    assert a["total_mb_std"] == pytest.approx(18 / S2)
    assert a["compute_s"] == pytest.approx(6.0)  # 4 train rows x 1.5 s
    assert a["device"] == f"cpu,{DEVICE}"
    assert _row(board, B)["device"] == DEVICE
    assert (_row(board, B)[["params_trainable", "params_shared", "params_local"]] == [3000, 2000, 1000]).all()


def test_majority_row(board):
    maj = _row(board, "majority")
    # Seed 0 vqa 0.5, seed 1 vqa 0.3 (written by every label's run); the incomplete run's 0.99 is ignored.
    assert maj["acc_vqa"] == pytest.approx(0.4)
    assert maj["acc_ref"] == pytest.approx(0.25)
    assert maj["acc_vqa_std"] == pytest.approx(0.2 / S2)
    # mean over tasks per seed (0.375, 0.275), then over seeds
    assert maj["mean_acc"] == pytest.approx(0.325)
    assert maj["mean_acc_std"] == pytest.approx(0.1 / S2)
    assert maj[["local_acc", "worst_client_acc", "total_mb", "params_trainable", "mean_acc_lo"]].isna().all()


def test_attrs(board):
    assert board.attrs["synthetic"] is True
    assert board.attrs["synthetic_suites"] == ["scenes"]
    assert board.attrs["protocols"] == {"quick": ["abc123"]}
    assert board.attrs["timers"] == ["cuda_events"]


def test_no_completed_run_and_duplicate_seed_raise():
    rows = _run(A, 0, glob={"vqa": 1, "ref": 1}, clients={}, up=1, down=1, params=(1, 1, 1), completed=False)
    with pytest.raises(ValueError, match="no completed runs"):
        build_leaderboard(pd.DataFrame(rows))
    twice = _records() + [
        dict(r, run_id="again")
        for r in _run(B, 0, glob={"vqa": 1, "ref": 1}, clients={}, up=1, down=1, params=(1, 1, 1))
    ]
    with pytest.raises(ValueError, match=r"several completed runs for .*seed 0"):
        build_leaderboard(pd.DataFrame(twice))


def test_render_table_and_markdown(board):
    table = render(board, "table")
    # accuracies: mean [t-interval over 2 seeds]: 0.5, 0.6 -> 0.55 ± t(1, 0.975) * 0.0707 / √2 = ± 0.635
    assert f"│ {B} │ 0.800 [-0.471, 2.071] │" in table  # label brackets are not taken for rich markup
    assert "0.650 [0.015, 1.285]" in table and "SYNTHETIC" in table and "…" not in table
    md = render(board, "markdown")
    lines = md.splitlines()
    assert lines[0].startswith("| method | acc_ref | acc_vqa | mean_acc |")
    # other figures: mean ± std over seeds; no convergence flag without a late eval round
    row = (
        f"| {A} | 0.550 [-0.085, 1.185] | 0.750 [0.115, 1.385] | 0.650 [0.015, 1.285] | 0.625 ± 0.035 | 0.450 ± 0.071 |"
    )
    assert row in md
    assert "| 3,000 | 2,000 | 1,000 |" in md  # params: no "± 0" for counts that do not vary
    assert f"| {C} | 0.500 | 0.500 | 0.500 | 0.500 |" in md  # one seed: mean only
    assert "| majority | 0.250 ± 0.000 | 0.400 ± 0.141 | 0.325 ± 0.071 |  |" in md
    assert "| 0.450 ± 0.071 |  |  | n/a | 4.500 ± 2.121 |" in md  # converged: n/a without an interval
    assert "SYNTHETIC" in md and "cuda_events" in md and "abc123" in md


def test_render_csv_round_trips(board):
    back = pd.read_csv(io.StringIO(render(board, "csv")))
    pd.testing.assert_frame_equal(back, board, check_dtype=False)


def test_render_unknown_format(board):
    with pytest.raises(ValueError, match=r"'html'.*table, markdown, csv"):
        render(board, "html")


def test_append_is_whole_lines_and_reader_skips_partial_tail(tmp_path):
    path = tmp_path / "runs" / "r1" / "records.jsonl"
    append_records(path, [{"run_id": "r1", "kind": "run", "x": np.int64(3), "y": np.float32(0.5), "a": np.arange(2)}])
    append_records(path, [{"run_id": "r1", "kind": "eval", "x": 4}, {"run_id": "r1", "kind": "eval", "x": 5}])
    assert [json.loads(line)["x"] for line in path.read_text().splitlines()] == [3, 4, 5]
    with open(path, "a") as f:
        f.write('{"run_id": "r1", "kind": "eval", "x"')  # a crash mid-write
    assert read_records(tmp_path)["x"].tolist() == [3, 4, 5]
    append_records(path, [{"run_id": "r1", "kind": "eval", "x": 6}])  # the next writer closes the torn line first
    with pytest.warns(RuntimeWarning, match="torn"):
        df = read_records(tmp_path)
    assert df["x"].tolist() == [3, 4, 5, 6]
    assert df.loc[0, "a"] == [0, 1]


def test_read_records_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        read_records(tmp_path)
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        append_records(tmp_path / "x.jsonl", [{"v": object()}])
    assert not (tmp_path / "x.jsonl").exists()


def test_read_back_builds_same_board(tmp_path, board):
    rows = _records()
    for run_id in dict.fromkeys(r["run_id"] for r in rows):
        append_records(tmp_path / "runs" / run_id / "records.jsonl", [r for r in rows if r["run_id"] == run_id])
    again = build_leaderboard(read_records(tmp_path))
    pd.testing.assert_frame_equal(again, board)


def test_plot_files(tmp_path):
    paths = plot(pd.DataFrame(_records()), tmp_path / "plots")
    assert [p.name for p in paths] == ["acc_vs_comm.png", "acc_per_round.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
    again = plot(pd.DataFrame(_records()), tmp_path / "again")  # the same records: the same bytes
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]
    assert not list((tmp_path / "plots").glob("*.tmp"))


def test_reporting_imports_no_heavy_library():
    """Reading records into tables needs neither matplotlib, scipy.stats nor torch: they load when a
    plot is drawn or an interval computed, so `fedbench leaderboard` and the CLI start fast."""
    import subprocess
    import sys

    names = ("board", "text", "terminal_table", "compare", "sweep", "statistics", "plot_layout", "plots", "html")
    modules = [f"fedbench.reporting.{m}" for m in names]
    code = (
        f"import sys, fedbench.reporting, {', '.join(modules)}; "
        "print([m for m in ('torch', 'matplotlib', 'scipy.stats', 'scipy.special') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_p_and_ttp_average_own_tasks_and_all_tasks_per_client():
    base = _common("r", "m")
    rows = [dict(base, kind="run", completed=True, params_trainable=1, params_shared=1, params_local=0)]
    rows.append(dict(base, kind="train", round=0, client=0, up_bytes=1, down_bytes=1, compute_s=1.0, timer="t"))
    # client 0 holds ref (0.8) and sees vqa at 0.2; client 1 holds vqa (0.6) and sees ref at 0.0
    scores = {(0, "ref"): (0.8, True), (0, "vqa"): (0.2, False), (1, "ref"): (0.0, False), (1, "vqa"): (0.6, True)}
    for (client, task), (value, held) in scores.items():
        rows.append(
            dict(base, kind="eval", round=0, scope="client_global", client=client, task=task, value=value, held=held)
        )
        if held:
            rows.append(dict(base, kind="eval", round=0, scope="client", client=client, task=task, value=value))
            rows.append(dict(base, kind="eval", round=0, scope="global", client=-1, task=task, value=value))
    board = build_leaderboard(pd.DataFrame(rows)).set_index("method")
    assert board.loc["m", "p_acc"] == pytest.approx((0.8 + 0.6) / 2)
    assert board.loc["m", "ttp_acc"] == pytest.approx(((0.8 + 0.2) / 2 + (0.0 + 0.6) / 2) / 2)


def test_usage_table_is_last_round_mean_and_std_over_seeds():
    """Two seeds of a routed label: the last round's weights, averaged over seeds (hand-computed);
    routing entropy and mutual information per client, mean over clients, then over seeds."""
    rows = []
    last = {
        0: {("vqa", "e0"): 0.2, ("vqa", "e1"): 0.8, ("ref", "e0"): 0.6, ("ref", "e1"): 0.4},
        1: {("vqa", "e0"): 0.4, ("vqa", "e1"): 0.6, ("ref", "e0"): 0.6, ("ref", "e1"): 0.4},
    }
    routing = {0: [(0.2, 0.1), (0.4, 0.3)], 1: [(0.5, 0.0), (0.5, 0.2)]}  # per client (entropy, MI)
    for seed, cells in last.items():
        base = _common(f"r{seed}", "m", seed)
        rows.append(dict(base, kind="run", completed=True, params_trainable=1, params_shared=1, params_local=0))
        for (task, expert), value in cells.items():
            rows.append(dict(base, kind="usage", round=0, task=task, expert=expert, value=0.5))  # not the last
            rows.append(dict(base, kind="usage", round=4, task=task, expert=expert, value=value))
        for client, (entropy, mi) in enumerate(routing[seed]):
            rows.append(dict(base, kind="routing", round=0, client=client, entropy=9.0, mutual_info=9.0))
            rows.append(dict(base, kind="routing", round=4, client=client, entropy=entropy, mutual_info=mi))
    base = dict(rows[0], run_id="plain", label="plain", seed=0)  # a method without a router: no usage rows
    rows.append(base)
    usage = build_usage(pd.DataFrame(rows)).set_index(["method", "task"])
    assert list(usage.index) == [("m", "ref"), ("m", "vqa")]
    assert usage.loc[("m", "vqa"), "e0"] == pytest.approx(0.3)
    assert usage.loc[("m", "vqa"), "e1"] == pytest.approx(0.7)
    assert usage.loc[("m", "vqa"), "e0_std"] == pytest.approx(0.2 / S2)
    assert usage.loc[("m", "ref"), "e0_std"] == pytest.approx(0.0)
    # seed 0: entropy (0.2 + 0.4) / 2 = 0.3, MI 0.2; seed 1: 0.5 and 0.1
    assert usage.loc[("m", "vqa"), "entropy"] == usage.loc[("m", "ref"), "entropy"] == pytest.approx(0.4)
    assert usage.loc[("m", "vqa"), "entropy_std"] == pytest.approx(0.2 / S2)
    assert usage.loc[("m", "vqa"), "mutual_info"] == pytest.approx(0.15)
    assert list(usage.columns) == [
        "e0",
        "e1",
        "entropy",
        "mutual_info",
        "e0_std",
        "e1_std",
        "entropy_std",
        "mutual_info_std",
    ]
    text = render(build_usage(pd.DataFrame(rows)), "markdown")
    assert "| m | ref | 0.600 ± 0.000 | 0.400 ± 0.000 | 0.400 ± 0.141 | 0.150 ± 0.071 |" in text
    assert "| m | vqa | 0.300 ± 0.141 | 0.700 ± 0.141 |  |  |" in text  # per-method figures shown once
    assert "routing weight" in text and "I(task; expert)" in text
    assert build_usage(pd.DataFrame([base])).empty


# Per-example scores: intervals, paired differences, the convergence flag and the reference rows.

REF = np.tile([0.0, 0.5, 0.25, 0.75], 10)  # 40 global-test examples, mean 0.375
FLIP = np.tile([0.25, 0.0, 0.0, 0.0], 10)  # one example in four gains 0.25: mean difference 1/16


def _scored_run(label, seed, scores, *, rounds=5, early=None, federated=None):
    """A completed run whose last eval round scores the global-test examples of vqa as ``scores``
    and of ref as ``scores`` reversed; ``early``: its global accuracy at round 3 (after 4 <= 0.8 x 5
    rounds of training); ``federated``: the run record's flag (absent when None)."""
    common = _common(f"{label}-s{seed}", label, seed)
    run = dict(common, kind="run", completed=True, rounds=rounds, params_trainable=1, params_shared=1, params_local=0)
    rows = [run if federated is None else dict(run, federated=federated)]
    for rnd in range(rounds):
        rows.append(dict(common, kind="train", round=rnd, client=0, up_bytes=10**6, down_bytes=10**6, compute_s=1.0))
    for task, v in (("vqa", scores), ("ref", scores[::-1])):
        glob = dict(common, kind="eval", scope="global", client=-1, task=task)
        rows.append(dict(glob, round=rounds - 1, value=float(np.mean(v)), per_example=v.tolist()))
        if early is not None:
            rows.append(dict(glob, round=3, value=early))
    return rows


def _paired_records() -> list[dict]:
    """ref on seeds 0-3; flip (ref + FLIP) and const (ref + 0.25) on seeds 0-2 only."""
    rows = []
    for seed in range(3):
        ref = np.roll(REF, seed)
        rows += _scored_run("ref", seed, ref)
        rows += _scored_run("flip", seed, ref + np.roll(FLIP, seed))
        rows += _scored_run("const", seed, ref + 0.25)
    return rows + _scored_run("ref", 3, np.zeros(40))  # no partner: must not count in a difference


def _write(tmp_path, rows):
    for run_id in dict.fromkeys(r["run_id"] for r in rows):
        append_records(tmp_path / "runs" / run_id / "records.jsonl", [r for r in rows if r["run_id"] == run_id])


def test_every_row_gets_the_t_interval_of_its_per_seed_figures():
    board = build_leaderboard(pd.DataFrame(_paired_records())).set_index("method")
    assert board.loc["ref", "mean_acc"] == pytest.approx(0.375 * 3 / 4)  # seed 3 scores 0
    # ref's per-seed mean_acc: 0.375 on seeds 0-2, 0 on seed 3 (the seed is the unit, not the example)
    half = 3.182446305284263 * np.std([0.375, 0.375, 0.375, 0.0], ddof=1) / 2  # t(3, 0.975) s / √4
    for col in ("acc_vqa", "acc_ref", "mean_acc"):
        assert board.loc["ref", [f"{col}_lo", f"{col}_hi"]].tolist() == pytest.approx([0.28125 - half, 0.28125 + half])
    # const scores 0.625 on every seed: no seed-to-seed spread, a zero-width interval
    assert board.loc["const", ["mean_acc", "mean_acc_lo", "mean_acc_hi"]].tolist() == pytest.approx([0.625] * 3)
    md = render(build_leaderboard(pd.DataFrame(_paired_records())), "markdown")
    lo, hi = board.loc["ref", ["mean_acc_lo", "mean_acc_hi"]]
    assert f"| 0.281 [{lo:.3f}, {hi:.3f}] |" in md and "t-interval over seeds" in md


def test_versus_is_the_paired_difference_on_shared_seeds():
    versus = build_versus(pd.DataFrame(_paired_records()), "ref")
    assert list(versus["method"]) == ["const", "flip"]  # largest mean_acc difference first
    diff = versus.set_index("method")
    assert (diff["seeds"] == 3).all()  # ref's seed 3 has no partner
    for col in ("acc_ref", "acc_vqa", "mean_acc"):
        assert tuple(diff.loc["const", [col, f"{col}_lo", f"{col}_hi"]]) == (0.25, 0.25, 0.25)
        # flip gains 1/16 on every seed: the interval over seeds is that difference
        assert diff.loc["flip", [col, f"{col}_lo", f"{col}_hi"]].tolist() == pytest.approx([1 / 16] * 3)
    assert diff["p_holm"].tolist() == pytest.approx([0.0, 0.0], abs=1e-12) and versus.attrs["comparisons"] == 2
    md = render(versus, "markdown")
    assert "| method | seeds | acc_ref | acc_vqa | mean_acc |" in md
    assert "| const | 3 | +0.250 [+0.250, +0.250] * | +0.250 [+0.250, +0.250] * | +0.250 [+0.250, +0.250] *† |" in md
    assert "row − ref" in md and "excludes 0" in md and "only the seeds both rows ran count" in md
    assert "Holm's adjustment for the 2 mean_acc comparisons" in md
    header = render(versus, "csv").splitlines()[0]
    assert header == (
        "method,seeds,acc_ref,acc_ref_lo,acc_ref_hi,acc_vqa,acc_vqa_lo,acc_vqa_hi,mean_acc,mean_acc_lo,mean_acc_hi,"
        "p,p_holm"
    )
    with pytest.raises(UnknownRowError, match=r"row 'nope' is not a completed row.*: const, flip, ref"):
        build_versus(pd.DataFrame(_paired_records()), "nope")


def test_steps_are_each_row_minus_the_row_above():
    """Order ref -> const -> flip: const − ref = +0.25 everywhere; flip − const = FLIP − 0.25 (hand-computed)."""
    steps = build_steps(pd.DataFrame(_paired_records()), ["ref", "missing", "const", "flip"]).set_index("method")
    assert list(steps.index) == ["const", "flip"] and list(steps["above"]) == ["ref", "const"]  # "missing" skipped
    assert tuple(steps.loc["const", ["mean_acc", "mean_acc_lo", "mean_acc_hi"]]) == (0.25, 0.25, 0.25)
    assert steps.loc["flip", "mean_acc"] == pytest.approx(1 / 16 - 0.25)
    assert steps.loc["flip", ["mean_acc_lo", "mean_acc_hi"]].tolist() == pytest.approx([1 / 16 - 0.25] * 2)
    assert steps.attrs["comparisons"] == 2
    assert "row − the row above" in render(build_steps(pd.DataFrame(_paired_records()), ["ref", "const"]), "markdown")
    with pytest.raises(UnknownRowError, match="two completed rows"):
        build_steps(pd.DataFrame(_paired_records()), ["ref"])


def test_rising_flag_and_reference_rows_without_bytes():
    rows = []
    for seed in range(2):
        scores = REF + 0.05 * seed  # mean 0.375, then 0.425, on both tasks: half-width 12.7 * 0.035 / √2
        rows += _scored_run("flat", seed, scores, early=0.365)  # gained 0.01 after round 4 of 5
        rows += _scored_run("rising", seed, scores, early=0.0)  # gained 0.375
        rows += _scored_run("final-only", seed, scores)  # evaluated only at the end: no evidence
        rows += _scored_run("centralized", seed, scores, early=0.375, federated=False)
    board = build_leaderboard(pd.DataFrame(rows)).set_index("method")
    half = (board["mean_acc_hi"] - board["mean_acc_lo"]) / 2
    assert (0.01 < half).all() and (half < 0.4).all()  # both gains are on either side of the half-width
    flags = board["converged"]
    assert flags[["flat", "rising", "centralized"]].tolist() == ["yes", "rising", "yes"]
    assert pd.isna(flags["final-only"])
    assert board["federated"].to_dict() == {"centralized": False, "final-only": True, "flat": True, "rising": True}
    assert board.loc["centralized", ["up_mb_per_round", "down_mb_per_round", "total_mb"]].isna().all()
    assert board.loc["flat", "total_mb"] == pytest.approx(10.0)
    md = render(build_leaderboard(pd.DataFrame(rows)), "markdown")
    line = next(line for line in md.splitlines() if line.startswith("| centralized |"))
    assert "| yes | n/a | n/a | n/a | 5.0 ± 0.0 |" in line  # not federated: no bytes
    final_only = next(line for line in md.splitlines() if line.startswith("| final-only |"))
    assert "| n/a | 1.000 ± 0.000 | 1.000 ± 0.000 | 10.000 ± 0.000 |" in final_only  # no eval by round 4
    assert "Bytes n/a" in md


def test_plot_draws_rows_without_bytes_or_intervals(tmp_path):
    """`fedbench run` plots whatever completed: rows that are not federated only (no bytes, so no
    Pareto front), and a dense cluster of one-seed rows (a zoomed panel, no intervals to bound it)."""
    centralized = pd.DataFrame(_scored_run("centralized", 0, REF, federated=False))
    assert [p.name for p in plot(centralized, tmp_path / "c")] == ["acc_vs_comm.png", "acc_per_round.png"]
    rows = [r for i in range(5) for r in _scored_run(f"near{i}", 0, REF + 0.01 * i)]
    rows += [dict(r, up_bytes=10**7) if r["kind"] == "train" else r for r in _scored_run("far", 0, REF)]
    board = build_leaderboard(pd.DataFrame(rows)).set_index("method")
    assert board["mean_acc_lo"].isna().all() and board.loc["far", "total_mb"] > 5 * board.loc["near0", "total_mb"]
    paths = plot(pd.DataFrame(rows), tmp_path / "one-seed")
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)


def test_versus_command_and_unknown_row(tmp_path):
    from typer.testing import CliRunner

    from fedbench.cli import app

    _write(tmp_path, _paired_records())
    runner = CliRunner()
    bad = runner.invoke(app, ["leaderboard", "--results", str(tmp_path), "--versus", "nope"])
    out = bad.output.strip()
    assert bad.exit_code == 2 and "Traceback" not in out and "\n" not in out, out
    assert out == "error: row 'nope' is not a completed row of these records; rows: const, flip, ref"
    both = runner.invoke(app, ["leaderboard", "--results", str(tmp_path), "--versus", "ref", "--usage"])
    assert both.exit_code == 2 and "choose one" in both.output
    md = runner.invoke(app, ["leaderboard", "--results", str(tmp_path), "--versus", "ref", "--format", "markdown"])
    assert md.exit_code == 0, md.output
    assert "| flip | 3 | +0.062 [" in md.output and "+0.250 [+0.250, +0.250] *" in md.output
    no_order = runner.invoke(app, ["leaderboard", "--results", str(tmp_path), "--steps"])
    assert no_order.exit_code == 2 and "protocol.toml" in no_order.output and "Traceback" not in no_order.output
    (tmp_path / "protocol.toml").write_text('methods = ["ref", "const"]\n')
    steps = runner.invoke(app, ["leaderboard", "--results", str(tmp_path), "--steps", "--format", "csv"])
    assert steps.exit_code == 0 and steps.output.splitlines()[1].startswith("const,ref,3,0.25,0.25,0.25")
    figure = runner.invoke(
        app, ["leaderboard", "--results", str(tmp_path), "--versus", "ref", "--plots", str(tmp_path / "p")]
    )
    assert figure.exit_code == 0, figure.output
    assert (tmp_path / "p" / "versus_ref.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_versus_draws_each_rows_paired_gain_in_the_protocols_order():
    """One interval per row other than the reference, in the given order (top first), the gain and its
    marks beside it, the seed count in the row's label."""
    from fedbench.reporting.plots import plot_versus

    table = build_versus(pd.DataFrame(_paired_records()), "ref")
    fig = plot_versus(table, order=["const", "flip"])
    ax = fig.axes[0]
    height = {t.get_text(): t.get_position()[1] for t in ax.get_yticklabels()}
    assert list(height) == ["const (3 seeds)", "flip (3 seeds)"]
    assert height["const (3 seeds)"] > height["flip (3 seeds)"]
    notes = [t.get_text() for t in ax.texts]
    assert "+0.250 [+0.250, +0.250] *" in notes[0] and notes[1].startswith("+0.062 [")
    assert "over ref" in fig._suptitle.get_text() and "2 comparisons" in fig._suptitle.get_text()


def test_a_run_records_per_example_scores_and_routing_statistics(tiny_prep, tmp_path):
    from fedbench.config.protocol import MethodEntry
    from fedbench.runtime.server import Run
    from fedbench.utils.records import read_jsonl

    run = Run(tiny_prep, MethodEntry("pfedmoe"), tmp_path, backend=in_process)
    run.execute()
    rows = read_jsonl(run.records_path)
    glob = [r for r in rows if r["kind"] == "eval" and r["scope"] == "global"]
    assert glob
    for r in glob:
        assert len(r["per_example"]) == r["n"]
        assert np.mean(r["per_example"]) == pytest.approx(r["value"], abs=1e-6)
    routing = [r for r in rows if r["kind"] == "routing"]
    clients = range(len(tiny_prep.plans))
    assert sorted((r["round"], r["client"]) for r in routing) == sorted(
        {(r["round"], c) for r in glob for c in clients}
    )  # every eval round, every client
    n_tasks, n_experts = len(tiny_prep.store.task_names), 2  # pFedMoE: global and local expert
    for r in routing:
        assert 0 <= r["entropy"] <= math.log(n_experts) + 1e-9
        assert -1e-9 <= r["mutual_info"] <= math.log(min(n_tasks, n_experts)) + 1e-9
    board = build_leaderboard(read_records(tmp_path)).iloc[0]
    assert 0 <= board["mean_acc"] <= 1 and np.isnan(board["mean_acc_lo"])  # one seed: no interval
