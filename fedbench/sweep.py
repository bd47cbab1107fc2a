"""Sweeps: the same method rows at several values of one protocol field, and each row's paired
gain over a reference row at every value.

A protocol with a ``[sweep]`` table runs each variant (:meth:`fedbench.protocol.Protocol.variants`)
into ``<results>/<field>=<value>/``, a complete results directory of its own. The sweep report reads
those directories back: per value, :func:`fedbench.leaderboard.build_versus` (the paired bootstrap
of :func:`fedbench.statistics.paired_differences`) of every row against the reference row, written
as ``sweep.md`` (mean_acc), ``sweep.csv`` (every figure, with interval ends) and ``sweep_gain.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fedbench.leaderboard import UnknownRowError, build_leaderboard, build_versus, plot_sweep_gain
from fedbench.protocol import Protocol
from fedbench.records import read_records
from fedbench.statistics import N_BOOT


def build_sweep(proto: Protocol, results: Path) -> pd.DataFrame:
    """One row per (swept value, method row other than the reference): the value (column named by
    the field's short name), ``method``, ``seeds`` (how many both rows ran), per figure
    (``acc_<task>``, ``mean_acc``) the paired difference to the reference with ``_lo``/``_hi``
    95% interval ends, the reference's own ``reference_mean_acc`` with its interval, and the
    variant's ``protocol_hash``. Rows follow the protocol's method order (then any other label the
    records hold), values the sweep's order.

    Only records carrying the variant's protocol hash count (a directory may also hold runs of an
    earlier protocol). A value whose directory holds no completed run of the reference is left out
    and named in ``attrs["incomplete"]``; raises FileNotFoundError when no value has one.
    """
    sweep = proto.sweep
    if sweep is None:
        raise ValueError(f"protocol '{proto.name}' declares no [sweep]")
    results = Path(results)
    order = [m.label for m in proto.methods]
    frames, incomplete, synthetic_suites, synthetic, hashes, own = [], [], set(), False, {}, {}
    for value, variant in proto.variants():
        sub = results / sweep.dir_name(value)
        try:
            records = read_records(sub)
            records = records[records["protocol_hash"] == variant.hash]
            versus = build_versus(records, sweep.reference)
        except (FileNotFoundError, UnknownRowError):
            incomplete.append(sweep.dir_name(value))
            continue
        except ValueError as err:
            if "no completed runs" not in str(err):
                raise
            incomplete.append(sweep.dir_name(value))
            continue
        board = build_leaderboard(records).set_index("method")
        ref = board.loc[sweep.reference]
        versus.insert(0, sweep.short, value)
        ref_acc = (ref["mean_acc"], ref.get("mean_acc_lo", np.nan), ref.get("mean_acc_hi", np.nan))
        versus["reference_mean_acc"], versus["reference_mean_acc_lo"], versus["reference_mean_acc_hi"] = ref_acc
        versus["protocol_hash"] = variant.hash
        rank = {label: i for i, label in enumerate([*order, *sorted(set(versus["method"]) - set(order))])}
        frames.append(versus.sort_values("method", key=lambda m: m.map(rank), kind="stable"))
        synthetic |= bool(versus.attrs.get("synthetic"))
        synthetic_suites.update(versus.attrs.get("synthetic_suites", []))
        hashes[sweep.dir_name(value)] = variant.hash
        own[sweep.dir_name(value)] = ref_acc
    if not frames:
        raise FileNotFoundError(
            f"no completed run of the reference row '{sweep.reference}' in any sweep directory under {results} "
            f"({', '.join(incomplete)}); run `fedbench run` first"
        )
    out = pd.concat(frames, ignore_index=True)
    out.attrs = {
        "what": "sweep",
        "field": sweep.field,
        "short": sweep.short,
        "values": [v for v in sweep.values if sweep.dir_name(v) not in incomplete],
        "dirs": [d for d in map(sweep.dir_name, sweep.values) if d not in incomplete],
        "reference": sweep.reference,
        "protocol": proto.name,
        "protocol_hashes": hashes,
        "reference_mean_acc": own,
        "incomplete": incomplete,
        "synthetic": synthetic,
        "synthetic_suites": sorted(synthetic_suites),
        "n_boot": N_BOOT,
    }
    return out


def _gain(row: pd.Series, most_seeds: int) -> str:
    """``+0.012 [-0.010, +0.030] *``: the paired mean_acc difference, its interval, * when it excludes 0."""
    if not row["seeds"] or pd.isna(row["mean_acc"]):
        return "n/a (no seed shared with the reference)"
    mean, lo, hi = row["mean_acc"], row["mean_acc_lo"], row["mean_acc_hi"]
    text = f"{mean:+.3f}" if pd.isna(lo) else f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]" + (" *" if lo > 0 or hi < 0 else "")
    return text + (f" ({int(row['seeds'])} seeds)" if row["seeds"] < most_seeds else "")


def render_sweep(table: pd.DataFrame) -> str:
    """The sweep as markdown: one line per method row, one column per swept value, each cell the
    paired gain in mean_acc over the reference; a last line with the reference's own mean_acc."""
    attrs = table.attrs
    short, ref = attrs["short"], attrs["reference"]
    values = attrs["values"]
    columns = attrs["dirs"]
    most = int(table["seeds"].max()) if len(table) else 0
    lines = [
        f"**Sweep of `{attrs['field']}`: paired gain in mean_acc over `{ref}`**"
        + (" (SYNTHETIC data)" if attrs.get("synthetic") else ""),
        "",
        "| method | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]

    def esc(text: str) -> str:
        return str(text).replace("|", "\\|")

    for label in pd.unique(table["method"]):
        rows = table[table["method"] == label]
        cells = []
        for value in values:
            hit = rows[rows[short] == value]
            cells.append(_gain(hit.iloc[0], most) if len(hit) else "not run")
        lines.append(f"| {esc(label)} | " + " | ".join(cells) + " |")
    own = []
    for column in columns:
        mean, lo, hi = attrs["reference_mean_acc"][column]
        own.append(f"{mean:.3f}" if pd.isna(lo) else f"{mean:.3f} [{lo:.3f}, {hi:.3f}]")
    lines.append(f"| {esc(ref)} (reference: its own mean_acc) | " + " | ".join(own) + " |")
    notes = [
        f"Each cell: the row's mean_acc minus {ref}'s at that value, paired over seeds and global-test examples, "
        f"with its 95% paired bootstrap interval (B={attrs['n_boot']}); * = the interval excludes 0; only the "
        f"seeds both rows ran count ({most} unless noted). Last line: {ref}'s own mean_acc [95% interval]. "
        "Last eval round of completed runs.",
        f"Per-task differences (acc_<task>) and interval ends: sweep.csv; each value's leaderboard: "
        f"{short}=<value>/leaderboard.md.",
    ]
    if attrs.get("incomplete"):
        notes.append(f"Left out (no completed run of {ref} yet): {', '.join(attrs['incomplete'])}.")
    if attrs.get("synthetic"):
        suites = ", ".join(attrs.get("synthetic_suites", []))
        notes.append(f"Data: SYNTHETIC (procedurally generated suite: {suites}), not a real-task result.")
    hashes = ", ".join(f"{name} ({h})" for name, h in attrs["protocol_hashes"].items())
    notes.append(f"Protocol {attrs['protocol']}; hash per value: {hashes}.")
    return "\n".join([*lines, "", *(f"_{note}_  " for note in notes)]) + "\n"


def write_sweep_report(proto: Protocol, results: Path, plots: bool = True) -> tuple[pd.DataFrame, list[Path]]:
    """Write ``sweep.md``, ``sweep.csv`` and (with ``plots``) ``sweep_gain.png`` into ``results``
    from the records of its variant directories; returns the table and the paths written."""
    results = Path(results)
    table = build_sweep(proto, results)
    md, csv = results / "sweep.md", results / "sweep.csv"
    md.write_text(render_sweep(table))
    csv.write_text(table.to_csv(index=False))
    paths = [md, csv]
    if plots:
        paths.append(plot_sweep_gain(table, results / "sweep_gain.png"))
    return table, paths
