"""The leaderboard as a terminal table that fits a given width.

A terminal shows the columns a reader needs first (the row, per-task accuracy, ``mean_acc`` with its
95% interval, ``local_acc``, MB per round, compute), then, as the width allows, the others in
:data:`EXTRA` order; what is left out is named under the table. Cells hold means (``mean_acc`` also
its interval); the ± std over seeds and the per-task intervals stay in ``--format markdown|csv``,
which keep every column. Long row labels (an ablation ladder's
``mmrouter-moa[ocr_expert=false,router_inputs=image,router_scope=local]``) are wrapped at their
options and, when they would still not fit, their option keys are abbreviated with a legend.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from fedbench.reporting.board import BYTES_COLS, COUNT_COLS, HIDDEN, LATE, main_columns
from fedbench.reporting.statistics import INTERVAL
from fedbench.reporting.text import COMPUTE_NOTE, sampling_note, text_cell

FIRST = ("mean_acc", "local_acc", "up_mb_per_round", "down_mb_per_round", "compute_s", "compute_gflop")  # after acc_
EXTRA = (
    "worst_client_acc",
    "converged",
    "total_mb",
    "p_acc",
    "ttp_acc",
    "params_shared",
    "params_local",
    "params_trainable",
    "device",
)
# when even the first columns do not fit, these go first (a group at a time), from the right
_DROP_ORDER = (("compute_gflop",), ("compute_s",), ("up_mb_per_round", "down_mb_per_round"), ("local_acc",))
MIN_LABEL = 20  # narrowest row-label column (characters) before columns are dropped
WIDE_LABEL = 50  # extra columns and one-line intervals are added only while labels keep this much
GAP = 1  # characters between two columns
TASK_HEADER = 9  # longer task names are abbreviated in the header (with a legend)
_HEADERS = {
    "method": ("row", ""),
    "mean_acc": ("mean_acc", "[95% CI]"),
    "local_acc": ("local", "acc"),
    "worst_client_acc": ("worst", "client"),
    "p_acc": ("P", "acc"),
    "ttp_acc": ("TTP", "acc"),
    "converged": ("converged", ""),
    "up_mb_per_round": ("up", "MB/rd"),
    "down_mb_per_round": ("down", "MB/rd"),
    "total_mb": ("total", "MB"),
    "compute_s": ("compute", "s"),
    "compute_gflop": ("compute", "GFLOP"),
    "params_trainable": ("params", "trainable"),
    "params_shared": ("params", "shared"),
    "params_local": ("params", "local"),
    "device": ("device", ""),
}


class UnknownColumnError(ValueError):
    """A column asked for by name that the leaderboard does not have."""


# ---------------------------------------------------------------------------------------- row labels


def option_keys(labels: Sequence[str]) -> list[str]:
    """Every option key in the labels (``name[key=value,...]``), in order of first appearance."""
    keys: list[str] = []
    for label in labels:
        for option in _options(label):
            key = option.partition("=")[0]
            if key not in keys:
                keys.append(key)
    return keys


def _options(label: str) -> list[str]:
    match = re.fullmatch(r"([^\[]+)\[(.*)\]", label)
    return match.group(2).split(",") if match else []


def key_abbreviations(labels: Sequence[str]) -> dict[str, str]:
    """Option key -> its initials (``router_inputs`` -> ``ri``) for keys of several words, where the
    initials are unique (no other key, abbreviated or not, reads the same); others keep their name."""
    keys = option_keys(labels)
    short = {k: "".join(part[0] for part in k.split("_") if part) for k in keys if "_" in k}
    clashes = {s for s in short.values() if list(short.values()).count(s) > 1 or s in keys}
    return {k: s for k, s in short.items() if s not in clashes}


def abbreviate(label: str, keys: dict[str, str]) -> str:
    """The label with its option keys shortened by ``keys`` (see :func:`key_abbreviations`)."""
    options = _options(label)
    if not options:
        return label
    name = label.partition("[")[0]
    parts = []
    for option in options:
        key, eq, value = option.partition("=")
        parts.append(keys.get(key, key) + eq + value)
    return f"{name}[{','.join(parts)}]"


def wrap_label(label: str, width: int, indent: str = " ") -> list[str]:
    """Lines of at most ``width`` characters, broken after ``[``, ``,`` and ``+`` (the option
    separators) and, only for a piece longer than a line, anywhere; continuation lines are indented."""
    if len(label) <= width:
        return [label]
    pieces = re.findall(r"[^\[,+]+(?:[\[,+]|$)", label) or [label]
    lines: list[str] = []
    line = ""
    for piece in pieces:
        room = width - (len(indent) if lines else 0)
        if line and len(line) + len(piece) > room:
            lines.append(line)
            line = ""
            room = width - len(indent)
        while len(line) + len(piece) > room:  # a piece longer than a whole line: fold it
            cut = room - len(line)
            lines.append(line + piece[:cut])
            piece, line, room = piece[cut:], "", width - len(indent)
        line += piece
    if line:
        lines.append(line)
    return [lines[0], *(indent + rest for rest in lines[1:])]


# -------------------------------------------------------------------------------------- the table


@dataclass
class _Layout:
    columns: list[str]  # leaderboard columns after "method"
    label_width: int
    inline_ci: bool
    keys: dict[str, str]  # option-key abbreviations used in the labels (empty: full labels)
    hidden: list[str]  # main columns not shown


def task_header(task: str) -> str:
    return task if len(task) <= TASK_HEADER else task[: TASK_HEADER - 2] + "."


def _header(col: str) -> tuple[str, str]:
    if col in _HEADERS:
        return _HEADERS[col]
    if col.startswith("acc_"):
        return task_header(col.removeprefix("acc_")), "acc"
    return col, ""


def _value(board: pd.DataFrame, row: pd.Series, col: str, inline_ci: bool) -> str:
    """A terminal cell: the mean (no ± std); ``mean_acc`` with its interval, on a second line unless
    ``inline_ci``; n/a for bytes of a row that is not federated and for an unsupported convergence flag."""
    text = text_cell(board, row, col)  # a failed row's error is listed under the table
    if text is not None:
        return text
    mean = row[col]
    spec = ",.0f" if col in COUNT_COLS else ".1f" if col in ("compute_s", "compute_gflop", "total_mb") else ".3f"
    text = format(mean, spec)
    lo, hi = row.get(f"{col}_lo"), row.get(f"{col}_hi")
    if col == "mean_acc" and pd.notna(lo) and pd.notna(hi):
        text += (" " if inline_ci else "\n") + f"[{lo:.3f}, {hi:.3f}]"
    return text


def _width(board: pd.DataFrame, col: str, inline_ci: bool) -> int:
    cells = [_value(board, row, col, inline_ci) for _, row in board.iterrows()]
    head = _header(col)
    if col == "mean_acc" and inline_ci:
        head = (f"{head[0]} {head[1]}", "")
    return max(len(line) for text in [*cells, *head] for line in text.split("\n"))


def _layout(board: pd.DataFrame, width: int, columns: Sequence[str] | None) -> _Layout:
    """Which columns, how wide the labels, one- or two-line intervals, abbreviated option keys."""
    main = [c for c in main_columns(board) if c not in ("method", "failed")]  # errors go under the table
    labels = [str(m) for m in board["method"]]
    full = max(map(len, labels), default=3)
    abbreviations = key_abbreviations(labels)
    short = max((len(abbreviate(label, abbreviations)) for label in labels), default=3)
    widths = {ci: {c: _width(board, c, ci) for c in main} for ci in (False, True)}

    def others(cols: Sequence[str], ci: bool) -> int:
        return sum(widths[ci][c] + GAP for c in cols)

    if columns is not None:
        cols = [c for c in columns if c != "method"]
    else:
        cols = [c for c in main if c.startswith("acc_")] + [c for c in FIRST if c in main]
        floor = min(full, MIN_LABEL)
        for group in _DROP_ORDER:  # even the first columns do not fit: drop from the right
            if others(cols, False) + floor <= width:
                break
            cols = [c for c in cols if c not in group]
        while others(cols, False) + floor > width and any(c.startswith("acc_") for c in cols):
            cols.remove([c for c in cols if c.startswith("acc_")][-1])  # mean_acc outlasts the tasks
    wide = min(short, WIDE_LABEL)
    inline = others(cols, True) + wide <= width
    if columns is None:
        for col in (c for c in EXTRA if c in main):
            if others([*cols, col], inline) + wide <= width:
                cols.append(col)
        cols = [c for c in main if c in cols]  # shown in the leaderboard's own order
    label_width = max(min(width - others(cols, inline), full), min(full, MIN_LABEL), 8)
    keys = abbreviations if label_width < full else {}
    used = {k for label in labels for k in option_keys([label])} if keys else set()
    keys = {k: v for k, v in keys.items() if k in used}
    return _Layout(cols, label_width, inline, keys, [c for c in main if c not in cols])


def _notes(board: pd.DataFrame, layout: _Layout) -> list[str]:
    attrs = board.attrs
    seeds = attrs.get("n_seeds", {})
    counts = sorted(set(seeds.values()))
    if len(counts) == 1:
        over = f"mean over {counts[0]} seed{'s' * (counts[0] != 1)} per row"
    else:
        over = "mean over seeds (" + ", ".join(f"{label}={n}" for label, n in seeds.items()) + ")"
    notes = [
        f"Task columns and mean_acc: global-test accuracy (higher is better), {over}; mean_acc with its "
        f"{INTERVAL} (none with one seed). local = "
        "local_acc (own test splits). MB/rd: MB per round, summed over the round's clients. ± std, "
        "per-task intervals and every column: --format markdown or csv."
    ]
    abbreviated = [c for c in layout.columns if c.startswith("acc_") and task_header(c[4:]) != c[4:]]
    if abbreviated:
        notes.append("Tasks: " + ", ".join(f"{task_header(c[4:])} = {c}" for c in abbreviated) + ".")
    if layout.keys:
        notes.append("Row options: " + ", ".join(f"{s} = {k}" for k, s in layout.keys.items()) + ".")
    if "converged" in layout.columns:
        notes.append(f"converged: rising = mean_acc gained more than its interval's half-width after {LATE:g}·R.")
    if set(BYTES_COLS) & set(layout.columns) and "federated" in board and board["federated"].eq(False).any():
        notes.append("Bytes n/a: a reference row that is not federated.")
    if "failed" in board:
        failed = board[board["failed"].map(lambda v: isinstance(v, str))]
        notes += [f"failed: {label} ({error})" for label, error in zip(failed["method"], failed["failed"], strict=True)]
    if layout.hidden:
        notes.append("Not shown (a wider terminal or --columns): " + ", ".join(layout.hidden) + ".")
    sampled = sampling_note(attrs)
    if sampled:
        notes.append(sampled)
    if attrs.get("synthetic"):
        notes.append(f"Data: SYNTHETIC ({', '.join(attrs.get('synthetic_suites', []))}), not a real-task result.")
    protocols = "; ".join(f"{name} ({', '.join(h)})" for name, h in attrs.get("protocols", {}).items())
    notes.append(f"Timer: {', '.join(attrs.get('timers', [])) or 'unknown'}. Protocol hash: {protocols}.")
    notes.append(COMPUTE_NOTE)
    return notes


def valid_columns(board: pd.DataFrame) -> list[str]:
    return main_columns(board)


def check_columns(board: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """``columns`` with ``method`` first; UnknownColumnError names a bad one and the valid ones."""
    valid = valid_columns(board)
    for col in columns:
        if col not in valid:
            raise UnknownColumnError(f"unknown column '{col}'; choose from: {', '.join(valid)}")
    if not columns:
        raise UnknownColumnError(f"--columns is empty; choose from: {', '.join(valid)}")
    return ["method", *[c for c in dict.fromkeys(columns) if c != "method"]]


def select_columns(board: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """The leaderboard restricted to ``columns`` (checked) and their ``_std``/``_lo``/``_hi`` companions
    (and ``federated``, so bytes still read n/a), for markdown and CSV."""
    cols = check_columns(board, columns)
    keep = [c for c in board.columns if c in cols or c == "federated" or (c.endswith(HIDDEN) and _companion(c) in cols)]
    out = board[sorted(keep, key=lambda c: cols.index(_companion(c)) if _companion(c) in cols else len(cols))]
    out.attrs = board.attrs
    return out


def _companion(col: str) -> str:
    for suffix in ("_std", "_lo", "_hi"):
        if col.endswith(suffix):
            return col.removesuffix(suffix)
    return col


def render_terminal(board: pd.DataFrame, width: int, columns: Sequence[str] | None = None) -> str:
    """The leaderboard as plain text at most ``width`` characters wide (unless ``columns`` asks for
    more than fits): the first columns, then :data:`EXTRA` as room allows; row labels wrapped."""
    if columns is not None:
        columns = check_columns(board, columns)
    layout = _layout(board, width, columns)
    cells = [[_value(board, row, c, layout.inline_ci) for c in layout.columns] for _, row in board.iterrows()]
    labels = ["\n".join(wrap_label(abbreviate(str(m), layout.keys), layout.label_width)) for m in board["method"]]
    multiline = any("\n" in text for text in [*labels, *(c for row in cells for c in row)])
    title = "fedbench leaderboard" + (" (SYNTHETIC data)" if board.attrs.get("synthetic") else "")
    table = Table(
        title=title,
        caption=Text("\n".join(_notes(board, layout))),
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        show_lines=multiline,  # a blank line between rows that span several lines
        pad_edge=False,
        padding=0,
    )
    table.add_column(Text("row"), no_wrap=True, width=layout.label_width, overflow="fold")
    for col in layout.columns:
        top, bottom = _header(col)
        if col == "mean_acc" and layout.inline_ci:
            top, bottom = f"{top} {bottom}", ""
        numeric = pd.api.types.is_numeric_dtype(board[col])
        table.add_column(Text(f"{top}\n{bottom}".rstrip("\n")), justify="right" if numeric else "left", no_wrap=True)
    for label, row in zip(labels, cells, strict=True):
        table.add_row(Text(label), *map(Text, row))
    table_width = layout.label_width + sum(_width(board, c, layout.inline_ci) + GAP for c in layout.columns)
    console = Console(file=io.StringIO(), width=max(table_width, 20), color_system=None, legacy_windows=False)
    console.print(table)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines()) + "\n"
