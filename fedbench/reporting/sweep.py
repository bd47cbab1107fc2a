"""Sweeps: the same method rows at several values of one protocol field, and each row's paired
gain over a reference row at every value.

A protocol with a ``[sweep]`` table runs each variant (:meth:`fedbench.config.protocol.Protocol.variants`)
into ``<results>/<field>=<value>/``, a complete results directory of its own. The sweep report reads
those directories back: per value, :func:`fedbench.reporting.board.build_versus` (the paired t-interval
over seeds of :func:`fedbench.reporting.statistics.paired_differences`) of every row against the reference
row, written as ``sweep.md`` (mean_acc), ``sweep.csv`` (every figure, with interval ends) and
``sweep_gain.png``. A last column pools the values with the seed as the unit
(:func:`fedbench.reporting.statistics.pooled_difference`): a seed run at several values counts once, with the
mean of its differences there. The Holm adjustment runs over every mean_acc comparison of the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from fedbench.reporting.board import UnknownRowError, build_leaderboard, build_seed_values, build_versus
from fedbench.reporting.plots import plot_sweep_gain
from fedbench.reporting.statistics import INTERVAL, PAIRED_INTERVAL, holm, pooled_difference
from fedbench.reporting.text import gain_text, marks_note
from fedbench.utils.records import read_records

if TYPE_CHECKING:
    from fedbench.config.protocol import Protocol  # its import loads torch (fedbench.api.data)


def build_sweep(proto: Protocol, results: Path) -> pd.DataFrame:
    """One row per (swept value, method row other than the reference): the value (column named by
    the field's short name), ``method``, ``seeds`` (how many both rows ran), per figure
    (``acc_<task>``, ``mean_acc``) the paired difference to the reference with ``_lo``/``_hi``
    95% interval ends, the reference's own ``reference_mean_acc`` with its interval, and the
    variant's ``protocol_hash``, and the mean_acc difference's t-test ``p`` and ``p_holm``. Rows
    follow the protocol's method order (then any other label the records hold), values the sweep's
    order. ``attrs["pooled"]`` holds each row's difference pooled over the values with the seed as
    the unit (:func:`fedbench.reporting.statistics.pooled_difference`); the Holm adjustment runs over every
    mean_acc comparison, per value and pooled (``attrs["comparisons"]``).

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
    per_seed: dict[str, list[dict[int, float]]] = {}  # label -> per value: seed -> mean_acc difference
    seeds_at: dict[str, list[int]] = {}
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
        values = build_seed_values(records)
        ref_seeds = values[sweep.reference]["mean_acc"]
        seeds_at[sweep.dir_name(value)] = sorted(int(s) for s in ref_seeds.index)
        for label, row_values in values.items():
            if label != sweep.reference:
                diff = (row_values["mean_acc"] - ref_seeds).dropna()
                per_seed.setdefault(label, []).append({int(s): float(d) for s, d in diff.items()})
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
    labels = list(pd.unique(out["method"]))
    pooled = pd.DataFrame(
        [pooled_difference(per_seed.get(label, [])) for label in labels],
        index=pd.Index(labels, name="method"),
        columns=["seeds", "mean_acc", "mean_acc_lo", "mean_acc_hi", "p"],
    )
    adjusted = holm([*out["p"], *pooled["p"]])
    out["p_holm"], pooled["p_holm"] = adjusted[: len(out)], adjusted[len(out) :]
    all_seeds = [s for seeds in seeds_at.values() for s in seeds]
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
        "pooled": pooled,
        "comparisons": int(np.isfinite(adjusted).sum()),
        "seeds_at": seeds_at,
        "seeds_shared": len(all_seeds) != len(set(all_seeds)),
    }
    return out


def _gain(mean: float, lo: float, hi: float, p_holm: float, seeds: int, expected: int) -> str:
    """``+0.012 [-0.010, +0.030] *``: the paired mean_acc difference, its interval and marks
    (:func:`fedbench.reporting.text.gain_text`), and the seed count where it is short of ``expected``."""
    if not seeds or pd.isna(mean):
        return "n/a (no seed shared with the reference)"
    return gain_text(mean, lo, hi, p_holm) + (f" ({int(seeds)} seeds)" if seeds < expected else "")


def render_sweep(table: pd.DataFrame) -> str:
    """The sweep as markdown: one line per method row, one column per swept value and a last column
    pooled over the values, each cell the paired gain in mean_acc over the reference; a last line
    with the reference's own mean_acc."""
    attrs = table.attrs
    short, ref, pooled = attrs["short"], attrs["reference"], attrs["pooled"]
    values, columns, seeds_at = attrs["values"], attrs["dirs"], attrs["seeds_at"]
    n_pooled = len({s for seeds in seeds_at.values() for s in seeds})
    heads = [f"{column} ({len(seeds_at[column])} seeds)" for column in columns]
    lines = [
        f"**Sweep of `{attrs['field']}`: paired gain in mean_acc over `{ref}`**"
        + (" (SYNTHETIC data)" if attrs.get("synthetic") else ""),
        "",
        "| method | " + " | ".join(heads) + f" | pooled ({n_pooled} seeds) |",
        "|---|" + "---:|" * (len(columns) + 1),
    ]

    def esc(text: str) -> str:
        return str(text).replace("|", "\\|")

    for label in pd.unique(table["method"]):
        rows = table[table["method"] == label]
        cells = []
        for value, column in zip(values, columns, strict=True):
            hit = rows[rows[short] == value]
            if len(hit):
                row = hit.iloc[0]
                cell = [row["mean_acc"], row["mean_acc_lo"], row["mean_acc_hi"], row["p_holm"], row["seeds"]]
                cells.append(_gain(*cell, len(seeds_at[column])))
            else:
                cells.append("not run")
        p = pooled.loc[label]
        cells.append(_gain(p["mean_acc"], p["mean_acc_lo"], p["mean_acc_hi"], p["p_holm"], p["seeds"], n_pooled))
        lines.append(f"| {esc(label)} | " + " | ".join(cells) + " |")
    own = []
    for column in columns:
        mean, lo, hi = attrs["reference_mean_acc"][column]
        own.append(f"{mean:.3f}" if pd.isna(lo) else f"{mean:.3f} [{lo:.3f}, {hi:.3f}]")
    lines.append(f"| {esc(ref)} (reference: its own mean_acc) | " + " | ".join(own) + " | |")
    shared = (
        "some seeds ran at several values: each counts once, with the mean of its differences there"
        if attrs["seeds_shared"]
        else "every seed ran at one value only, so the pooled seeds are independent replicates"
    )
    notes = [
        f"Each cell: the row's mean_acc minus {ref}'s at that value [{PAIRED_INTERVAL}]; only the seeds both "
        f"rows ran count (the column's count unless noted). Pooled: over the values with the seed as the unit "
        f"({shared}). {marks_note(attrs['comparisons'])}, per value and pooled. Last line: {ref}'s own mean_acc "
        f"[{INTERVAL}]. Last eval round of completed runs.",
        f"Per-task differences (acc_<task>), interval ends and p-values: sweep.csv; each value's leaderboard: "
        f"{short}=<value>/leaderboard.md.",
        "Seeds per value: " + "; ".join(f"{c}: {_span(seeds_at[c])}" for c in columns) + ".",
    ]
    if attrs.get("incomplete"):
        notes.append(f"Left out (no completed run of {ref} yet): {', '.join(attrs['incomplete'])}.")
    if attrs.get("synthetic"):
        suites = ", ".join(attrs.get("synthetic_suites", []))
        notes.append(f"Data: SYNTHETIC (procedurally generated suite: {suites}), not a real-task result.")
    hashes = ", ".join(f"{name} ({h})" for name, h in attrs["protocol_hashes"].items())
    notes.append(f"Protocol {attrs['protocol']}; hash per value: {hashes}.")
    return "\n".join([*lines, "", *(f"_{note}_  " for note in notes)]) + "\n"


def _span(seeds: list[int]) -> str:
    """``0–9`` for a run of consecutive seeds, else the list."""
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}–{seeds[-1]}"
    return ", ".join(map(str, seeds))


def write_sweep_report(proto: Protocol, results: Path, plots: bool = True) -> tuple[pd.DataFrame, list[Path]]:
    """Write ``sweep.md``, ``sweep.csv`` and (with ``plots``) ``sweep_gain.png`` into ``results``
    from the records of its variant directories; returns the table and the paths written."""
    results = Path(results)
    table = build_sweep(proto, results)
    md, csv = results / "sweep.md", results / "sweep.csv"
    md.write_text(render_sweep(table))
    pooled = table.attrs["pooled"].reset_index().assign(**{table.attrs["short"]: "pooled"})
    csv.write_text(pd.concat([table, pooled], ignore_index=True).to_csv(index=False))
    paths = [md, csv]
    if plots:
        paths.append(plot_sweep_gain(table, results / "sweep_gain.png"))
    return table, paths
