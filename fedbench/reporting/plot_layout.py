"""How every plot looks and where its text goes, and how a figure becomes a PNG file.

- each row's style (:class:`Style`: its number in leaderboard order, colour and marker, the same in
  every plot) and its wrapped legend label;
- numbered labels placed next to their points without overlapping each other or the points
  (:func:`place_labels`), labels for line ends in a column (:func:`place_line_ends`), and the
  dense cluster of points that earns a zoomed panel (:func:`dense_cluster`);
- the PNG encoding (a 256-colour palette, no metadata: the same bytes on every render of the same
  records) and an atomic write (:func:`save_png`, :func:`write_atomic`).

matplotlib is imported inside the functions that draw, so importing this module stays cheap; every
figure is a bare :class:`matplotlib.figure.Figure` (Agg canvas), nothing touches pyplot state.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from fedbench.reporting.terminal_table import wrap_label

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 110
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<")  # 8 markers against 20 colours: no pair repeats
LEGEND_WIDTH = 46  # characters per legend line before a label wraps at its options


@dataclass(frozen=True)
class Style:
    """A row's look in every plot: its number (leaderboard order, from 1), colour and marker."""

    number: int
    color: tuple
    marker: str


def row_styles(labels: list[str]) -> dict[str, Style]:
    """Row label -> its number (leaderboard order, from 1), colour and marker, the same in every plot.
    tab20's dark shades come first, then the light ones, so neighbouring rows differ in hue."""
    from matplotlib import colormaps

    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return {
        label: Style(i + 1, colormaps["tab20"](order[i % 20]), MARKERS[i % len(MARKERS)])
        for i, label in enumerate(labels)
    }


def legend_label(style: Style, label: str) -> str:
    """``"3  label"``, wrapped at the label's options to :data:`LEGEND_WIDTH` characters."""
    return "\n".join(wrap_label(f"{style.number}  {label}", LEGEND_WIDTH, indent="      "))


def new_figure(**kwargs) -> Figure:
    """A bare :class:`matplotlib.figure.Figure` (Agg canvas; no pyplot state)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def figure_legend(fig: Figure, handles: list, labels: list[str], ncols: int) -> None:
    """The figure's legend below its axes, where it can never hide a point."""
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize="small", frameon=False)


def legend_rows(n: int, ncols: int) -> int:
    """Lines a legend of ``n`` entries in ``ncols`` columns takes."""
    return -(-n // ncols)


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG in a 256-colour palette: a third of the size, and no pixel off by more than
    a few levels (maximum-coverage quantization keeps rare colours such as small markers)."""
    from PIL import Image

    raw = io.BytesIO()
    fig.savefig(raw, format="png", dpi=DPI)
    palette = Image.open(raw).convert("RGB").quantize(256, method=Image.Quantize.MAXCOVERAGE)
    out = io.BytesIO()
    palette.save(out, format="PNG", optimize=True)
    return out.getvalue()


def save_png(fig: Figure, path: Path) -> Path:
    """Write the figure to ``path`` (:func:`png_bytes`, :func:`write_atomic`); returns ``path``."""
    path = Path(path)
    write_atomic(path, png_bytes(fig))
    return path


def write_atomic(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` whole or is left as it was: written to ``<path>.tmp`` and moved into
    place; the ``.tmp`` file never stays behind, not even when the write or the move fails."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ label placement


def dense_cluster(xs: pd.Series) -> pd.Index | None:
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


def place_labels(fig: Figure, ax, items: list[tuple[float, float, str]], rings: list[tuple[float, float]] = ()) -> None:
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


def place_line_ends(fig: Figure, ax, items: list[tuple[float, float, str]]) -> None:
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


def point_numbers(points: pd.DataFrame, styles: dict[str, Style]) -> list[tuple[float, float, str]]:
    """One label per spot: rows on the same spot (e.g. two bit-identical rows) share it, as "11=12"."""
    spots: dict[tuple, list[int]] = {}
    where: dict[tuple, tuple[float, float]] = {}
    for label, row in points.iterrows():
        key = (round(row["total_mb"], 1), round(row["mean_acc"], 3))
        spots.setdefault(key, []).append(styles[label].number)
        where.setdefault(key, (row["total_mb"], row["mean_acc"]))
    return [(*where[k], "=".join(map(str, sorted(n)))) for k, n in spots.items()]
