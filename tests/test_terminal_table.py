"""The terminal leaderboard fits the width it is given, keeps the first columns, and keeps long row
labels (an ablation ladder) readable; markdown and CSV keep every column."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.reporting.board import build_leaderboard, main_columns
from fedbench.reporting.terminal_table import (
    UnknownColumnError,
    abbreviate,
    key_abbreviations,
    render_terminal,
    select_columns,
    wrap_label,
)
from fedbench.utils.records import append_records

LADDER = [
    "pilot-ctmoa",
    "mmrouter-moa[ocr_expert=false,router_inputs=image,router_scope=local]",
    "mmrouter-moa[ocr_expert=false,router_inputs=image+text+task+ocr]",
    "mmrouter-moa[ocr_expert=false,router_inputs=image,router_scope=local,router_view=prompt]",
    "mmrouter-moa[routing=oracle]",
    "mmrouter-moa",
    "fedavg-lora",
    "centralized",
]
TASKS = ("classification", "grounding", "ocr_vqa", "vqa")


def _records() -> list[dict]:
    rows = []
    for i, label in enumerate(LADDER):
        for seed in (0, 1):
            common = dict(
                run_id=f"{label}-{seed}",
                label=label,
                method=label.split("[")[0],
                seed=seed,
                protocol="p",
                protocol_hash="abc",
                suite="scenes",
                synthetic=True,
                device="cpu",
            )
            federated = label != "centralized"
            for rnd in (0, 1):
                for client in (0, 1):
                    rows.append(
                        dict(
                            common,
                            kind="train",
                            round=rnd,
                            client=client,
                            up_bytes=1_000_000 * federated,
                            down_bytes=1_100_000 * federated,
                            compute_s=12.5,
                            timer="process_cpu",
                        )
                    )
            for t, task in enumerate(TASKS):
                correct = [(k * (i + 2) + t + seed) % 5 < 2 + (i + t) % 3 for k in range(30)]
                rows.append(
                    dict(
                        common,
                        kind="eval",
                        scope="global",
                        round=1,
                        task=task,
                        value=sum(correct) / 30,
                        per_example=[float(c) for c in correct],
                    )
                )
                for client in (0, 1):
                    rows.append(dict(common, kind="eval", scope="client", round=1, client=client, task=task, value=0.4))
            rows.append(
                dict(
                    common,
                    kind="run",
                    completed=True,
                    federated=federated,
                    rounds=2,
                    params_trainable=245_475,
                    params_shared=226_595,
                    params_local=18_880,
                )
            )
            rows += [dict(common, kind="majority", task=t, value=0.1) for t in TASKS]
    return rows


@pytest.fixture(scope="module")
def board() -> pd.DataFrame:
    return build_leaderboard(pd.DataFrame(_records()))


@pytest.mark.parametrize("width", [60, 80, 100, 120, 160, 240])
def test_the_table_fits_the_width_it_is_given(board, width):
    text = render_terminal(board, width)
    assert max(len(line) for line in text.splitlines()) <= width, text
    keys = key_abbreviations(LADDER) if "Row options:" in text else {}
    assert _labels(text) == [*(abbreviate(m, keys) for m in board["method"])]  # every row, whole


def _labels(text: str) -> list[str]:
    """The row labels of a rendered table, their wrapped lines joined back."""
    lines = text.splitlines()
    body = lines[next(i for i, line in enumerate(lines) if line.startswith("─")) + 1 :]
    labels: list[str] = []
    for line in body:
        if line.startswith("Task columns"):
            break
        if line[:1].strip():
            labels.append(line.split()[0])
        elif line[:2] == " " + line[1:2] and line[1:2].strip():  # a continuation line
            labels[-1] += line.split()[0]
    return labels


def test_the_first_columns_fit_100_and_wider_terminals_get_more(board):
    at_100 = render_terminal(board, 100)
    head = " ".join(at_100.splitlines()[1:3])
    for name in ("classif.", "grounding", "ocr_vqa", "vqa", "mean_acc", "local", "up", "down", "compute"):
        assert name in head.split(), name
    assert "[95% CI]" in head and "Tasks: classif. = acc_classification." in at_100
    hidden = lambda text: " ".join(text.split()).partition("Not shown (a wider terminal or --columns): ")[2]  # noqa: E731
    assert "worst_client_acc" in hidden(at_100)
    at_240 = render_terminal(board, 240)
    assert {"worst", "converged", "TTP"} <= set(" ".join(at_240.splitlines()[1:3]).split())
    assert len(hidden(at_240)) < len(hidden(at_100))
    at_80 = render_terminal(board, 80)  # narrower than the first columns: the rightmost go first
    assert "compute_s" in hidden(at_80) and "mean_acc" in at_80.splitlines()[1]
    at_50 = render_terminal(board, 50)  # then the task columns, but never mean_acc
    assert "acc_vqa" in hidden(at_50) and "mean_acc" in at_50.splitlines()[1]


def test_long_labels_are_wrapped_at_their_options_and_abbreviated_with_a_legend(board):
    text = render_terminal(board, 100)
    assert "Row options: oe = ocr_expert, ri = router_inputs, rs = router_scope, rv = router_view." in " ".join(
        text.split()
    )
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("mmrouter-moa[oe=false,"))
    assert lines[start + 1].startswith(" ri=image")  # continuation lines are indented
    wide = render_terminal(board, 400)  # room for the full labels: no abbreviation, one line per row
    assert "Row options" not in wide and LADDER[3] in wide


def test_wrap_and_abbreviate_helpers():
    label = LADDER[3]
    assert wrap_label(label, 30) == [
        "mmrouter-moa[ocr_expert=false,",
        " router_inputs=image,",
        " router_scope=local,",
        " router_view=prompt]",
    ]
    assert wrap_label("mmrouter-moa[ri=image+text+task+ocr]", 16) == [
        "mmrouter-moa[",
        " ri=image+text+",
        " task+ocr]",
    ]
    assert all(len(line) <= 8 for line in wrap_label("averyveryverylongname", 8))
    assert key_abbreviations(["a[router_inputs=x,rank_input=y,ri=z]"]) == {}  # ri clashes: keep the keys
    assert abbreviate(label, {"router_view": "rv"}).endswith("router_scope=local,rv=prompt]")


def test_columns_picks_any_set_and_rejects_unknown_ones(board):
    text = render_terminal(board, 100, ["mean_acc", "total_mb", "params_local"])
    header = " ".join(text.splitlines()[1:3]).split()
    assert {"mean_acc", "total", "params"} <= set(header) and "local" in header and "compute" not in header
    with pytest.raises(UnknownColumnError, match=r"unknown column 'mean'; choose from: method, acc_classification"):
        render_terminal(board, 100, ["mean"])
    csv = select_columns(board, ["total_mb", "mean_acc"])
    assert list(csv.columns[:4]) == ["method", "total_mb", "total_mb_std", "mean_acc"]


def test_leaderboard_command_in_a_narrow_terminal_and_markdown_keeps_every_column(board, tmp_path):
    append_records(tmp_path / "runs" / "x" / "records.jsonl", _records())
    runner = CliRunner()
    table = runner.invoke(app, ["leaderboard", "--results", str(tmp_path)], env={"COLUMNS": "80"})
    assert table.exit_code == 0, table.output
    assert max(len(line) for line in table.output.splitlines()) <= 80
    md = runner.invoke(app, ["leaderboard", "--results", str(tmp_path), "--format", "markdown"])
    assert md.output.splitlines()[0] == "| " + " | ".join(main_columns(board)) + " |"
    picked = runner.invoke(app, ["leaderboard", "--results", str(tmp_path), "--format", "csv", "--columns", "total_mb"])
    assert picked.output.splitlines()[0] == "method,total_mb,total_mb_std,federated"
    bad = runner.invoke(app, ["leaderboard", "--results", str(tmp_path), "--columns", "mean_acc,bytes"])
    assert bad.exit_code == 2 and "unknown column 'bytes'; choose from: method," in " ".join(bad.output.split())
