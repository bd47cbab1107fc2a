"""Records -> leaderboard: one row per method label, mean ± std over seeds, rendered or plotted.

Only completed runs count, and only each run's last eval round, so a crashed or still-running run
never mixes into the comparison. Every figure is computed per run first and then aggregated over
the runs (seeds) of a label, so the stds are seed-to-seed spreads. Accuracies are higher-is-better.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from rich.console import Console
from rich.table import Table
from rich.text import Text

MAJORITY = "majority"
FORMATS = ("table", "markdown", "csv")
_COST_COLS = ["up_mb_per_round", "down_mb_per_round", "total_mb", "compute_s"]
_PARAM_COLS = ["params_trainable", "params_shared", "params_local"]


def _completed(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of completed runs only; a run counts once its kind="run" row says completed=True."""
    runs = df[df["kind"] == "run"]
    done = runs.loc[runs["completed"].eq(True), "run_id"]
    if done.empty:
        raise ValueError("no completed runs in the records (no kind='run' row with completed=True)")
    return df[df["run_id"].isin(done)]


def _last_round_evals(recs: pd.DataFrame) -> pd.DataFrame:
    """Eval rows of each run's last eval round, per scope (global and client may be evaluated apart)."""
    ev = recs[recs["kind"] == "eval"]
    last = ev.groupby(["run_id", "scope"])["round"].transform("max")
    return ev[ev["round"] == last]


def _per_run(recs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """One row per completed run with every leaderboard figure; also the sorted task names."""
    runs = recs[recs["kind"] == "run"].set_index("run_id")
    out = runs[["label", "seed"]].copy()

    ev = _last_round_evals(recs)
    glob = ev[ev["scope"] == "global"].pivot_table(index="run_id", columns="task", values="value")
    tasks = sorted(glob.columns)
    for task in tasks:
        out[f"acc_{task}"] = glob[task]
    out["mean_acc"] = glob[tasks].mean(axis=1)

    client = ev[ev["scope"] == "client"].groupby(["run_id", "client", "task"])["value"].mean()
    out["worst_client_acc"] = client.groupby(level=["run_id", "client"]).mean().groupby(level="run_id").min()

    # FedDPA's P (own tasks) and TTP (all tasks, own included): each client's model on the global
    # test set, averaged over its tasks, then over clients.
    cg = ev[ev["scope"] == "client_global"] if "scope" in ev else ev.iloc[:0]
    if not cg.empty:
        held = cg[cg["held"].eq(True)]
        out["p_acc"] = held.groupby(["run_id", "client"])["value"].mean().groupby(level="run_id").mean()
        out["ttp_acc"] = cg.groupby(["run_id", "client"])["value"].mean().groupby(level="run_id").mean()
    else:
        out["p_acc"] = np.nan
        out["ttp_acc"] = np.nan

    train = recs[recs["kind"] == "train"]
    per_round = train.groupby(["run_id", "round"])[["up_bytes", "down_bytes"]].sum()
    mean_round = per_round.groupby(level="run_id").mean()
    out["up_mb_per_round"] = mean_round["up_bytes"] / 1e6
    out["down_mb_per_round"] = mean_round["down_bytes"] / 1e6
    totals = train.groupby("run_id")[["up_bytes", "down_bytes"]].sum()
    out["total_mb"] = (totals["up_bytes"] + totals["down_bytes"]) / 1e6
    out["compute_s"] = train.groupby("run_id")["compute_s"].sum()

    for col in _PARAM_COLS:
        out[col] = pd.to_numeric(runs[col])
    return out, tasks


def _majority_row(recs: pd.DataFrame, tasks: list[str]) -> dict | None:
    """Majority-answer reference: per seed (identical across the labels' runs), then over seeds."""
    maj = recs[(recs["kind"] == "majority") & recs["task"].isin(tasks)]
    if maj.empty:
        return None
    per_seed = maj.groupby(["task", "seed"])["value"].mean().groupby(level="task")
    row: dict = {"method": MAJORITY}
    for task, mean, std in zip(per_seed.mean().index, per_seed.mean(), per_seed.std(ddof=1), strict=True):
        row[f"acc_{task}"] = mean
        row[f"acc_{task}_std"] = std
    return row


def _attrs(recs: pd.DataFrame, per_run: pd.DataFrame) -> dict:
    """Provenance shown next to the numbers: seeds, synthetic data, protocol and timer."""
    synthetic = recs["synthetic"].eq(True)
    protocols = recs.groupby("protocol")["protocol_hash"].unique()
    train = recs[recs["kind"] == "train"]
    return {
        "n_seeds": {label: int(n) for label, n in per_run.groupby("label").size().items()},
        "synthetic": bool(synthetic.any()),
        "synthetic_suites": sorted(recs.loc[synthetic, "suite"].dropna().unique().tolist()),
        "suites": sorted(recs["suite"].dropna().unique().tolist()),
        "protocols": {name: sorted(str(h) for h in hashes) for name, hashes in protocols.items()},
        "timers": sorted(train["timer"].dropna().unique().tolist()) if "timer" in train else [],
    }


def build_leaderboard(df: pd.DataFrame) -> pd.DataFrame:
    """One row per label (plus "majority" last), best mean_acc first; ``<col>_std`` columns at the end.

    Raises ValueError when there is no completed run, or when a label has two completed runs of one
    seed (the seed count, and so the std, would be wrong).
    """
    recs = _completed(df)
    per_run, tasks = _per_run(recs)
    dup = per_run[per_run.duplicated(["label", "seed"], keep=False)]
    if not dup.empty:
        pairs = sorted({f"{lab} seed {seed}" for lab, seed in zip(dup["label"], dup["seed"], strict=True)})
        raise ValueError(f"several completed runs for {', '.join(pairs)}; keep one run per (label, seed)")

    fig_cols = [*(f"acc_{t}" for t in tasks), "mean_acc", "worst_client_acc", "p_acc", "ttp_acc", *_COST_COLS]
    num_cols = [*fig_cols, *_PARAM_COLS]
    grouped = per_run.groupby("label")[num_cols]
    board = grouped.mean()
    std = grouped.std(ddof=1).add_suffix("_std")  # NaN for a single seed: no spread to report
    board["method"] = board.index
    board["device"] = recs.groupby("label")["device"].agg(lambda d: ",".join(sorted(d.dropna().unique())))
    board = board.join(std).sort_values(["mean_acc", "method"], ascending=[False, True])

    rows = board.to_dict("records")
    majority = _majority_row(recs, tasks)
    if majority is not None:
        rows.append(majority)
    columns = ["method", *fig_cols, "device", *_PARAM_COLS, *std.columns]
    out = pd.DataFrame(rows, columns=columns)
    if len(recs["protocol_hash"].dropna().unique()) > 1:
        warnings.warn("the leaderboard mixes runs of several protocol hashes", RuntimeWarning, stacklevel=2)
    out.attrs = _attrs(recs, per_run)
    return out


def _main_columns(board: pd.DataFrame) -> list[str]:
    return [c for c in board.columns if not c.endswith("_std")]


def _cell(board: pd.DataFrame, row: pd.Series, col: str) -> str:
    """Cell text "mean ± std"; just the mean for one seed, and no ± for counts that do not vary."""
    mean = row[col]
    if not pd.api.types.is_numeric_dtype(board[col]):
        return "" if pd.isna(mean) else str(mean)
    if pd.isna(mean):
        return ""
    spec = ",.0f" if col in _PARAM_COLS else ".1f" if col == "compute_s" else ".3f"
    std = row.get(f"{col}_std", np.nan)
    if pd.isna(std) or (col in _PARAM_COLS and std == 0):
        return format(mean, spec)
    return f"{format(mean, spec)} ± {format(std, spec)}"


def _footnotes(board: pd.DataFrame) -> list[str]:
    attrs = board.attrs
    seeds = ", ".join(f"{label}={n}" for label, n in attrs.get("n_seeds", {}).items())
    if attrs.get("what") == "usage":
        first = "Mean routing weight per task family (row) and expert (column) on the global test set"
    else:
        first = "Higher acc is better"
    notes = [f"{first}; mean ± std over seeds ({seeds}); last eval round of completed runs."]
    if attrs.get("synthetic"):
        suites = ", ".join(attrs.get("synthetic_suites", []))
        notes.append(f"Data: SYNTHETIC (procedurally generated suite: {suites}), not a real-task result.")
    protocols = "; ".join(f"{name} ({', '.join(h)})" for name, h in attrs.get("protocols", {}).items())
    notes.append(f"Timer: {', '.join(attrs.get('timers', [])) or 'unknown'}. Protocol hash: {protocols}.")
    return notes


def render(board: pd.DataFrame, fmt: str) -> str:
    """A leaderboard (or usage table) as a rich text table, a GitHub markdown table, or CSV (stds in
    own columns)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown leaderboard format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if fmt == "csv":
        return board.to_csv(index=False)
    cols = _main_columns(board)
    cells = [[_cell(board, row, c) for c in cols] for _, row in board.iterrows()]
    numeric = [pd.api.types.is_numeric_dtype(board[c]) for c in cols]
    notes = _footnotes(board)
    if fmt == "markdown":
        lines = [
            "| " + " | ".join(cols) + " |",
            "|" + "|".join("---:" if num else "---" for num in numeric) + "|",
            *("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells),
            "",
            *(f"_{note}_  " for note in notes),
        ]
        return "\n".join(lines) + "\n"
    title = "fedbench " + ("expert usage" if board.attrs.get("what") == "usage" else "leaderboard")
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


def _round_curves(recs: pd.DataFrame) -> pd.DataFrame:
    """Global accuracy (mean over tasks) per eval round, averaged over a label's seeds: label x round."""
    glob = recs[(recs["kind"] == "eval") & (recs["scope"] == "global")]
    per_run = glob.groupby(["label", "run_id", "round"])["value"].mean()
    return per_run.groupby(level=["label", "round"]).mean().unstack("label")


def plot(board_df_records: pd.DataFrame, out_dir: Path) -> list[Path]:
    """PNGs from the raw records: accuracy vs total communication, and accuracy per round.

    Uses bare :class:`Figure` objects (Agg canvas), so no pyplot state or global backend is touched.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    board = build_leaderboard(board_df_records)
    methods = board[board["method"] != MAJORITY]
    acc_cols = [c for c in _main_columns(board) if c.startswith("acc_")]
    majority = board.loc[board["method"] == MAJORITY, acc_cols].mean(axis=1)
    suffix = " (synthetic data)" if board.attrs.get("synthetic") else ""

    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.add_subplot()
    for i, (_, row) in enumerate(methods.iterrows()):
        ax.errorbar(
            row["total_mb"],
            row["mean_acc"],
            xerr=np.nan_to_num(row["total_mb_std"]),
            yerr=np.nan_to_num(row["mean_acc_std"]),
            fmt=_MARKERS[i % len(_MARKERS)],
            color=_color(i),
            capsize=3,
            label=row["method"],
        )
    if not majority.empty:
        ax.axhline(majority.iloc[0], color="grey", linestyle="--", label=MAJORITY)
    ax.set(
        xlabel="total communication (MB, up + down)",
        ylabel="mean accuracy (global test)",
        title=f"Accuracy vs communication{suffix}",
    )
    ax.legend(fontsize="small")
    comm = out_dir / "acc_vs_comm.png"
    fig.savefig(comm, dpi=120)

    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.add_subplot()
    curves = _round_curves(_completed(board_df_records))
    for i, label in enumerate(methods["method"]):
        ax.plot(curves.index, curves[label], marker=_MARKERS[i % len(_MARKERS)], color=_color(i), label=label)
    if not majority.empty:
        ax.axhline(majority.iloc[0], color="grey", linestyle="--", label=MAJORITY)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round", ylabel="mean accuracy (global test)", title=f"Accuracy per round{suffix}")
    ax.legend(fontsize="small")
    rounds = out_dir / "acc_per_round.png"
    fig.savefig(rounds, dpi=120)
    paths = [comm, rounds]
    usage = _usage_matrices(board_df_records)
    if usage:
        paths.append(_plot_usage(usage, out_dir / "expert_usage.png", suffix))
    return paths


def build_usage(df: pd.DataFrame) -> pd.DataFrame:
    """The expert-usage matrix of every method with a router or gate: one row per (method, task
    family), one column per expert holding its mean routing weight on the global test set (each
    run's last eval round, then mean over seeds; ``<expert>_std`` the seed-to-seed std)."""
    recs = _completed(df)
    usage = recs[recs["kind"] == "usage"] if "expert" in recs else recs.iloc[:0]
    if usage.empty:
        return pd.DataFrame(columns=["method", "task"])
    usage = usage[usage["round"] == usage.groupby("run_id")["round"].transform("max")]
    experts = list(pd.unique(usage["expert"]))
    per_run = usage.pivot_table(index=["label", "task", "run_id"], columns="expert", values="value")
    grouped = per_run.groupby(level=["label", "task"])
    mean, std = grouped.mean()[experts], grouped.std(ddof=1)[experts].add_suffix("_std")
    out = mean.join(std).reset_index().rename(columns={"label": "method"})
    runs = recs[(recs["kind"] == "run") & recs["label"].isin(out["method"])]
    out.attrs = {**_attrs(recs[recs["label"].isin(out["method"])], runs), "what": "usage"}
    return out


def _usage_matrices(recs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per label: task × expert mean routing weight (the experts that label has)."""
    usage = build_usage(recs)
    means = usage[_main_columns(usage)]
    return {
        label: group.set_index("task").drop(columns="method").dropna(axis=1, how="all")
        for label, group in means.groupby("method")
    }


def _plot_usage(usage: dict[str, pd.DataFrame], path: Path, suffix: str) -> Path:
    """One heatmap per routed method: which experts each task family uses."""
    n = len(usage)
    cols = min(3, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows), layout="constrained")
    for i, (label, matrix) in enumerate(sorted(usage.items())):
        ax = fig.add_subplot(rows, cols, i + 1)
        image = ax.imshow(matrix.to_numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(matrix.shape[1]), matrix.columns, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(matrix.shape[0]), matrix.index, fontsize=7)
        for (r, c), v in np.ndenumerate(matrix.to_numpy()):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.5 else "black")
        ax.set_title(label, fontsize=7)
    fig.colorbar(image, ax=fig.axes, shrink=0.6, label="mean routing weight")
    fig.suptitle(f"Expert usage per task (global test){suffix}")
    fig.savefig(path, dpi=120)
    return path


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _color(i: int) -> tuple:
    from matplotlib import colormaps

    return colormaps["tab20"](i % 20)
