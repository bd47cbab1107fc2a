"""Tables -> text: the cells, the footnotes, and :func:`render` to a rich text table, markdown or CSV.

Every table of :mod:`fedbench.reporting.board` (leaderboard, versus, steps, usage) renders here; the
terminal leaderboard (:mod:`fedbench.reporting.terminal_table`) and the HTML report
(:mod:`fedbench.reporting.html`) take their cells (:func:`text_cell`, :func:`format_cell`) and notes
(:func:`footnotes`) from here, so every output says the same thing.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

from fedbench.reporting.board import (
    BYTES_COLS,
    COUNT_COLS,
    LATE,
    PER_METHOD,
    TIME_COLS,
    main_columns,
)
from fedbench.reporting.statistics import INTERVAL, LEVEL, PAIRED_INTERVAL

FORMATS = ("table", "markdown", "csv")
COMPUTE_NOTE = (
    "compute_gflop: FLOPs of the clients' local updates (matrix products, as FlopCounterMode counts), "
    "the same on every machine: compare it across machines, compute_s only on one."
)


def sampling_note(attrs: dict) -> str | None:
    """The note a leaderboard carries when some row's intermediate evaluations scored a sample of its
    clients (what ``converged`` and the per-round curves read); None when every evaluation scored all."""
    sampling: dict[str, str] = attrs.get("eval_sampling", {})
    if not sampling:
        return None
    sizes = set(sampling.values())
    which = f"{sizes.pop()} clients" if len(sizes) == 1 else ", ".join(f"{k}: {v}" for k, v in sampling.items())
    return (
        f"Evaluation: intermediate rounds (converged, per-round curves) scored a seeded sample of {which} "
        "per round (eval.clients); the last round scored all clients, so every acc column is over all of them."
    )


def text_cell(board: pd.DataFrame, row: pd.Series, col: str) -> str | None:
    """The cell where there is no number to format (every renderer's rule): a failed row shows
    ``failed`` under mean_acc and nothing else; n/a for the convergence flag without evidence and for
    bytes of a non-federated row; text columns as they are; blank for a missing figure. None: a number."""
    mean = row[col]
    if isinstance(row.get("failed"), str) and col not in ("method", "failed"):  # a row that raised: no figures
        return "failed" if col == "mean_acc" else ""
    if col == "converged" and pd.isna(mean):
        return "n/a"
    if not pd.api.types.is_numeric_dtype(board[col]):
        return "" if pd.isna(mean) else str(mean)
    if pd.isna(mean):
        return "n/a" if col in BYTES_COLS and not row.get("federated", True) else ""
    return None


def format_cell(board: pd.DataFrame, row: pd.Series, col: str) -> str:
    """Cell text: "mean [lo, hi]" where a 95% interval exists (signed, with * when it excludes 0, in
    a versus table), else "mean ± std"; just the mean for one seed, no ± for counts that do not
    vary, and n/a for the convergence flag without evidence and for bytes of a non-federated row."""
    text = text_cell(board, row, col)
    if text is not None:
        return text
    mean = row[col]
    spec = ",.0f" if col in COUNT_COLS else ".1f" if col in TIME_COLS else ".3f"
    lo, hi = row.get(f"{col}_lo", np.nan), row.get(f"{col}_hi", np.nan)
    if board.attrs.get("what") == "versus" and pd.notna(lo):
        return gain_text(mean, lo, hi, row.get("p_holm", np.nan) if col == "mean_acc" else np.nan)
    if pd.notna(lo):
        return f"{format(mean, spec)} [{format(lo, spec)}, {format(hi, spec)}]"
    std = row.get(f"{col}_std", np.nan)
    if pd.isna(std) or (col in COUNT_COLS and std == 0):
        return format(mean, spec)
    return f"{format(mean, spec)} ± {format(std, spec)}"


def gain_text(mean: float, lo: float, hi: float, p_holm: float = np.nan) -> str:
    """A difference's cell: ``+0.012 [+0.002, +0.022] *†``: * when its 95% interval excludes 0, †
    when it also survives Holm's adjustment over its table's comparisons (``p_holm`` < 0.05)."""
    if pd.isna(lo):
        return f"{mean:+.3f}"
    star = " *" if lo > 0 or hi < 0 else ""
    dagger = "†" if star and p_holm < 1 - LEVEL else ""
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]{star}{dagger}"


def marks_note(comparisons: int) -> str:
    """What * and † mean, and over how many comparisons the Holm adjustment runs."""
    return (
        "* = the 95% interval excludes 0 (unadjusted); † = the mean_acc difference also survives Holm's "
        f"adjustment for the {comparisons} mean_acc comparisons of this table (family-wise 5%)"
    )


def footnotes(board: pd.DataFrame) -> list[str]:
    """The notes under a table (what its cells mean, seeds, data, timer, protocol), one string each."""
    attrs = board.attrs
    what = attrs.get("what")
    seeds = ", ".join(f"{label}={n}" for label, n in attrs.get("n_seeds", {}).items())
    if what == "usage":
        notes = [
            "Mean routing weight per task family (row) and expert (column) on the global test set; mean ± std "
            f"over seeds ({seeds}); last eval round of completed runs.",
        ]
        if "entropy" in board:
            notes.append(
                "Per method (on its first row): entropy = mean per-row routing entropy, mutual_info = "
                "I(task; expert) over all tasks, in nats, each client on the global test set, mean over clients."
            )
    elif what == "versus":
        notes = [
            f"Paired difference row − {attrs['reference']} [{PAIRED_INTERVAL}]; {marks_note(attrs['comparisons'])}; "
            "only the seeds both rows ran count (seeds; no interval with one); last eval round of completed runs.",
        ]
    else:
        notes = [f"Higher acc is better; ± = std over seeds ({seeds}); last eval round of completed runs."]
        if board.filter(regex="_lo$").notna().any().any():
            notes.append(
                f"acc_* and mean_acc: mean [{INTERVAL}; none with one seed]. converged: rising = mean_acc gained "
                f"more than the interval's half-width after {LATE:g}·R of R rounds (n/a: no eval by then, or one seed)."
            )
        if "federated" in board and board["federated"].eq(False).any():
            notes.append("Bytes n/a: a reference row that is not federated (nothing is sent).")
        if "failed" in board:
            notes.append("failed: a row that raised (the first line of its error); its other rows ran.")
        if board.columns.str.startswith("parse_fail_").any():
            notes.append(
                "parse_fail_<task>: share of the answers the VLM generated on the global test set that the task "
                "family could not parse (each scored 0), mean over seeds."
            )
        sampled = sampling_note(attrs)
        if sampled:
            notes.append(sampled)
    if attrs.get("synthetic"):
        suites = ", ".join(attrs.get("synthetic_suites", []))
        notes.append(f"Data: SYNTHETIC (procedurally generated suite: {suites}), not a real-task result.")
    protocols = "; ".join(f"{name} ({', '.join(h)})" for name, h in attrs.get("protocols", {}).items())
    notes.append(f"Timer: {', '.join(attrs.get('timers', [])) or 'unknown'}. Protocol hash: {protocols}.")
    notes.append(COMPUTE_NOTE)
    return notes


def render(board: pd.DataFrame, fmt: str) -> str:
    """A leaderboard (or usage or versus table) as a rich text table, a GitHub markdown table, or CSV
    (stds and interval ends in own columns)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown leaderboard format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if fmt == "csv":
        return board.to_csv(index=False)
    cols = main_columns(board)
    cells = [[format_cell(board, row, c) for c in cols] for _, row in board.iterrows()]
    if board.attrs.get("what") == "usage":  # one figure per method: shown on its first row only
        blank = [i for i, c in enumerate(cols) if c in PER_METHOD]
        for row, again in zip(cells, board["method"].eq(board["method"].shift()), strict=True):
            for i in blank if again else ():
                row[i] = ""
    numeric = [pd.api.types.is_numeric_dtype(board[c]) for c in cols]
    notes = footnotes(board)
    if fmt == "markdown":
        lines = [
            "| " + " | ".join(cols) + " |",
            "|" + "|".join("---:" if num else "---" for num in numeric) + "|",
            *("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells),
            "",
            *(f"_{note}_  " for note in notes),
        ]
        return "\n".join(lines) + "\n"
    what = board.attrs.get("what")
    title = "fedbench " + {"usage": "expert usage", "versus": f"versus {board.attrs.get('reference')}"}.get(
        what, "leaderboard"
    )
    title += " (SYNTHETIC data)" if board.attrs.get("synthetic") else ""
    table = Table(title=title, caption=Text("\n".join(notes)))  # Text: labels hold [..], not markup
    for col, num in zip(cols, numeric, strict=True):
        table.add_column(col, justify="right" if num else "left", no_wrap=True)
    for row in cells:
        table.add_row(*map(Text, row))
    width = sum(max(len(c), *(len(r[i]) for r in cells)) + 3 for i, c in enumerate(cols)) + 4
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(table)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines()) + "\n"
