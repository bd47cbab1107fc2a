"""Every plot of fedbench, drawn one way: the report page's figures, the PNGs a run writes, the sweep's.

- :func:`plot_acc_vs_comm`: mean_acc (95% t-interval) against total MB per row, the Pareto front
  as a staircase, a zoomed panel for a dense cluster of rows;
- :func:`plot_acc_per_round`: accuracy per evaluated round, one panel per task family;
- :func:`plot_bytes_per_round`: uplink and downlink MB per round per row;
- :func:`plot_client_acc`: the distribution of per-client accuracy per row;
- :func:`plot_expert_usage`: the expert-usage heatmaps with each router's entropy and I(task; expert);
- :func:`plot_sweep_gain`: a sweep's paired gain over its reference at every swept value;
- :func:`plot_versus`: every row's paired gain over one reference row (``fedbench leaderboard --versus``).

:func:`plot` writes the first two (and the expert usage where a row has a router) as
``acc_vs_comm.png``, ``acc_per_round.png`` and ``expert_usage.png`` (``fedbench run``,
``fedbench leaderboard --plots``); :func:`fedbench.reporting.html.write_report` draws all five for
its page. Rows keep their number, colour and marker in every plot (:mod:`fedbench.reporting.plot_layout`).
matplotlib is imported inside the functions that draw, so importing this module stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from fedbench.reporting.board import (
    MAJORITY,
    build_leaderboard,
    build_usage,
    completed_records,
    last_round_evals,
    main_columns,
    round_curves,
)
from fedbench.reporting.compare import ALL_TASKS, task_groups
from fedbench.reporting.plot_layout import (
    DPI,
    Style,
    dense_cluster,
    figure_legend,
    legend_label,
    legend_rows,
    new_figure,
    place_labels,
    place_line_ends,
    point_numbers,
    row_styles,
    save_png,
)
from fedbench.reporting.statistics import PAIRED_INTERVAL
from fedbench.reporting.text import sampling_note

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOTS = ("acc_vs_comm", "acc_per_round", "bytes_per_round", "client_acc", "expert_usage")  # the report's


@dataclass(frozen=True)
class PlotInputs:
    """What the plots read, computed once from the raw records (:func:`plot_inputs`)."""

    board: pd.DataFrame  # the leaderboard
    recs: pd.DataFrame  # the records of completed runs
    usage: pd.DataFrame  # the expert-usage table (empty: no row with a router or gate)
    styles: dict[str, Style]  # row label -> its number, colour and marker
    groups: dict[str, list[str]]  # task family -> its tasks (and mean_acc: all tasks)
    suffix: str  # " (SYNTHETIC data)" or ""


def plot_inputs(df: pd.DataFrame) -> PlotInputs:
    """The leaderboard, completed records, expert usage, row styles and task families of ``df``."""
    board = build_leaderboard(df)
    tasks = sorted(c.removeprefix("acc_") for c in main_columns(board) if c.startswith("acc_"))
    return PlotInputs(
        board=board,
        recs=completed_records(df),
        usage=build_usage(df),
        styles=row_styles([m for m in board["method"] if m != MAJORITY]),
        groups=task_groups(tasks),
        suffix=" (SYNTHETIC data)" if board.attrs.get("synthetic") else "",
    )


def plot(board_df_records: pd.DataFrame, out_dir: Path) -> list[Path]:
    """PNGs from the raw records into ``out_dir``: ``acc_vs_comm.png`` (:func:`plot_acc_vs_comm`),
    ``acc_per_round.png`` (:func:`plot_acc_per_round`) and, where a row has a router or gate,
    ``expert_usage.png`` (:func:`plot_expert_usage`); returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = plot_inputs(board_df_records)
    makers = {
        "acc_vs_comm": lambda: plot_acc_vs_comm(data.board, data.styles, data.suffix),
        "acc_per_round": lambda: plot_acc_per_round(data.recs, data.board, data.styles, data.groups, data.suffix),
    }
    if not data.usage.empty:
        makers["expert_usage"] = lambda: plot_expert_usage(data.usage, data.styles, data.suffix)
    return [save_png(make(), out_dir / f"{name}.png") for name, make in makers.items()]


# ---------------------------------------------------------------------------- accuracy vs communication


def pareto(points: pd.DataFrame) -> pd.DataFrame:
    """Rows no other row beats on both fewer total MB and higher mean_acc (means), by increasing MB."""
    ordered = points.sort_values(["total_mb", "mean_acc"], ascending=[True, False])
    front, best = [], -np.inf
    for label, row in ordered.iterrows():
        if row["mean_acc"] > best:
            front.append(label)
            best = row["mean_acc"]
    return ordered.loc[front]


def plot_acc_vs_comm(board: pd.DataFrame, styles: dict[str, Style], suffix: str) -> Figure:
    """mean_acc (95% CI) against total MB (± std over seeds), one point per row, the Pareto front
    as a staircase; a row that is not federated and the majority answer as horizontal lines; a
    zoomed panel for a dense cluster of rows."""
    from matplotlib.patches import Rectangle

    rows = board[board["method"] != MAJORITY].set_index("method")
    points = rows[rows["total_mb"].notna()]
    front = pareto(points)
    cluster = dense_cluster(points["total_mb"])
    n_panels = 1 if cluster is None else 2
    n_legend = len(rows) + 2
    ncols = 2 if n_panels == 1 else 3
    fig = new_figure(dpi=DPI, figsize=(7.5 * n_panels, 5.2 + 0.3 * legend_rows(n_legend, ncols)), layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    handles, labels = [], []
    numbers: list[tuple] = []
    for panel, ax in enumerate(axes):
        shown = points if panel == 0 else points.loc[cluster]
        for label, row in shown.iterrows():
            style = styles[label]
            lo, hi = row.get("mean_acc_lo", np.nan), row.get("mean_acc_hi", np.nan)
            yerr = [[row["mean_acc"] - lo], [hi - row["mean_acc"]]] if pd.notna(lo) else row.get("mean_acc_std")
            bar = ax.errorbar(
                row["total_mb"],
                row["mean_acc"],
                xerr=np.nan_to_num(row.get("total_mb_std", 0.0)),
                yerr=np.nan_to_num(yerr),
                fmt=style.marker,
                color=style.color,
                markeredgecolor="black",
                markeredgewidth=0.5,
                markersize=7,
                elinewidth=1,
                capsize=2,
                alpha=0.9,
                zorder=3,
            )
            if panel == 0:
                handles.append(bar)
                labels.append(legend_label(style, label))
        # the front as a staircase, held level to the largest MB: what a budget of x MB can reach
        step = []  # no front when no row is federated
        if len(front):
            stair_x = [*front["total_mb"], points["total_mb"].max()]
            stair_y = [*front["mean_acc"], front["mean_acc"].iloc[-1]]
            step = ax.step(stair_x, stair_y, where="post", color="black", linewidth=1.2, zorder=2)
            ax.scatter(
                front["total_mb"],
                front["mean_acc"],
                s=260,
                facecolors="none",
                edgecolors="black",
                linewidths=1.2,
                zorder=4,
            )
        numbered = shown if panel == 1 or cluster is None else shown.drop(cluster)
        numbers.append((ax, point_numbers(numbered, styles)))
        for label, row in rows[rows["total_mb"].isna()].iterrows():  # not federated: no bytes to plot
            line = ax.axhline(row["mean_acc"], color=styles[label].color, linestyle=":", linewidth=1.5)
            if panel == 0:
                handles.append(line)
                labels.append(legend_label(styles[label], f"{label} (not federated: no bytes)"))
        majority = board.loc[board["method"] == MAJORITY, "mean_acc"]
        if not majority.empty and panel == 0:
            handles.append(ax.axhline(majority.iloc[0], color="grey", linestyle="--", linewidth=1))
            labels.append(f"{MAJORITY} answer")
        ax.grid(alpha=0.3)
        ax.set_xlabel("total communication per run (MB, uplink + downlink)")
        ax.set_ylabel("mean accuracy, global test (95% t-interval over seeds)")
        if panel == 0:
            if step:
                handles.append((step[0],))
                labels.append("Pareto front (fewer MB, higher mean accuracy)")
            ax.set_title(f"All rows{suffix}")
        else:
            lo_x, hi_x = points.loc[cluster, "total_mb"].agg(["min", "max"])
            pad = max(0.06 * (hi_x - lo_x), 0.05)
            # the intervals' ends, and the means of rows without one (one seed): min/max skip NaN
            ends = [c for c in ("mean_acc_lo", "mean_acc", "mean_acc_hi") if c in points]
            lo_y = points.loc[cluster, ends].min().min() - 0.005
            hi_y = points.loc[cluster, ends].max().max() + 0.005
            ax.set_xlim(lo_x - pad, hi_x + pad)
            ax.set_ylim(lo_y, hi_y)
            ax.set_title(f"Zoom: {lo_x:.1f}–{hi_x:.1f} MB (the dashed box on the left, numbered here)")
            axes[0].add_patch(
                Rectangle(
                    (lo_x - pad, lo_y), hi_x - lo_x + 2 * pad, hi_y - lo_y, fill=False, edgecolor="grey", linestyle="--"
                )
            )
    fig.suptitle(
        "Accuracy vs communication: one point per row; error bars: 95% t-interval over seeds (y), ± std over seeds (x)"
    )
    figure_legend(fig, handles, labels, ncols)
    rings = list(zip(front["total_mb"], front["mean_acc"], strict=True))
    fig.draw_without_rendering()  # the constrained layout, once: final axes positions for the labels
    for ax, items in numbers:
        place_labels(fig, ax, items, rings)
    return fig


# ----------------------------------------------------------------------------------- per round


def _family_curves(recs: pd.DataFrame, groups: dict[str, list[str]]) -> dict[str, pd.DataFrame]:
    """Family -> (rounds trained × label) seed-mean global accuracy over the family's tasks."""
    out = {}
    for family, tasks in groups.items():
        curves = round_curves(recs, tasks)
        curves.index = curves.index.astype(int) + 1  # record round r follows r + 1 rounds of training
        out[family] = curves
    return out


def plot_acc_per_round(
    recs: pd.DataFrame, board: pd.DataFrame, styles: dict[str, Style], groups: dict[str, list[str]], suffix: str
) -> Figure:
    """One panel per task family (and mean_acc, all tasks): seed-mean global accuracy at every
    evaluated round, one line per row, the majority answer dashed; the title says when intermediate
    rounds scored a sample of the clients (``eval.clients``)."""
    from matplotlib.ticker import MaxNLocator

    curves = _family_curves(recs, groups)
    majority = board[board["method"] == MAJORITY]
    n = len(curves)
    cols = min(3, n)
    rows_n = -(-n // cols)
    labels = [m for m in board["method"] if m != MAJORITY]
    ncols = 3
    legend_height = 0.3 * legend_rows(len(labels) + 1, ncols)
    fig = new_figure(dpi=DPI, figsize=(4.6 * cols, 3.5 * rows_n + legend_height), layout="constrained")
    handles: dict[str, object] = {}
    ends = []
    if ALL_TASKS in curves:  # the headline panel first
        curves = {ALL_TASKS: curves[ALL_TASKS], **{k: v for k, v in curves.items() if k != ALL_TASKS}}
    for i, (family, curve) in enumerate(curves.items()):
        ax = fig.add_subplot(rows_n, cols, i + 1)
        last = curve.ffill().iloc[-1] if len(curve) else pd.Series(dtype=float)
        ends.append((ax, [(curve.index[-1], last[m], str(styles[m].number)) for m in labels if pd.notna(last.get(m))]))
        if len(curve.index):
            span = max(curve.index[-1] - curve.index[0], 1)
            ax.set_xlim(curve.index[0] - 0.08 * span, curve.index[-1] + 0.3 * span)
        for label in labels:
            if label not in curve:
                continue
            style = styles[label]
            (line,) = ax.plot(
                curve.index,
                curve[label],
                marker=style.marker,
                color=style.color,
                markeredgecolor="black",
                markeredgewidth=0.4,
                markersize=5,
                linewidth=1.2,
            )
            handles.setdefault(legend_label(style, label), line)
        if not majority.empty:
            cols_ = ["mean_acc"] if family == ALL_TASKS else [f"acc_{t}" for t in groups[family]]
            value = majority[cols_].mean(axis=1).iloc[0]
            handles.setdefault(f"{MAJORITY} answer", ax.axhline(value, color="grey", linestyle="--", linewidth=1))
        if len(curve.index) <= 8:
            ax.set_xticks(list(curve.index))  # the evaluated rounds, and only those
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.set_title(family if family != ALL_TASKS else "mean_acc (all tasks)")
        ax.set_xlabel("rounds trained")
        ax.set_ylabel("accuracy, global test")
    evaluated = sorted({r for c in curves.values() for r in c.index})
    sampled = "\n(intermediate rounds: mean over a seeded sample of clients)" if sampling_note(board.attrs) else ""
    fig.suptitle(
        f"Accuracy per evaluated round (after rounds {', '.join(map(str, evaluated))}), mean over seeds{suffix}"
        + sampled
    )
    figure_legend(fig, list(handles.values()), list(handles), ncols)
    fig.draw_without_rendering()  # the constrained layout, once: final axes positions for the labels
    for ax, items in ends:
        place_line_ends(fig, ax, items)
    return fig


def _bytes_per_round(recs: pd.DataFrame) -> pd.DataFrame:
    """Per label: up and down MB per round (mean over rounds and seeds) and their min and max over
    every round of every seed."""
    train = recs[recs["kind"] == "train"]
    per_round = train.groupby(["label", "run_id", "round"])[["up_bytes", "down_bytes"]].sum() / 1e6
    grouped = per_round.groupby(level="label")
    out = grouped.mean().join(grouped.min().add_suffix("_min")).join(grouped.max().add_suffix("_max"))
    return out


def _row_axis(ax, labels: list[str], styles: dict[str, Style]) -> None:
    ax.set_yticks(range(len(labels)), [legend_label(styles[m], m) for m in labels], fontsize=8)
    ax.set_ylim(len(labels) - 0.5, -0.5)  # first row on top


def plot_bytes_per_round(
    recs: pd.DataFrame, board: pd.DataFrame, styles: dict[str, Style], suffix: str
) -> tuple[Figure, float]:
    """Horizontal bars per row: uplink and downlink MB per round (mean over rounds and seeds), with
    whiskers from the smallest to the largest round; also the largest relative spread over rounds."""
    labels = [m for m in board["method"] if m != MAJORITY]
    data = _bytes_per_round(recs).reindex(labels)
    federated = board.set_index("method")["federated"]
    height = 0.38
    lines = sum(len(legend_label(styles[m], m).split("\n")) for m in labels)
    fig = new_figure(dpi=DPI, figsize=(10, 1.6 + 0.2 * lines + 0.12 * len(labels)), layout="constrained")
    ax = fig.add_subplot()
    spread = 0.0
    top = float(np.nanmax(data[["up_bytes_max", "down_bytes_max"]].to_numpy())) if len(data) else 0.0
    for y, label in enumerate(labels):
        if not federated.get(label, True):
            ax.text(0, y, "  n/a: not federated (nothing is sent)", va="center", fontsize=8, color="dimgray")
            continue
        for offset, kind, color, name in (
            (-height / 2, "up_bytes", "tab:blue", "uplink (clients → server)"),
            (height / 2, "down_bytes", "tab:orange", "downlink (server → clients)"),
        ):
            mean, lo, hi = data.loc[label, [kind, f"{kind}_min", f"{kind}_max"]]
            ax.barh(y + offset, mean, height=height, color=color, label=name)
            ax.errorbar(mean, y + offset, xerr=[[mean - lo], [hi - mean]], color="black", linewidth=0.8, capsize=2)
            ax.text(hi + 0.01 * max(top, 1e-9), y + offset, f"{mean:.3f}", va="center", fontsize=7)
            if mean > 0:
                spread = max(spread, (hi - lo) / mean)
    _row_axis(ax, labels, styles)
    ax.set_xlim(0, top * 1.12 if top > 0 else 1)
    ax.set_xlabel("MB per round (all sampled clients; MB = 10^6 bytes)")
    ax.grid(axis="x", alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    if handles:  # below the axes, where it can never hide a bar
        fig.legend(handles[:2], names[:2], loc="outside lower center", ncols=2, fontsize="small", frameon=False)
    ax.set_title(
        f"Uplink and downlink MB per round{suffix}\nmean over rounds and seeds; whiskers: smallest to largest round"
    )
    return fig, spread


def _client_scores(recs: pd.DataFrame) -> pd.DataFrame:
    """Per run and client at the run's last client eval: mean over the client's own tasks on its own
    test split (the figure ``local_acc`` averages)."""
    ev = last_round_evals(recs)
    client = ev[ev["scope"] == "client"]
    per = client.groupby(["label", "run_id", "client"])["value"].mean()
    return per.rename("value").reset_index()


def plot_client_acc(recs: pd.DataFrame, board: pd.DataFrame, styles: dict[str, Style], suffix: str) -> Figure:
    """Per row: a box plot of its clients' accuracies (every client of every seed), the points
    themselves (jittered), and the mean (local_acc) as a white diamond."""
    labels = [m for m in board["method"] if m != MAJORITY]
    scores = _client_scores(recs)
    lines = sum(len(legend_label(styles[m], m).split("\n")) for m in labels)
    fig = new_figure(dpi=DPI, figsize=(10, 1.6 + 0.2 * lines + 0.12 * len(labels)), layout="constrained")
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)  # jitter only: seeded so the PNG is the same on every build
    groups = [scores.loc[scores["label"] == m, "value"].to_numpy() for m in labels]
    present = [i for i, g in enumerate(groups) if len(g)]
    box = ax.boxplot(
        [groups[i] for i in present],
        positions=present,
        orientation="horizontal",
        widths=0.6,
        whis=(0, 100),  # whiskers over the whole range: the worst client is the left end
        showfliers=False,
        patch_artist=True,
        medianprops={"color": "black"},
    )
    for i, patch in zip(present, box["boxes"], strict=True):
        patch.set_facecolor((*styles[labels[i]].color[:3], 0.35))
    for i in present:
        style = styles[labels[i]]
        y = i + rng.uniform(-0.22, 0.22, len(groups[i]))
        ax.scatter(groups[i], y, s=10, color=style.color, edgecolors="black", linewidths=0.3, alpha=0.8, zorder=3)
        ax.scatter([groups[i].mean()], [i], marker="D", s=30, color="white", edgecolors="black", zorder=4)
    _row_axis(ax, labels, styles)
    n_clients = scores.groupby("run_id")["client"].nunique()
    seeds = sorted(set(board.attrs.get("n_seeds", {}).values()))
    n_seeds = f"{seeds[0]} seed{'s' * (seeds[0] != 1)}" if len(seeds) == 1 else "seeds"
    each = f"{int(n_clients.max())} clients × {n_seeds} per row" if len(n_clients) else "clients × seeds"
    ax.set_xlabel("client accuracy on its own test split (mean over its own tasks)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"Per-client accuracy{suffix}\n{each}; box: quartiles, whiskers: range, ◇: mean (local_acc)")
    return fig


def plot_expert_usage(usage: pd.DataFrame, styles: dict[str, Style], suffix: str) -> Figure:
    """One heatmap per routed row (task family × expert, mean routing weight on the global test
    set), titled with the router's entropy and I(task; expert) in nats."""
    main = usage[main_columns(usage)]
    methods = [m for m in styles if m in set(main["method"])]
    n = len(methods)
    cols = min(3, n)
    rows_n = -(-n // cols)
    fig = new_figure(dpi=DPI, figsize=(4.6 * cols, 3.9 * rows_n + 0.6), layout="constrained")
    image = None
    for i, label in enumerate(methods):
        group = main[main["method"] == label].set_index("task")
        figures = group[[c for c in ("entropy", "mutual_info") if c in group]].iloc[0]
        matrix = group.drop(columns=["method", "entropy", "mutual_info"], errors="ignore").dropna(axis=1, how="all")
        ax = fig.add_subplot(rows_n, cols, i + 1)
        image = ax.imshow(matrix.to_numpy(dtype=float), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(matrix.shape[1]), matrix.columns, rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(matrix.shape[0]), matrix.index, fontsize=7)
        for (r, c), v in np.ndenumerate(matrix.to_numpy(dtype=float)):
            if np.isfinite(v):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.55 else "black")
        stats = []
        if pd.notna(figures.get("entropy")):
            stats.append(f"entropy {figures['entropy']:.3f}")
        if pd.notna(figures.get("mutual_info")):
            stats.append(f"I(task; expert) {figures['mutual_info']:.3f}")
        title = legend_label(styles[label], label)
        ax.set_title(title + ("\n" + ", ".join(stats) + " nats" if stats else ""), fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=fig.axes, shrink=0.5, label="mean routing weight")
    fig.suptitle(f"Expert usage per task family (global test, last evaluated round, mean over seeds){suffix}")
    return fig


# ------------------------------------------------------------------------------------------- sweep

_SWEEP_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")  # with tab10 colours: rows are not numbered here


def plot_sweep_gain(table: pd.DataFrame, path: Path) -> Path:
    """One line per method row of a sweep table (:func:`fedbench.reporting.sweep.build_sweep`): x = the swept
    value, y = the paired gain in mean_acc over the reference, error bars = its 95% interval, a line
    at 0; the legend sits below the axes (the figure grows with the rows), so long labels such as
    an ablation ladder's never squeeze the plot. Rows are dodged a little along
    x so their bars do not hide each other; non-numeric values are evenly spaced categories."""
    from matplotlib import colormaps

    attrs = table.attrs
    short, values = attrs["short"], list(attrs["values"])
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    xs = [float(v) for v in values] if numeric else list(range(len(values)))
    position = dict(zip(values, xs, strict=True))
    labels = list(pd.unique(table["method"]))
    span = (max(xs) - min(xs)) or 1.0
    step = min(0.012 * span, 0.25 * span / max(len(labels), 1))

    fig = new_figure(figsize=(9, 4.5 + 0.24 * len(labels)), layout="constrained")
    ax = fig.add_subplot()
    ax.axhline(0.0, color="grey", linewidth=1, linestyle="--")
    for i, label in enumerate(labels):
        rows = table[(table["method"] == label) & table["mean_acc"].notna()]
        rows = rows.assign(_x=rows[short].map(position)).sort_values("_x")
        if rows.empty:
            continue
        shift = (i - (len(labels) - 1) / 2) * step
        err = np.vstack([rows["mean_acc"] - rows["mean_acc_lo"], rows["mean_acc_hi"] - rows["mean_acc"]])
        ax.errorbar(
            rows["_x"] + shift,
            rows["mean_acc"],
            yerr=np.nan_to_num(err),
            fmt=_SWEEP_MARKERS[i % len(_SWEEP_MARKERS)],
            linestyle=("-", "--", ":")[i // 10 % 3],  # ten distinct colours, then the line style changes
            color=colormaps["tab10"](i % 10),
            capsize=3,
            markersize=5,
            linewidth=1.2,
            label=label,
        )
    ax.set_xticks(xs, [_tick(v) for v in values])
    ax.set(xlabel=attrs["field"], ylabel=f"mean_acc − {attrs['reference']} (paired, 95% t-interval)")
    fig.suptitle(
        f"Paired gain in mean_acc over {attrs['reference']} vs {attrs['field']}"
        + (" (SYNTHETIC data)" if attrs.get("synthetic") else "")
        + f"\nerror bars: {PAIRED_INTERVAL}"
    )
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", fontsize="small", title="method row", ncols=1)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def plot_versus(table: pd.DataFrame, order: list[str] | None = None) -> Figure:
    """Every row's paired gain in mean_acc over the reference row of a versus table
    (:func:`fedbench.reporting.board.build_versus`): one horizontal 95% t-interval per row, a line at
    0, the mean and its marks (* interval excludes 0, † also after Holm) written beside it and the
    seeds both rows ran in the row's label. Rows follow ``order`` (e.g. the protocol's, an ablation
    ladder's), then the table's order."""
    from fedbench.reporting.text import gain_text

    attrs = table.attrs
    ranked = [label for label in (order or []) if label in set(table["method"])]
    labels = ranked + [label for label in table["method"] if label not in ranked]
    rows = table.set_index("method").loc[labels]
    fig = new_figure(figsize=(8 + 0.06 * max(map(len, labels)), 1.6 + 0.42 * len(labels)), layout="constrained")
    ax = fig.add_subplot()
    ax.axvline(0.0, color="grey", linewidth=1, linestyle="--")
    ys = np.arange(len(labels))[::-1]
    for y, (_, row) in zip(ys, rows.iterrows(), strict=True):
        mean, lo, hi = row["mean_acc"], row.get("mean_acc_lo", np.nan), row.get("mean_acc_hi", np.nan)
        if pd.isna(mean):
            continue
        bounds = np.array([[mean - lo], [hi - mean]]) if pd.notna(lo) else None
        ax.errorbar([mean], [y], xerr=bounds, fmt="o", color="tab:blue", capsize=4, markersize=5)
        ax.annotate(
            gain_text(mean, lo, hi, row.get("p_holm", np.nan)),
            (hi if pd.notna(hi) else mean, y),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    ax.set_yticks(ys, [f"{label} ({int(rows.loc[label, 'seeds'])} seeds)" for label in labels], fontsize=8)
    ax.margins(x=0.6)  # room for the text beside the widest interval
    ax.set_xlabel(f"mean_acc − {attrs['reference']}")
    ax.grid(axis="x", alpha=0.3)
    fig.suptitle(
        f"Paired gain in mean_acc over {attrs['reference']}"
        + (" (SYNTHETIC data)" if attrs.get("synthetic") else "")
        + f"\nerror bars: {PAIRED_INTERVAL}; {attrs.get('comparisons', 0)} comparisons (Holm: †)",
        fontsize=10,
    )
    return fig


def _tick(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
