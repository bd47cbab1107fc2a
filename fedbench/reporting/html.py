"""One self-contained HTML page of a results directory, and its plots as PNG files beside it.

:func:`write_report` reads the records once and writes ``FILE.html`` (images embedded as base64 PNG,
inline CSS and a few lines of JavaScript to sort the table: nothing is fetched to view it) and
``<stem>_<plot>.png`` next to it. The page holds:

- the leaderboard with its 95% intervals, sortable by any column (``#`` numbers the rows, and the
  same number marks the row in every plot);
- accuracy against total communication, one point per row with error bars, the Pareto front marked
  (``acc_vs_comm``);
- accuracy per evaluated round, one panel per task family (``acc_per_round``);
- uplink and downlink MB per round per row (``bytes_per_round``);
- the distribution of per-client accuracy per row (``client_acc``);
- the expert-usage heatmaps with each router's entropy and I(task; expert) (``expert_usage``);
- the protocol, its hash, the library versions and the device.

Plots use bare :class:`matplotlib.figure.Figure` objects (Agg canvas); nothing touches pyplot state.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from fedbench.reporting.board import (
    _BYTES_COLS,
    MAJORITY,
    _cell,
    _completed,
    _footnotes,
    _last_round_evals,
    _main_columns,
    build_leaderboard,
    build_usage,
)
from fedbench.reporting.compare import ALL_TASKS, task_groups
from fedbench.reporting.statistics import INTERVAL
from fedbench.reporting.terminal_table import wrap_label
from fedbench.utils.records import read_records

PLOTS = ("acc_vs_comm", "acc_per_round", "bytes_per_round", "client_acc", "expert_usage")
SECTIONS = ("leaderboard", *(p.replace("_", "-") for p in PLOTS), "provenance")
DPI = 110
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<")  # 8 markers against 20 colours: no pair repeats
_LEGEND_WIDTH = 46  # characters per legend line before a label wraps at its options
# column meanings, shown as header tooltips (README "What is measured")
_MEANINGS = {
    "mean_acc": f"mean of the acc_<task> columns: global test set, {INTERVAL}",
    "local_acc": "each client's model on its own test split, mean over its tasks, then over clients",
    "worst_client_acc": "lowest client mean over its own tasks on its own test split",
    "p_acc": "FedDPA's P: each client's model on the global test set, its own tasks",
    "ttp_acc": "FedDPA's TTP: each client's model on the global test set, all tasks",
    "converged": "rising: mean_acc still gained more than its CI half-width late in training",
    "up_mb_per_round": "uplink MB per round, all sampled clients (MB = 10^6 bytes)",
    "down_mb_per_round": "downlink MB per round, all sampled clients",
    "total_mb": "uplink + downlink MB over the whole run",
    "compute_s": "client training time summed over the run (see device and timer)",
    "params_trainable": "trainable parameters",
    "params_shared": "parameters that cross the network",
    "params_local": "parameters that never leave a client",
}


@dataclass(frozen=True)
class _Style:
    number: int
    color: tuple
    marker: str


def _styles(labels: list[str]) -> dict[str, _Style]:
    """Row label -> its number (leaderboard order, from 1), colour and marker, the same in every plot.
    tab20's dark shades come first, then the light ones, so neighbouring rows differ in hue."""
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return {
        label: _Style(i + 1, colormaps["tab20"](order[i % 20]), _MARKERS[i % len(_MARKERS)])
        for i, label in enumerate(labels)
    }


def _legend_label(style: _Style, label: str) -> str:
    return "\n".join(wrap_label(f"{style.number}  {label}", _LEGEND_WIDTH, indent="      "))


def _png(fig: Figure) -> bytes:
    """The figure as PNG in a 256-colour palette: a third of the size, and no pixel off by more than
    a few levels (maximum-coverage quantization keeps rare colours such as small markers)."""
    from PIL import Image

    raw = io.BytesIO()
    fig.savefig(raw, format="png", dpi=DPI)
    palette = Image.open(raw).convert("RGB").quantize(256, method=Image.Quantize.MAXCOVERAGE)
    out = io.BytesIO()
    palette.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _figure_legend(fig: Figure, handles: list, labels: list[str], ncols: int) -> None:
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize="small", frameon=False)


def _legend_rows(n: int, ncols: int) -> int:
    return -(-n // ncols)


# ------------------------------------------------------------------------------------------- plots


def _pareto(points: pd.DataFrame) -> pd.DataFrame:
    """Rows no other row beats on both fewer total MB and higher mean_acc (means), by increasing MB."""
    ordered = points.sort_values(["total_mb", "mean_acc"], ascending=[True, False])
    front, best = [], -np.inf
    for label, row in ordered.iterrows():
        if row["mean_acc"] > best:
            front.append(label)
            best = row["mean_acc"]
    return ordered.loc[front]


def _dense_cluster(xs: pd.Series) -> pd.Index | None:
    """Labels of the largest group of x values that sit close together (split where neighbours are
    more than a tenth of the whole range apart), when it is worth a zoomed panel: at least four
    rows, spanning at most a quarter of the range, and not every row."""
    if len(xs) < 5:
        return None
    ordered = xs.sort_values()
    span = ordered.iloc[-1] - ordered.iloc[0]
    if span <= 0:
        return None
    groups, current = [], [ordered.index[0]]
    for prev, label in zip(ordered.index[:-1], ordered.index[1:], strict=True):
        if ordered[label] - ordered[prev] > 0.1 * span:
            groups.append(current)
            current = []
        current.append(label)
    groups.append(current)
    best = max(groups, key=len)
    if len(best) < 4 or len(best) == len(xs) or ordered[best].max() - ordered[best].min() > 0.25 * span:
        return None
    return pd.Index(best)


def plot_acc_vs_comm(board: pd.DataFrame, styles: dict[str, _Style], suffix: str) -> Figure:
    """mean_acc (95% CI) against total MB (± std over seeds), one point per row, the Pareto front
    as a staircase; a row that is not federated and the majority answer as horizontal lines; a
    zoomed panel for a dense cluster of rows."""
    rows = board[board["method"] != MAJORITY].set_index("method")
    points = rows[rows["total_mb"].notna()]
    front = _pareto(points)
    cluster = _dense_cluster(points["total_mb"])
    n_panels = 1 if cluster is None else 2
    n_legend = len(rows) + 2
    ncols = 2 if n_panels == 1 else 3
    fig = Figure(dpi=DPI, figsize=(7.5 * n_panels, 5.2 + 0.3 * _legend_rows(n_legend, ncols)), layout="constrained")
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
                labels.append(_legend_label(style, label))
        # the front as a staircase, held level to the largest MB: what a budget of x MB can reach
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
        numbers.append((ax, _point_numbers(numbered, styles)))
        for label, row in rows[rows["total_mb"].isna()].iterrows():  # not federated: no bytes to plot
            line = ax.axhline(row["mean_acc"], color=styles[label].color, linestyle=":", linewidth=1.5)
            if panel == 0:
                handles.append(line)
                labels.append(_legend_label(styles[label], f"{label} (not federated: no bytes)"))
        majority = board.loc[board["method"] == MAJORITY, "mean_acc"]
        if not majority.empty and panel == 0:
            handles.append(ax.axhline(majority.iloc[0], color="grey", linestyle="--", linewidth=1))
            labels.append(f"{MAJORITY} answer")
        ax.grid(alpha=0.3)
        ax.set_xlabel("total communication per run (MB, uplink + downlink)")
        ax.set_ylabel("mean accuracy, global test (95% t-interval over seeds)")
        if panel == 0:
            handles.append((step[0],))
            labels.append("Pareto front (fewer MB, higher mean accuracy)")
            ax.set_title(f"All rows{suffix}")
        else:
            lo_x, hi_x = points.loc[cluster, "total_mb"].agg(["min", "max"])
            pad = max(0.06 * (hi_x - lo_x), 0.05)
            ys = points.loc[cluster, ["mean_acc_lo", "mean_acc_hi"]] if "mean_acc_lo" in points else None
            lo_y = (ys.min().min() if ys is not None else points.loc[cluster, "mean_acc"].min()) - 0.005
            hi_y = (ys.max().max() if ys is not None else points.loc[cluster, "mean_acc"].max()) + 0.005
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
    _figure_legend(fig, handles, labels, ncols)
    rings = list(zip(front["total_mb"], front["mean_acc"], strict=True))
    fig.draw_without_rendering()  # the constrained layout, once: final axes positions for the labels
    for ax, items in numbers:
        _place_labels(fig, ax, items, rings)
    return fig


def _place_labels(
    fig: Figure, ax, items: list[tuple[float, float, str]], rings: list[tuple[float, float]] = ()
) -> None:
    """Write each ``text`` near its point ``(x, y)`` where it overlaps no other label, no point and
    no ring (``rings``: points circled as the Pareto front): the first free spot of a few rings of
    offsets around the point, joined to it by a thin line when away from it (the least crowded spot
    when none is free). Call it once the layout is final (``fig.draw_without_rendering()``); the
    labels stay out of the layout, so they never move the axes."""
    scale = fig.dpi / 72.0
    size = 8.0
    to_px = ax.transData.transform
    frame = ax.get_window_extent()
    points = [to_px((x, y)) for x, y, _ in items]
    taken = [(px - 4 * scale, py - 4 * scale, px + 4 * scale, py + 4 * scale) for px, py in points]
    r = 9.5 * scale  # the rings drawn with s=260 points^2
    taken += [(px - r, py - r, px + r, py + r) for px, py in (to_px(p) for p in rings)]
    radii = [(6, 3), (12, 9), (20, 16), (30, 24), (42, 34)]
    angles = np.deg2rad([30, -30, 150, -150, 90, -90, 0, 180])
    offsets = [(a * np.cos(t) * 1.4, b * np.sin(t) * 1.6) for a, b in radii for t in angles]

    def clash(box) -> float:
        area = 0.0
        for b in taken:
            w, h = min(box[2], b[2]) - max(box[0], b[0]), min(box[3], b[3]) - max(box[1], b[1])
            area += max(w, 0) * max(h, 0)
        inside = frame.x0 <= box[0] and box[2] <= frame.x1 and frame.y0 <= box[1] and box[3] <= frame.y1
        return area + (0 if inside else 1e9)

    for (x, y, text), (px, py) in sorted(zip(items, points, strict=True), key=lambda t: (-t[1][1], t[1][0])):
        w, h = 0.62 * size * len(text) * scale, 1.1 * size * scale
        boxes = []
        for dx, dy in offsets:
            x0 = px + dx * scale if dx >= 0 else px + dx * scale - w
            boxes.append(((dx, dy), (x0, py + dy * scale - h / 2, x0 + w, py + dy * scale + h / 2)))
        free = [b for b in boxes if clash(b[1]) == 0]
        (dx, dy), box = free[0] if free else min(boxes, key=lambda b: clash(b[1]))
        taken.append(box)
        _annotate(ax, text, (x, y), (dx, dy), size, far=abs(dx) > 8 or abs(dy) > 6)


def _place_line_ends(fig: Figure, ax, items: list[tuple[float, float, str]]) -> None:
    """Labels for the ends of lines, in a column to the right of them: sorted by height and pushed
    apart just enough not to overlap (within the axes), each joined to its line's end. Ends equal to
    three decimals share one label ("11=12")."""
    if not items:
        return
    scale = fig.dpi / 72.0
    size = 7.5
    h = 1.15 * size * scale
    frame = ax.get_window_extent()
    spots: dict[tuple, list[str]] = {}
    for x, y, text in items:  # equal to the three decimals the table shows: one label
        spots.setdefault((x, round(y, 3)), []).append(text)
    ends = sorted((*ax.transData.transform((x, y))[::-1], "=".join(sorted(t, key=int))) for (x, y), t in spots.items())
    wanted = [py for py, _, _ in ends]
    placed = list(wanted)
    for i in range(1, len(placed)):  # upwards: each at least one line above the one below
        placed[i] = max(placed[i], placed[i - 1] + h)
    placed[-1] = min(placed[-1], frame.y1 - h / 2)
    for i in range(len(placed) - 2, -1, -1):  # then down from the top, inside the axes
        placed[i] = min(placed[i], placed[i + 1] - h)
    shift = max(0.0, frame.y0 + h / 2 - placed[0])
    placed = [p + shift for p in placed]
    column = max(px for _, px, _ in ends) + 14 * scale
    for (py, px, text), y_label in zip(ends, placed, strict=True):
        x, y = ax.transData.inverted().transform((px, py))
        dx, dy = (column - px) / scale, (y_label - py) / scale
        _annotate(ax, text, (x, y), (dx, dy), size, far=True)


def _annotate(ax, text: str, xy: tuple[float, float], offset: tuple[float, float], size: float, far: bool) -> None:
    note = ax.annotate(
        text,
        xy,
        xytext=offset,
        textcoords="offset points",
        ha="left" if offset[0] >= 0 else "right",
        va="center",
        fontsize=size,
        zorder=5,
        arrowprops={"arrowstyle": "-", "color": "grey", "linewidth": 0.5, "shrinkA": 0, "shrinkB": 3} if far else None,
    )
    note.set_in_layout(False)


def _point_numbers(points: pd.DataFrame, styles: dict[str, _Style]) -> list[tuple[float, float, str]]:
    """One label per spot: rows on the same spot (e.g. two bit-identical rows) share it, as "11=12"."""
    spots: dict[tuple, list[int]] = {}
    where: dict[tuple, tuple[float, float]] = {}
    for label, row in points.iterrows():
        key = (round(row["total_mb"], 1), round(row["mean_acc"], 3))
        spots.setdefault(key, []).append(styles[label].number)
        where.setdefault(key, (row["total_mb"], row["mean_acc"]))
    return [(*where[k], "=".join(map(str, sorted(n)))) for k, n in spots.items()]


def _family_curves(recs: pd.DataFrame, groups: dict[str, list[str]]) -> dict[str, pd.DataFrame]:
    """Family -> (rounds trained × label) seed-mean global accuracy over the family's tasks."""
    glob = recs[(recs["kind"] == "eval") & (recs["scope"] == "global")]
    out = {}
    for family, tasks in groups.items():
        per_run = glob[glob["task"].isin(tasks)].groupby(["label", "run_id", "round"])["value"].mean()
        curves = per_run.groupby(level=["label", "round"]).mean().unstack("label")
        curves.index = curves.index.astype(int) + 1  # record round r follows r + 1 rounds of training
        out[family] = curves
    return out


def plot_acc_per_round(
    recs: pd.DataFrame, board: pd.DataFrame, styles: dict[str, _Style], groups: dict[str, list[str]], suffix: str
) -> Figure:
    """One panel per task family (and mean_acc, all tasks): seed-mean global accuracy at every
    evaluated round, one line per row, the majority answer dashed."""
    curves = _family_curves(recs, groups)
    majority = board[board["method"] == MAJORITY]
    n = len(curves)
    cols = min(3, n)
    rows_n = -(-n // cols)
    labels = [m for m in board["method"] if m != MAJORITY]
    ncols = 3
    legend_height = 0.3 * _legend_rows(len(labels) + 1, ncols)
    fig = Figure(dpi=DPI, figsize=(4.6 * cols, 3.5 * rows_n + legend_height), layout="constrained")
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
            handles.setdefault(_legend_label(style, label), line)
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
    fig.suptitle(
        f"Accuracy per evaluated round (after rounds {', '.join(map(str, evaluated))}), mean over seeds{suffix}"
    )
    _figure_legend(fig, list(handles.values()), list(handles), ncols)
    fig.draw_without_rendering()  # the constrained layout, once: final axes positions for the labels
    for ax, items in ends:
        _place_line_ends(fig, ax, items)
    return fig


def _bytes_per_round(recs: pd.DataFrame) -> pd.DataFrame:
    """Per label: up and down MB per round (mean over rounds and seeds) and their min and max over
    every round of every seed."""
    train = recs[recs["kind"] == "train"]
    per_round = train.groupby(["label", "run_id", "round"])[["up_bytes", "down_bytes"]].sum() / 1e6
    grouped = per_round.groupby(level="label")
    out = grouped.mean().join(grouped.min().add_suffix("_min")).join(grouped.max().add_suffix("_max"))
    return out


def _row_axis(ax, labels: list[str], styles: dict[str, _Style]) -> None:
    ax.set_yticks(range(len(labels)), [_legend_label(styles[m], m) for m in labels], fontsize=8)
    ax.set_ylim(len(labels) - 0.5, -0.5)  # first row on top


def plot_bytes_per_round(
    recs: pd.DataFrame, board: pd.DataFrame, styles: dict[str, _Style], suffix: str
) -> tuple[Figure, float]:
    """Horizontal bars per row: uplink and downlink MB per round (mean over rounds and seeds), with
    whiskers from the smallest to the largest round; also the largest relative spread over rounds."""
    labels = [m for m in board["method"] if m != MAJORITY]
    data = _bytes_per_round(recs).reindex(labels)
    federated = board.set_index("method")["federated"]
    height = 0.38
    lines = sum(len(_legend_label(styles[m], m).split("\n")) for m in labels)
    fig = Figure(dpi=DPI, figsize=(10, 1.6 + 0.2 * lines + 0.12 * len(labels)), layout="constrained")
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
    ev = _last_round_evals(recs)
    client = ev[ev["scope"] == "client"]
    per = client.groupby(["label", "run_id", "client"])["value"].mean()
    return per.rename("value").reset_index()


def plot_client_acc(recs: pd.DataFrame, board: pd.DataFrame, styles: dict[str, _Style], suffix: str) -> Figure:
    """Per row: a box plot of its clients' accuracies (every client of every seed), the points
    themselves (jittered), and the mean (local_acc) as a white diamond."""
    labels = [m for m in board["method"] if m != MAJORITY]
    scores = _client_scores(recs)
    lines = sum(len(_legend_label(styles[m], m).split("\n")) for m in labels)
    fig = Figure(dpi=DPI, figsize=(10, 1.6 + 0.2 * lines + 0.12 * len(labels)), layout="constrained")
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


def plot_expert_usage(usage: pd.DataFrame, styles: dict[str, _Style], suffix: str) -> Figure:
    """One heatmap per routed row (task family × expert, mean routing weight on the global test
    set), titled with the router's entropy and I(task; expert) in nats."""
    main = usage[_main_columns(usage)]
    methods = [m for m in styles if m in set(main["method"])]
    n = len(methods)
    cols = min(3, n)
    rows_n = -(-n // cols)
    fig = Figure(dpi=DPI, figsize=(4.6 * cols, 3.9 * rows_n + 0.6), layout="constrained")
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
        title = _legend_label(styles[label], label)
        ax.set_title(title + ("\n" + ", ".join(stats) + " nats" if stats else ""), fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=fig.axes, shrink=0.5, label="mean routing weight")
    fig.suptitle(f"Expert usage per task family (global test, last evaluated round, mean over seeds){suffix}")
    return fig


# -------------------------------------------------------------------------------------------- page


_CSS = """
:root { --fg: #1b1f24; --muted: #57606a; --line: #d0d7de; --head: #f6f8fa; --warn: #fff8c5; }
* { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--fg);
       margin: 0 auto; padding: 16px; max-width: 1480px; }
h1 { font-size: 1.5em; margin: 0.2em 0; } h2 { font-size: 1.2em; margin-top: 1.8em;
     border-bottom: 1px solid var(--line); padding-bottom: 0.2em; }
p, li { max-width: 75ch; } .muted { color: var(--muted); font-size: 0.9em; }
.warn { background: var(--warn); border: 1px solid #d4a72c; padding: 6px 10px; border-radius: 6px; }
nav { display: flex; flex-wrap: wrap; gap: 2px 16px; } nav a { white-space: nowrap; }
.scroll { overflow-x: auto; border: 1px solid var(--line); border-radius: 6px; width: fit-content; max-width: 100%; }
table { border-collapse: collapse; font-size: 12.5px; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 6px; border-bottom: 1px solid var(--line); text-align: right; vertical-align: top; }
th { background: var(--head); position: sticky; top: 0; cursor: pointer; user-select: none; white-space: nowrap; }
th.text, td.text { text-align: left; }
th[aria-sort="ascending"]::after { content: " ▲"; } th[aria-sort="descending"]::after { content: " ▼"; }
td.label { text-align: left; min-width: 11em; max-width: 20em; }
td .sub { display: block; color: var(--muted); font-size: 0.85em; white-space: nowrap; }
tr.front td.label::after { content: " ◆"; color: #0969da; }
tfoot td { color: var(--muted); }
.num { width: 2.6em; min-width: 2.6em; max-width: 2.6em; }
.sticky { position: sticky; left: 0; background: white; z-index: 1; } .sticky.second { left: 2.6em; }
th.sticky { z-index: 2; background: var(--head); } td.sticky.second { box-shadow: 1px 0 0 var(--line); }
figure { margin: 0.6em 0 0; } figcaption { color: var(--muted); font-size: 0.9em; max-width: 75ch; }
.fig { overflow-x: auto; } .fig img { max-width: 100%; height: auto; cursor: zoom-in; display: block; }
.fig img.zoom { max-width: none; cursor: zoom-out; }
pre { background: var(--head); padding: 8px; overflow-x: auto; font-size: 12px; border-radius: 6px; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; } dt { font-weight: 600; }
dd { margin: 0; overflow-wrap: anywhere; }
@media (max-width: 700px) { body { padding: 10px; font-size: 14px; } table { font-size: 12px; }
  td.label { min-width: 0; max-width: 11.5em; } dl { grid-template-columns: 1fr; } dd { margin-bottom: 6px; }
  pre { white-space: pre-wrap; overflow-wrap: anywhere; } }
"""

_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    th.tabIndex = 0;
    var sort = function () {
      var asc = th.getAttribute('aria-sort') !== 'ascending';
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute('aria-sort'); });
      th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var key = function (row) {
        var cell = row.cells[col], v = cell.getAttribute('data-v');
        if (v === null) { return cell.textContent.trim(); }
        return v === '' ? null : parseFloat(v);
      };
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null || y === null) { return x === y ? 0 : (x === null ? 1 : -1); }
        var c = typeof x === 'number' ? x - y : String(x).localeCompare(String(y));
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    };
    th.addEventListener('click', sort);
    th.addEventListener('keydown', function (e) {
      if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); sort(); }
    });
  });
});
document.querySelectorAll('.fig img').forEach(function (img) {
  img.addEventListener('click', function () { img.classList.toggle('zoom'); });
});
"""


def _e(text: object) -> str:
    return html.escape(str(text))


def _label_html(label: str) -> str:
    """A row label that may break after its option separators (and nowhere else)."""
    return "".join(_e(ch) + ("<wbr>" if ch in "[,+" else "") for ch in label)


def _split_cell(text: str) -> tuple[str, str]:
    """ "0.384 [0.355, 0.417]" -> ("0.384", "[0.355, 0.417]"); "0.444 ± 0.024" -> ("0.444", "± 0.024")."""
    for sep in (" [", " ± "):
        if sep in text:
            head, _, tail = text.partition(sep)
            return head, sep.strip() + (" " if sep == " ± " else "") + tail
    return text, ""


def _table_notes(board: pd.DataFrame) -> list[str]:
    """The leaderboard's footnotes, the per-row seed counts said once when every row has as many."""
    notes = _footnotes(board)
    counts = sorted(set(board.attrs.get("n_seeds", {}).values()))
    if len(counts) == 1 and notes and notes[0].startswith("Higher acc is better"):
        notes[0] = f"Higher acc is better; ± = std over seeds ({counts[0]} per row); last eval round of completed runs."
    return notes


def _leaderboard_html(board: pd.DataFrame, styles: dict[str, _Style], front: set[str]) -> str:
    cols = _main_columns(board)
    numeric = {c: pd.api.types.is_numeric_dtype(board[c]) for c in cols}
    heads = ['<th class="sticky num" title="row number, as in the plots">#</th>']
    for col in cols:
        cls = "text sticky second" if col == "method" else ("" if numeric[col] else "text")
        meaning = _MEANINGS.get(col, f"global test set, {INTERVAL}" if col.startswith("acc_") else "")
        name = "row" if col == "method" else col.replace("_", "_<wbr>")
        heads.append(f'<th class="{cls}" title="{_e(meaning)}">{name}</th>')
    body, foot = [], []
    for _, row in board.iterrows():
        label = row["method"]
        number = styles[label].number if label in styles else ""
        cells = [f'<td class="sticky num" data-v="{number}">{number}</td>']
        for col in cols:
            if col == "method":
                cells.append(f'<td class="label text sticky second">{_label_html(label)}</td>')
                continue
            text = _cell(board, row, col)
            if not numeric[col]:
                cells.append(f'<td class="text">{_e(text)}</td>')
                continue
            value = row[col]
            head, sub = _split_cell(text)
            sub_html = f'<span class="sub">{_e(sub)}</span>' if sub else ""
            data_v = "" if pd.isna(value) else f"{float(value):.6g}"
            cells.append(f'<td data-v="{data_v}">{_e(head)}{sub_html}</td>')
        cls = ' class="front"' if label in front else ""
        (foot if label == MAJORITY else body).append(f"<tr{cls}>{''.join(cells)}</tr>")
    notes = "".join(f"<li>{_e(n)}</li>" for n in _table_notes(board))
    return (
        '<div class="scroll"><table class="sortable" id="leaderboard-table">'
        f"<thead><tr>{''.join(heads)}</tr></thead><tbody>{''.join(body)}</tbody>"
        f"<tfoot>{''.join(foot)}</tfoot></table></div>"
        '<p class="muted">Click a column header to sort (again to reverse); the majority row stays last. '
        "On a narrow screen, scroll the table sideways: the # and row columns stay in place. "
        "◆ marks the rows on the Pareto front of accuracy vs communication. Hover a header for its meaning."
        f"</p><ul class='muted'>{notes}</ul>"
    )


def _figure_html(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><div class="fig"><img alt="{_e(alt)}" src="data:image/png;base64,{data}"></div>'
        f"<figcaption>{caption} <span class='muted'>(Click or tap the figure to see it at full size.)</span>"
        "</figcaption></figure>"
    )


def _usage_table_html(usage: pd.DataFrame, styles: dict[str, _Style]) -> str:
    if "entropy" not in usage:
        return ""
    per = usage.drop_duplicates("method").set_index("method")
    rows = []
    for label in [m for m in styles if m in per.index]:
        r = per.loc[label]
        cells = [f'<td data-v="{styles[label].number}">{styles[label].number}</td>']
        cells.append(f'<td class="label text">{_label_html(label)}</td>')
        for col in ("entropy", "mutual_info"):
            mean, std = r.get(col), r.get(f"{col}_std")
            sub = f'<span class="sub">± {std:.3f}</span>' if pd.notna(std) else ""
            cells.append(f'<td data-v="{mean:.6g}">{mean:.3f}{sub}</td>' if pd.notna(mean) else '<td data-v=""></td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (
        '<div class="scroll"><table class="sortable"><thead><tr><th>#</th><th class="text">row</th>'
        '<th title="mean per-row routing entropy (nats)">entropy</th>'
        '<th title="I(task; expert), tasks weighted equally (nats)">I(task; expert)</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
        '<p class="muted">In nats, each client\'s model on every task of the global test set, mean over clients, '
        "then mean ± std over seeds. 0 = the routing ignores the task; log T = one expert per task.</p>"
    )


def _provenance_html(results: Path, recs: pd.DataFrame, board: pd.DataFrame) -> str:
    runs = recs[recs["kind"] == "run"]
    attrs = board.attrs

    def distinct(col: str) -> list:
        if col not in runs:
            return []
        values = (
            runs[col].dropna().map(lambda v: ", ".join(f"{k} {v[k]}" for k in v) if isinstance(v, dict) else str(v))
        )
        return sorted(values.unique())

    versions: dict[str, set[str]] = {}
    for entry in runs["versions"].dropna() if "versions" in runs else []:
        for lib, ver in entry.items():
            versions.setdefault(lib, set()).add(str(ver))
    items = [
        ("protocol", "; ".join(f"{name} (hash {', '.join(h)})" for name, h in attrs.get("protocols", {}).items())),
        ("runs", f"{len(runs)} completed runs: {len(attrs.get('n_seeds', {}))} rows × seeds"),
        ("data", "SYNTHETIC: " + ", ".join(attrs.get("synthetic_suites", [])) if attrs.get("synthetic") else "real"),
        ("device", ", ".join(recs["device"].dropna().unique()) if "device" in recs else "unknown"),
        ("timer", ", ".join(attrs.get("timers", [])) or "unknown"),
        ("libraries", "; ".join(f"{lib} {', '.join(sorted(v))}" for lib, v in versions.items()) or "unknown"),
        ("machine", "; ".join(distinct("machine")) or "unknown"),
        ("git commit", ", ".join(distinct("git_commit")) or "unknown"),
        ("backbone", ", ".join(distinct("backbone")) + "; " + "; ".join(distinct("backbone_meta"))),
    ]
    command = results / "command.txt"
    if command.is_file():
        items.insert(1, ("command", command.read_text().strip()))
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items)
    toml = results / "protocol.toml"
    if toml.is_file():
        protocol = f"<h3>protocol.toml</h3><pre>{_e(toml.read_text())}</pre>"
    elif "protocol_config" in runs:
        config = runs["protocol_config"].dropna()
        text = json.dumps(config.iloc[0], indent=2) if len(config) else "{}"
        protocol = f"<h3>protocol (from the run records)</h3><pre>{_e(text)}</pre>"
    else:
        protocol = ""
    return f"<dl>{dl}</dl>{protocol}"


def write_report(results: Path, out: Path) -> list[Path]:
    """Write ``out`` (HTML) and its PNGs beside it (``<stem>_<plot>.png``); return every path written.
    Raises FileNotFoundError without records and ValueError without a completed run."""
    results, out = Path(results), Path(out)
    df = read_records(results)
    board = build_leaderboard(df)
    recs = _completed(df)
    usage = build_usage(df)
    labels = [m for m in board["method"] if m != MAJORITY]
    styles = _styles(labels)
    synthetic = bool(board.attrs.get("synthetic"))
    suffix = " (SYNTHETIC data)" if synthetic else ""
    tasks = sorted(c.removeprefix("acc_") for c in _main_columns(board) if c.startswith("acc_"))
    groups = task_groups(tasks)
    rows = board[board["method"] != MAJORITY].set_index("method")
    points = rows[rows["total_mb"].notna()]
    front = list(_pareto(points).index) if len(points) else []

    figures: list[tuple[str, Callable[[], Figure], str]] = []
    figures.append(("acc_vs_comm", lambda: plot_acc_vs_comm(board, styles, suffix), ""))
    figures.append(("acc_per_round", lambda: plot_acc_per_round(recs, board, styles, groups, suffix), ""))
    spread: list[float] = []

    def bytes_fig() -> Figure:
        fig, s = plot_bytes_per_round(recs, board, styles, suffix)
        spread.append(s)
        return fig

    figures.append(("bytes_per_round", bytes_fig, ""))
    figures.append(("client_acc", lambda: plot_client_acc(recs, board, styles, suffix), ""))
    if not usage.empty:
        figures.append(("expert_usage", lambda: plot_expert_usage(usage, styles, suffix), ""))

    out.parent.mkdir(parents=True, exist_ok=True)
    pngs: dict[str, bytes] = {}
    written = []
    for name, make, _ in figures:
        pngs[name] = _png(make())
        path = out.with_name(f"{out.stem}_{name}.png")
        _write_atomic(path, pngs[name])
        written.append(path)

    best = rows["mean_acc"].idxmax() if len(rows) else ""
    front_text = ", ".join(f"{styles[m].number} {m}" for m in front) or "none"
    n_seeds = sorted(set(board.attrs.get("n_seeds", {}).values()))
    seeds = f"{n_seeds[0]} seeds per row" if len(n_seeds) == 1 else "seeds per row: see the table notes"
    fed_bytes = [c for c in _BYTES_COLS if c in rows]
    no_bytes = [m for m in labels if rows.loc[m, fed_bytes].isna().all()] if fed_bytes else []
    sections = [
        (
            "leaderboard",
            "Leaderboard",
            f"<p>One row per method and option set, {seeds}; best mean_acc first (here {_e(best)}). "
            f"Accuracies: mean [{INTERVAL}; none with one seed]; other "
            "figures: mean ± std over seeds.</p>" + _leaderboard_html(board, styles, set(front)),
        ),
        (
            "acc-vs-comm",
            "Accuracy vs communication",
            _figure_html(
                pngs["acc_vs_comm"],
                "mean accuracy against total communication per row",
                "Each row's mean accuracy on the global test set (error bars: 95% t-interval over seeds) against its "
                "total uplink + downlink MB over the run (± std over seeds). The staircase and rings mark the "
                "Pareto front "
                f"(no other row has both fewer MB and a higher mean): {_e(front_text)}."
                + (
                    f" Rows that are not federated send nothing and appear as dotted lines: {_e(', '.join(no_bytes))}."
                    if no_bytes
                    else ""
                ),
            ),
        ),
        (
            "acc-per-round",
            "Accuracy per evaluated round, per task family",
            _figure_html(
                pngs["acc_per_round"],
                "accuracy per evaluated round per task family",
                "Global-test accuracy after each evaluated round, mean over seeds, one panel per task family and "
                "one for mean_acc (all tasks). Only the evaluated rounds are drawn (protocol <code>[eval] every"
                "</code>).",
            ),
        ),
        (
            "bytes-per-round",
            "Uplink and downlink per round",
            _figure_html(
                pngs["bytes_per_round"],
                "uplink and downlink MB per round per row",
                "Serialized payload bytes of all sampled clients in a round, uplink and downlink, mean over rounds "
                "and seeds; whiskers run from the smallest to the largest round (a span of at most "
                f"{100 * spread[0]:.1f}% of a row's mean here).",
            ),
        ),
        (
            "client-acc",
            "Per-client accuracy (fairness)",
            _figure_html(
                pngs["client_acc"],
                "distribution of per-client accuracy per row",
                "Each client's model on its own test split, mean over its own tasks, at the last evaluated "
                "round; every client of every seed is a point. The box spans the quartiles, the white diamond is "
                "the mean (local_acc); the leftmost point of a row is its worst client.",
            ),
        ),
        (
            "expert-usage",
            "Expert usage and routing entropy",
            (
                _figure_html(
                    pngs["expert_usage"],
                    "expert-usage heatmaps",
                    "For every row with a router or gate: the mean routing weight of each expert (column) on each "
                    "task family (row) of the global test set, last evaluated round, mean over seeds; titles give "
                    "the routing entropy and I(task; expert).",
                )
                + _usage_table_html(usage, styles)
            )
            if not usage.empty
            else "<p>No row in these results has a router or gate: no expert usage to show.</p>",
        ),
        ("provenance", "Protocol, versions and device", _provenance_html(results, recs, board)),
    ]
    protocols = "; ".join(f"{n} ({', '.join(h)})" for n, h in board.attrs.get("protocols", {}).items())
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{_e(title)}</h2>{content}</section>' for sid, title, content in sections)
    warning = (
        '<p class="warn"><strong>Synthetic data.</strong> The suite '
        f"{_e(', '.join(board.attrs.get('synthetic_suites', [])))} is procedurally generated: these numbers "
        "compare methods on it and say nothing about real tasks.</p>"
        if synthetic
        else ""
    )
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>fedbench report: {_e(protocols)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>fedbench report</h1><p class='muted'>Results <code>{_e(results.name or results)}</code>, "
        f"protocol {_e(protocols)}; written by <code>fedbench report</code>.</p>{warning}<nav>{nav}</nav></header>"
        f"<main>{body}</main><script>{_JS}</script></body></html>\n"
    )
    _write_atomic(out, page.encode("utf-8"))
    return [out, *written]


def _write_atomic(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` whole or is left as it was: written to ``<path>.tmp`` and moved into
    place; the ``.tmp`` file never stays behind, not even when the write or the move fails."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
