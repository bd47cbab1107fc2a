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

The plots are :mod:`fedbench.reporting.plots`' (the same drawing as the PNGs a run writes), encoded by
:func:`fedbench.reporting.plot_layout.png_bytes`.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from fedbench.reporting.board import BYTES_COLS, MAJORITY, main_columns
from fedbench.reporting.plot_layout import Style, png_bytes, write_atomic
from fedbench.reporting.plots import (
    PLOTS,
    pareto,
    plot_acc_per_round,
    plot_acc_vs_comm,
    plot_bytes_per_round,
    plot_client_acc,
    plot_expert_usage,
    plot_inputs,
)
from fedbench.reporting.statistics import INTERVAL
from fedbench.reporting.text import footnotes, format_cell
from fedbench.utils.records import read_records

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SECTIONS = ("leaderboard", *(p.replace("_", "-") for p in PLOTS), "provenance")
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
    notes = footnotes(board)
    counts = sorted(set(board.attrs.get("n_seeds", {}).values()))
    if len(counts) == 1 and notes and notes[0].startswith("Higher acc is better"):
        notes[0] = f"Higher acc is better; ± = std over seeds ({counts[0]} per row); last eval round of completed runs."
    return notes


def _leaderboard_html(board: pd.DataFrame, styles: dict[str, Style], front: set[str]) -> str:
    cols = main_columns(board)
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
            text = format_cell(board, row, col)
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


def _usage_table_html(usage: pd.DataFrame, styles: dict[str, Style]) -> str:
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
    data = plot_inputs(read_records(results))
    board, recs, usage, styles, suffix = data.board, data.recs, data.usage, data.styles, data.suffix
    labels = list(styles)
    synthetic = bool(board.attrs.get("synthetic"))
    rows = board[board["method"] != MAJORITY].set_index("method")
    points = rows[rows["total_mb"].notna()]
    front = list(pareto(points).index) if len(points) else []

    figures: list[tuple[str, Callable[[], Figure]]] = []
    figures.append(("acc_vs_comm", lambda: plot_acc_vs_comm(board, styles, suffix)))
    figures.append(("acc_per_round", lambda: plot_acc_per_round(recs, board, styles, data.groups, suffix)))
    spread: list[float] = []

    def bytes_fig() -> Figure:
        fig, s = plot_bytes_per_round(recs, board, styles, suffix)
        spread.append(s)
        return fig

    figures.append(("bytes_per_round", bytes_fig))
    figures.append(("client_acc", lambda: plot_client_acc(recs, board, styles, suffix)))
    if not usage.empty:
        figures.append(("expert_usage", lambda: plot_expert_usage(usage, styles, suffix)))

    out.parent.mkdir(parents=True, exist_ok=True)
    pngs: dict[str, bytes] = {}
    written = []
    for name, make in figures:
        pngs[name] = png_bytes(make())
        path = out.with_name(f"{out.stem}_{name}.png")
        write_atomic(path, pngs[name])
        written.append(path)

    best = rows["mean_acc"].idxmax() if len(rows) else ""
    front_text = ", ".join(f"{styles[m].number} {m}" for m in front) or "none"
    n_seeds = sorted(set(board.attrs.get("n_seeds", {}).values()))
    seeds = f"{n_seeds[0]} seeds per row" if len(n_seeds) == 1 else "seeds per row: see the table notes"
    fed_bytes = [c for c in BYTES_COLS if c in rows]
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
    write_atomic(out, page.encode("utf-8"))
    return [out, *written]
