"""Bytes to a target accuracy: per row and task family, the rounds and the uplink / downlink bytes a
row needed to first reach a target accuracy on the global test set, and its bytes relative to a
reference row (``fedavg-lora``).

The accuracy curve of a row is its seed mean: per run, the global-test score at each evaluated round
(over the family's tasks, mean), then mean over the row's seeds at each round every seed evaluated.
The first evaluated round at or above the target is the answer, so with sparse evaluation it is an
upper bound on the rounds needed. Bytes are summed over every client and round up to and including
that round, per run, then averaged over seeds (MB = 10^6 bytes); n/a for a row that is not federated.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pandas as pd
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from fedbench.reporting.board import completed_records
from fedbench.reporting.terminal_table import MIN_LABEL, abbreviate, key_abbreviations, wrap_label
from fedbench.reporting.text import FORMATS

REFERENCE = "fedavg-lora"
ALL_TASKS = "mean_acc"  # the "family" of all tasks together, as the leaderboard's mean_acc
COLUMNS = ["method", "family", "reached", "rounds", "up_mb", "down_mb", "total_mb", "vs_reference"]
_MB = ("up_mb", "down_mb", "total_mb")


class CompareError(ValueError):
    """Bad input to :func:`build_compare`: a target outside [0, 1] or an unknown task."""


def _family(task: str) -> str:
    """The task's registered family; the task's own name when it is not registered here."""
    try:
        from fedbench.api.registry import TASKS

        return TASKS.get(task).family if task in TASKS else task
    except Exception:  # a registry that fails to load must not stop a read of finished records
        return task


def task_groups(tasks: Sequence[str], task: str | None = None) -> dict[str, list[str]]:
    """Family -> its tasks (plus ``mean_acc``: all tasks), or only ``task`` (a task or a family)."""
    families: dict[str, list[str]] = {}
    for t in sorted(tasks):
        families.setdefault(_family(t), []).append(t)
    if task is None:
        return {**families, ALL_TASKS: sorted(tasks)} if len(tasks) > 1 else families
    if task in tasks:
        return {task: [task]}
    if task in families:
        return {task: families[task]}
    if task == ALL_TASKS:
        return {ALL_TASKS: sorted(tasks)}
    valid = sorted({*tasks, *families, ALL_TASKS})
    raise CompareError(f"unknown task '{task}'; tasks in these results: {', '.join(valid)}")


def build_compare(df: pd.DataFrame, target: float, task: str | None = None, reference: str = REFERENCE) -> pd.DataFrame:
    """One row per (row label, family): ``reached`` (bool), ``rounds`` (rounds trained when the seed-
    mean curve first reached ``target``), ``up_mb``, ``down_mb``, ``total_mb`` to that round, and
    ``vs_reference``: total_mb / the reference row's total_mb for the same family (NaN when either
    did not reach the target or sent nothing), ``best_acc`` (the curve's highest point). Within a
    family: the rows that reached the target, fewest bytes first (not federated after), then the
    others, highest best_acc first. ``attrs`` holds the target, the reference and the evaluated
    rounds (as rounds trained)."""
    if not 0.0 <= target <= 1.0:
        raise CompareError(f"--target {target:g} is outside [0, 1]: accuracies are fractions, e.g. 0.35")
    recs = completed_records(df)
    runs = recs[recs["kind"] == "run"].set_index("run_id")
    glob = recs[(recs["kind"] == "eval") & (recs["scope"] == "global")]
    tasks = sorted(glob["task"].dropna().unique())
    groups = task_groups(tasks, task)
    order = sorted(runs["label"].unique())
    federated = runs["federated"].ne(False) if "federated" in runs else pd.Series(True, index=runs.index)

    train = recs[recs["kind"] == "train"]
    per_round = train.groupby(["run_id", "round"])[["up_bytes", "down_bytes"]].sum().sort_index()
    cumulative = per_round.groupby(level="run_id").cumsum()

    rows = []
    for family, family_tasks in groups.items():
        scores = glob[glob["task"].isin(family_tasks)]
        per_run = scores.groupby(["run_id", "round"])["value"].mean().unstack("round")  # run x round
        for label in order:
            ids = runs.index[runs["label"] == label]
            curves = per_run.reindex(ids).dropna(axis=1, how="any")  # rounds every seed evaluated
            mean = curves.mean(axis=0)
            hit = mean.index[mean.to_numpy() >= target - 1e-12]
            row = {"method": label, "family": family, "reached": len(hit) > 0, "seeds": len(ids)}
            row["best_acc"] = float(mean.max()) if len(mean) else np.nan
            row["evaluated"] = [int(r) + 1 for r in mean.index]
            if len(hit):
                first = hit[0]
                row["rounds"] = int(first) + 1  # record round r follows r + 1 rounds of training
                if federated[ids].all():
                    spent = [_spent(cumulative, run_id, first) for run_id in ids]
                    row["up_mb"] = float(np.mean([s[0] for s in spent])) / 1e6
                    row["down_mb"] = float(np.mean([s[1] for s in spent])) / 1e6
                    row["total_mb"] = row["up_mb"] + row["down_mb"]
            rows.append(row)
    out = pd.DataFrame(rows).reindex(columns=[*COLUMNS, "best_acc", "seeds", "evaluated"])
    ref = out[out["method"] == reference].set_index("family")["total_mb"]
    out["vs_reference"] = out["total_mb"] / out["family"].map(ref).replace(0.0, np.nan)
    out["rounds"] = out["rounds"].astype("Int64")
    out["_family"] = out["family"].map(list(groups).index)
    out["_unreached"], out["_no_bytes"] = ~out["reached"], out["total_mb"].isna()
    keys = ["_family", "_unreached", "_no_bytes", "total_mb", "rounds", "best_acc", "method"]
    out = out.sort_values(keys, ascending=[True, True, True, True, True, False, True], na_position="last")
    out = out.drop(columns=["_family", "_unreached", "_no_bytes"]).reset_index(drop=True)
    out.attrs = {
        "target": target,
        "reference": reference,
        "has_reference": reference in order,
        "synthetic": bool(recs["synthetic"].eq(True).any()),
        "evaluated": sorted({r for ev in out["evaluated"] for r in ev}),
        "rounds": sorted(pd.to_numeric(runs["rounds"]).dropna().astype(int).unique().tolist())
        if "rounds" in runs
        else [],
        "federated": {label: bool(federated[runs["label"] == label].all()) for label in order},
    }
    return out


def _spent(cumulative: pd.DataFrame, run_id: str, last_round: float) -> tuple[float, float]:
    """Up and down bytes of one run through ``last_round`` (0 for a run without train records)."""
    if run_id not in cumulative.index.get_level_values("run_id"):
        return 0.0, 0.0
    run = cumulative.loc[run_id]
    run = run[run.index <= last_round]
    return (0.0, 0.0) if run.empty else (float(run["up_bytes"].iloc[-1]), float(run["down_bytes"].iloc[-1]))


def _mb(value: float) -> str:
    """52.4, 1.48, 0.075: one decimal from 10 MB, two from 1 MB, three below."""
    return f"{value:.{1 if abs(value) >= 10 else 2 if abs(value) >= 1 else 3}f}"


def _cells(table: pd.DataFrame, row: pd.Series) -> list[str]:
    """rounds, MB up, MB down, MB total, vs reference, best acc."""
    best = f"{row['best_acc']:.3f}" if pd.notna(row["best_acc"]) else ""
    if not row["reached"]:
        return ["not reached", "", "", "", "", best]
    federated = table.attrs.get("federated", {}).get(row["method"], True)
    mb = [_mb(row[c]) if pd.notna(row[c]) else ("n/a" if not federated else "") for c in _MB]
    if pd.notna(row["vs_reference"]):
        ratio = f"{row['vs_reference']:.2f}×"
    else:
        ratio = "n/a" if table.attrs.get("has_reference") else ""
    return [str(row["rounds"]), *mb, ratio, best]


def _notes(table: pd.DataFrame) -> list[str]:
    attrs = table.attrs
    evaluated = ", ".join(map(str, attrs.get("evaluated", [])))
    rounds = ", ".join(map(str, attrs.get("rounds", [])))
    notes = [
        f"Target {attrs['target']:g} on the global test set (family: mean over its tasks; {ALL_TASKS}: over all "
        "tasks), on each row's seed-mean curve.",
        f"Evaluated after rounds {evaluated} (of {rounds}): 'rounds' is the first evaluated round at or above "
        "the target, an upper bound on the rounds needed.",
        "MB up / down / total: every client's serialized messages through that round, mean over seeds "
        "(MB = 10^6 bytes); n/a: not federated. best acc: the highest point of the seed-mean curve.",
    ]
    if attrs.get("has_reference"):
        notes.append(
            f"vs {attrs['reference']}: total MB to the target / {attrs['reference']}'s for the same family "
            f"(n/a: one of the two did not reach it)."
        )
    else:
        notes.append(f"No {attrs['reference']} row in these results: no relative bytes.")
    if attrs.get("synthetic"):
        notes.append("Data: SYNTHETIC, not a real-task result.")
    return notes


def render_compare(table: pd.DataFrame, fmt: str = "table", width: int = 100) -> str:
    """The bytes-to-target table as a terminal table (at most ``width`` wide, labels wrapped), a
    markdown table, or CSV."""
    if fmt not in FORMATS:
        raise CompareError(f"unknown format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    if fmt == "csv":
        return table.drop(columns=["evaluated"]).to_csv(index=False)
    ref = table.attrs.get("reference", REFERENCE)
    heads = ["row", "family", "rounds", "MB up", "MB down", "MB total", f"vs {ref}", "best acc"]
    body = [[str(r["method"]), str(r["family"]), *_cells(table, r)] for _, r in table.iterrows()]
    notes = _notes(table)
    if fmt == "markdown":
        lines = [
            "| " + " | ".join(heads) + " |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
            *("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body),
            "",
            *(f"_{note}_  " for note in notes),
        ]
        return "\n".join(lines) + "\n"
    # terminal: one block per family under its name; the row labels take what the other columns
    # leave, wrapped at their options, option keys abbreviated (with a legend) when they do not fit
    heads2 = [("rounds", ""), ("MB", "up"), ("MB", "down"), ("MB", "total"), ("vs", ref), ("best", "acc")]
    cells = [row[2:] for row in body]
    widths = [max(len(a), len(b), *(len(c[i]) for c in cells)) for i, (a, b) in enumerate(heads2)]
    labels = [row[0] for row in body]
    full = max(len(x) for x in [*labels, *(f"{f}:" for f in table["family"])])
    room = max(width - sum(w + 1 for w in widths), min(full, MIN_LABEL))
    keys = key_abbreviations(labels) if room < full else {}
    if keys:
        notes.append("Row options: " + ", ".join(f"{s} = {k}" for k, s in keys.items()) + ".")
    label_width = min(room, full)
    title = f"fedbench compare: bytes to {table.attrs['target']:g} accuracy"
    title += " (SYNTHETIC data)" if table.attrs.get("synthetic") else ""
    out = Table(
        title=title,
        caption=Text("\n".join(notes)),
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=0,
    )
    out.add_column(Text("row"), no_wrap=True, width=label_width, overflow="fold")
    for top, bottom in heads2:
        out.add_column(Text(f"{top}\n{bottom}".rstrip()), justify="right", no_wrap=True)
    families = table["family"].tolist()
    for i, (label, row) in enumerate(zip(labels, cells, strict=True)):
        if i == 0 or families[i - 1] != families[i]:
            out.add_row(Text("\n".join(wrap_label(f"{families[i]}:", label_width))), *[""] * len(row))
        wrapped = "\n".join(wrap_label("  " + abbreviate(label, keys), label_width, indent="    "))
        last = i + 1 == len(body) or families[i + 1] != families[i]
        out.add_row(Text(wrapped), *map(Text, row), end_section=last)
    total = label_width + sum(w + 1 for w in widths)
    console = Console(file=io.StringIO(), width=max(total, 20), color_system=None)
    console.print(out)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines()) + "\n"
