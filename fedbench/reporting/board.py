"""Records -> tables: which runs count, one row per run, and the tables built from them.

Only completed runs count, and only each run's last eval round, so a crashed or still-running run
never mixes into the comparison. Every figure is computed per run first and then aggregated over
the runs (seeds) of a label, so the stds are seed-to-seed spreads. Accuracies are higher-is-better.
Global-test accuracies also get a 95% t-interval over seeds, the seed being the unit
(:mod:`fedbench.reporting.statistics`), and :func:`build_versus` the paired difference of every row to one,
with a Holm adjustment over the table's comparisons.

The tables are :func:`build_leaderboard`, :func:`build_versus`, :func:`build_steps`,
:func:`build_usage` and :func:`build_seed_values`; :mod:`fedbench.reporting.text` renders them,
:mod:`fedbench.reporting.plots` draws them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pandas as pd

from fedbench.reporting.statistics import Values, holm, paired_differences, row_intervals

Examples = dict[str, dict[int, dict[str, np.ndarray]]]  # label -> seed -> task -> per-example scores

MAJORITY = "majority"
BYTES_COLS = ["up_mb_per_round", "down_mb_per_round", "total_mb"]
TIME_COLS = ("compute_s", "compute_gflop")  # one decimal
COST_COLS = [*BYTES_COLS, *TIME_COLS]
PARAM_COLS = ["params_trainable", "params_shared", "params_local"]
COUNT_COLS = {*PARAM_COLS, "seeds"}
# CSV only: spreads and interval ends are shown in cells, the evaluation sample in a note
HIDDEN = ("_std", "_lo", "_hi", "federated", "eval_sample")
P_COLS = ("p", "p_holm")  # CSV only: a comparison's t-test p-value, raw and Holm-adjusted (marks * and †)
PER_METHOD = ("entropy", "mutual_info")  # usage-table columns that hold one figure per method
LATE = 0.8  # a row is "rising" when mean_acc still gains after this fraction of the rounds


def main_columns(board: pd.DataFrame) -> list[str]:
    """The columns a table shows as cells (markdown, terminal, HTML): all but the spreads, interval
    ends, p-values and other CSV-only columns (:data:`HIDDEN`, :data:`P_COLS`)."""
    return [c for c in board.columns if not c.endswith(HIDDEN) and c not in P_COLS]


class UnknownRowError(ValueError):
    """A row asked for by label that the records do not hold with per-example scores."""


class MixedProtocolsError(ValueError):
    """Records of several protocol hashes: a leaderboard ranks the runs of one protocol."""


def check_one_protocol(df: pd.DataFrame, where: str = "the records") -> None:
    """Raise :class:`MixedProtocolsError` (one line naming every hash, its protocol name and how many
    runs carry it) when the records hold runs of several protocol hashes."""
    if "protocol_hash" not in df:
        return
    hashes = df.dropna(subset=["protocol_hash"])
    if hashes["protocol_hash"].nunique() <= 1:
        return
    names = hashes.groupby("protocol_hash")["protocol"].agg(lambda n: ", ".join(sorted(set(map(str, n.dropna())))))
    runs = hashes.groupby("protocol_hash")["run_id"].nunique() if "run_id" in hashes else names.map(lambda _: 0)
    listed = "; ".join(f"{h} ({names[h] or '?'}, {runs[h]} run(s))" for h in sorted(names.index))
    raise MixedProtocolsError(
        f"{where} mix runs of {len(names)} protocols: {listed}; a leaderboard ranks one protocol: keep one "
        "protocol per results directory (move the other protocol's runs/<run_id> directories to their own)"
    )


def in_flight_runs(df: pd.DataFrame) -> list[str]:
    """Run ids with records but neither a completed ``kind="run"`` record nor a failure: runs in
    flight (or interrupted, resumable), which no leaderboard counts yet."""
    if "run_id" not in df or "kind" not in df:
        return []
    completed = df["completed"].eq(True) if "completed" in df else pd.Series(False, index=df.index)
    done = set(df.loc[(df["kind"] == "run") & completed, "run_id"]) | set(df.loc[df["kind"] == "failed", "run_id"])
    return sorted(set(df["run_id"].dropna()) - done)


def completed_records(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of completed runs only; a run counts once its kind="run" row says completed=True. Records
    of several protocol hashes are refused (:func:`check_one_protocol`)."""
    check_one_protocol(df)
    runs = df[df["kind"] == "run"]
    done = runs.loc[runs["completed"].eq(True), "run_id"] if "completed" in runs else runs["run_id"].iloc[:0]
    if done.empty:
        raise ValueError("no completed runs in the records (no kind='run' row with completed=True)")
    return df[df["run_id"].isin(done)]


def last_round_evals(recs: pd.DataFrame) -> pd.DataFrame:
    """Eval rows of each run's last eval round, per scope (global and client may be evaluated apart)."""
    ev = recs[recs["kind"] == "eval"]
    last = ev.groupby(["run_id", "scope"])["round"].transform("max")
    return ev[ev["round"] == last]


def _per_run(recs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """One row per completed run with every leaderboard figure; also the sorted task names."""
    runs = recs[recs["kind"] == "run"].set_index("run_id")
    out = runs[["label", "seed"]].copy()

    ev = last_round_evals(recs)
    glob = ev[ev["scope"] == "global"].pivot_table(index="run_id", columns="task", values="value")
    tasks = sorted(glob.columns)
    for task in tasks:
        out[f"acc_{task}"] = glob[task]
    out["mean_acc"] = glob[tasks].mean(axis=1)
    if "parse_fail" in ev:  # a generative VLM's rows: the share of its answers it could not parse, per task
        fails = ev[(ev["scope"] == "global") & ev["parse_fail"].notna()]
        for task, share in fails.pivot_table(index="run_id", columns="task", values="parse_fail").items():
            out[f"parse_fail_{task}"] = share

    # each client on its own test split over its own tasks: mean over clients, and the worst one
    client = ev[ev["scope"] == "client"].groupby(["run_id", "client", "task"])["value"].mean()
    per_client = client.groupby(level=["run_id", "client"]).mean().groupby(level="run_id")
    out["local_acc"] = per_client.mean()
    out["worst_client_acc"] = per_client.min()

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
    # a reference row that is not federated (centralized): bytes are n/a, not 0; absent = federated
    out["federated"] = runs["federated"].ne(False) if "federated" in runs else True
    out.loc[~out["federated"], BYTES_COLS] = np.nan
    out["compute_s"] = train.groupby("run_id")["compute_s"].sum()
    # FLOPs of every local update (fedbench.utils.flops); NaN for records made before they were counted
    flops = train["compute_flops"] if "compute_flops" in train else pd.Series(np.nan, index=train.index)
    out["compute_gflop"] = flops.groupby(train["run_id"]).sum(min_count=1) / 1e9

    for col in PARAM_COLS:
        out[col] = pd.to_numeric(runs[col])
    out["late_gain"] = _late_gain(recs, runs)
    sampling = _eval_sampling(recs)
    if sampling:
        out["eval_sample"] = pd.Series(sampling)
    return out, tasks


def _eval_sampling(recs: pd.DataFrame) -> dict[str, str]:
    """run_id -> "k of N" for the runs whose intermediate evaluations scored a seeded sample of their
    N clients (``eval.clients``; their ``global`` records say so); the last round scores all."""
    glob = recs[(recs["kind"] == "eval") & (recs["scope"] == "global")]
    if "eval_sampled" not in glob:
        return {}
    sampled = glob[glob["eval_sampled"].eq(True)]
    return {
        str(run): f"{int(g['sampled_clients'].iloc[0])} of {int(g['registered_clients'].iloc[0])}"
        for run, g in sampled.groupby("run_id")
    }


def _late_gain(recs: pd.DataFrame, runs: pd.DataFrame) -> pd.Series:
    """Per run: global mean accuracy at the last eval round minus at the latest eval round after at
    most ``LATE`` × R rounds of training (record round r follows r + 1 rounds); NaN without one."""
    glob = recs[(recs["kind"] == "eval") & (recs["scope"] == "global")]
    curve = glob.groupby(["run_id", "round"])["value"].mean().reset_index()
    rounds = curve["run_id"].map(pd.to_numeric(runs["rounds"])) if "rounds" in runs else np.nan
    early = curve[curve["round"] + 1 <= LATE * rounds]
    return curve.groupby("run_id")["value"].last() - early.groupby("run_id")["value"].last()


def seed_values(per_run: pd.DataFrame, tasks: list[str]) -> Values:
    """label -> per-seed figures (index: seed; columns ``acc_<task>``, ``mean_acc``) of the completed
    runs in ``per_run`` (:func:`_per_run`): the units every interval is computed over."""
    figures = [*(f"acc_{t}" for t in tasks), "mean_acc"]
    return {
        str(label): run.set_index(run["seed"].astype(int))[figures].sort_index()
        for label, run in per_run.groupby("label", sort=False)
    }


def per_example_scores(recs: pd.DataFrame, tasks: list[str]) -> Examples:
    """label -> seed -> task -> per-example global-test scores of the last eval round, for the runs
    that recorded them for every task (records older than ``per_example`` have none). No interval
    reads them (the seed is the unit); ``scripts/power.py`` splits a difference's variance with them."""
    glob = last_round_evals(recs)
    glob = glob[glob["scope"] == "global"]
    if "per_example" not in glob:
        return {}
    out: dict = {}
    for (label, seed), run in glob.groupby(["label", "seed"]):
        scores = {
            t: np.asarray(v, dtype=np.float64)
            for t, v in zip(run["task"], run["per_example"], strict=True)
            if isinstance(v, list)
        }
        if sorted(scores) == tasks:
            out.setdefault(label, {})[int(seed)] = scores
    return out


def _runs(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Completed records, one row per run, and the task names; one completed run per (label, seed)."""
    recs = completed_records(df)
    per_run, tasks = _per_run(recs)
    dup = per_run[per_run.duplicated(["label", "seed"], keep=False)]
    if not dup.empty:
        pairs = sorted({f"{lab} seed {seed}" for lab, seed in zip(dup["label"], dup["seed"], strict=True)})
        raise ValueError(f"several completed runs for {', '.join(pairs)}; keep one run per (label, seed)")
    return recs, per_run, tasks


def _majority_row(recs: pd.DataFrame, tasks: list[str]) -> dict | None:
    """Majority-answer reference: per seed (identical across the labels' runs), then over seeds."""
    maj = recs[(recs["kind"] == "majority") & recs["task"].isin(tasks)]
    if maj.empty:
        return None
    per_seed = maj.groupby(["task", "seed"])["value"].mean()
    per_task = per_seed.groupby(level="task")
    row: dict = {"method": MAJORITY}
    for task, mean, std in zip(per_task.mean().index, per_task.mean(), per_task.std(ddof=1), strict=True):
        row[f"acc_{task}"] = mean
        row[f"acc_{task}_std"] = std
    mean_acc = per_seed.groupby(level="seed").mean()  # per seed over tasks, then over seeds
    row["mean_acc"], row["mean_acc_std"] = mean_acc.mean(), mean_acc.std(ddof=1)
    return row


def _attrs(recs: pd.DataFrame, per_run: pd.DataFrame) -> dict:
    """Provenance shown next to the numbers: seeds, synthetic data, protocol and timer."""
    synthetic = recs["synthetic"].eq(True)
    protocols = recs.groupby("protocol")["protocol_hash"].unique()
    train = recs[recs["kind"] == "train"]
    sampling = per_run.dropna(subset=["eval_sample"]) if "eval_sample" in per_run else per_run.iloc[:0]
    return {
        "eval_sampling": {
            str(label): ", ".join(sorted(g["eval_sample"].unique())) for label, g in sampling.groupby("label")
        },
        "n_seeds": {label: int(n) for label, n in per_run.groupby("label").size().items()},
        "synthetic": bool(synthetic.any()),
        "synthetic_suites": sorted(recs.loc[synthetic, "suite"].dropna().unique().tolist()),
        "suites": sorted(recs["suite"].dropna().unique().tolist()),
        "protocols": {name: sorted(str(h) for h in hashes) for name, hashes in protocols.items()},
        "timers": sorted(train["timer"].dropna().unique().tolist()) if "timer" in train else [],
    }


def failed_rows(df: pd.DataFrame) -> dict[str, str]:
    """Label -> "seed S: <first error line>" for every label with a run that failed (a
    ``kind="failed"`` record) and did not complete since; the first failed seed names the error."""
    if "kind" not in df or not df["kind"].eq("failed").any():
        return {}
    completed = df["completed"].eq(True) if "completed" in df else pd.Series(False, index=df.index)
    done = set(df.loc[(df["kind"] == "run") & completed, "run_id"])
    failed = df[(df["kind"] == "failed") & ~df["run_id"].isin(done)].sort_values(["label", "seed"])
    return {label: f"seed {int(g['seed'].iloc[0])}: {g['error'].iloc[0]}" for label, g in failed.groupby("label")}


def build_leaderboard(df: pd.DataFrame, with_failed: bool = False) -> pd.DataFrame:
    """One row per label (plus "majority" last), best mean_acc first; ``<col>_std`` columns, then the
    95% interval ends ``acc_<task>_lo/_hi`` and ``mean_acc_lo/_hi``, at the end.

    ``with_failed``: a label with a failed run (:func:`failed_rows`) is shown as ``failed`` (its
    ``mean_acc`` cell) with the first line of the error in a ``failed`` column, after the other
    rows and before majority, without figures (its completed seeds alone would rank it on fewer
    seeds); the table is made of failed rows alone when nothing completed.

    ``converged`` is "rising" when, averaged over seeds, mean_acc gained more than its interval's
    half-width after ``LATE`` × R rounds (else "yes"; NaN without an eval by then or an interval).
    Raises ValueError when there is no completed run, or when a label has two completed runs of one
    seed (the seed count, and so the std, would be wrong); :class:`MixedProtocolsError` when the
    records hold runs of several protocol hashes.
    """
    check_one_protocol(df)
    failed = failed_rows(df) if with_failed else {}
    runs = df[df["kind"] == "run"] if "kind" in df else df.iloc[:0]
    if failed and not (runs["completed"].eq(True).any() if "completed" in runs else False):
        out = pd.DataFrame({"method": list(failed), "mean_acc": np.nan, "failed": list(failed.values())})
        protocols = df.groupby("protocol")["protocol_hash"].unique()
        synthetic = df["synthetic"].eq(True) if "synthetic" in df else pd.Series(False, index=df.index)
        out.attrs = {
            "n_seeds": {},
            "protocols": {name: sorted(str(h) for h in hashes) for name, hashes in protocols.items()},
            "synthetic": bool(synthetic.any()),
            "synthetic_suites": sorted(df.loc[synthetic, "suite"].dropna().unique().tolist()),
        }
        return out
    recs, per_run, tasks = _runs(df)
    per_run = per_run[~per_run["label"].isin(failed)]
    acc_cols = [f"acc_{t}" for t in tasks]
    acc_figs = [*acc_cols, "mean_acc", "local_acc", "worst_client_acc", "p_acc", "ttp_acc"]
    parse_cols = [c for c in per_run.columns if c.startswith("parse_fail_")]
    num_cols = [*acc_figs, *parse_cols, *COST_COLS, *PARAM_COLS]
    grouped = per_run.groupby("label")
    board = grouped[num_cols].mean()
    std = grouped[num_cols].std(ddof=1).add_suffix("_std")  # NaN for a single seed: no spread to report
    ci_cols = [f"{c}_{end}" for c in [*acc_cols, "mean_acc"] for end in ("lo", "hi")]
    board = board.join(std).join(row_intervals(seed_values(per_run, tasks)).reindex(columns=ci_cols))
    board["method"] = board.index
    board["device"] = recs.groupby("label")["device"].agg(lambda d: ",".join(sorted(d.dropna().unique())))
    board["federated"] = grouped["federated"].all()
    if "eval_sample" in per_run:  # which intermediate evaluation each row had ("k of N"; blank: all clients)
        board["eval_sample"] = grouped["eval_sample"].agg(lambda s: ", ".join(sorted(s.dropna().unique())) or None)
    gain, half = grouped["late_gain"].mean(), (board["mean_acc_hi"] - board["mean_acc_lo"]) / 2
    board["converged"] = (
        pd.Series("yes", index=board.index).mask(gain > half, "rising").where(gain.notna() & half.notna())
    )
    board = board.sort_values(["mean_acc", "method"], ascending=[False, True])

    rows = board.to_dict("records")
    rows += [{"method": label, "failed": error} for label, error in failed.items()]
    majority = _majority_row(recs, tasks)
    if majority is not None:
        rows.append(majority)
    columns = [
        "method",
        *acc_figs,
        "converged",
        *parse_cols,
        *COST_COLS,
        "device",
        *PARAM_COLS,
        *(["failed"] if failed else []),
        "federated",
        *std.columns,
        *ci_cols,
        *(["eval_sample"] if "eval_sample" in board else []),
    ]
    out = pd.DataFrame(rows, columns=columns)
    out.attrs = _attrs(recs, per_run)
    return out


def build_seed_values(df: pd.DataFrame) -> Values:
    """Per-seed figures of every completed row of the records (:func:`seed_values`)."""
    _, per_run, tasks = _runs(df)
    return seed_values(per_run, tasks)


def build_versus(df: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Every other row minus ``reference``: per task and in mean_acc, the paired difference with its
    95% t-interval over seeds (``<figure>_lo/_hi``), ``seeds``, how many seeds both rows ran (only
    those count), and the mean_acc difference's t-test ``p`` with ``p_holm``, Holm-adjusted over the
    table's comparisons (``attrs["comparisons"]`` of them). Largest mean_acc difference first.
    Raises UnknownRowError for a label that is not a completed row of the records."""
    recs, per_run, tasks = _runs(df)
    values = seed_values(per_run, tasks)
    if reference not in values:
        rows = ", ".join(sorted(values))
        raise UnknownRowError(f"row '{reference}' is not a completed row of these records; rows: {rows}")
    out = paired_differences(values, reference).sort_values("mean_acc", ascending=False, na_position="last")
    out = _with_holm(out.rename_axis("method").reset_index())
    out.attrs = {**_attrs(recs, per_run), "what": "versus", "reference": reference, **out.attrs}
    return out


def build_steps(df: pd.DataFrame, order: Sequence[str]) -> pd.DataFrame:
    """An ablation ladder read step by step: each row of ``order`` (labels, e.g. the protocol's
    method rows) minus the row above it, paired as in :func:`build_versus` (``above`` names it),
    Holm-adjusted over the steps. Labels that are not completed rows are skipped, so a step spans
    the nearest row above that is."""
    recs, per_run, tasks = _runs(df)
    values = seed_values(per_run, tasks)
    rows = [label for label in order if label in values]
    if len(rows) < 2:
        raise UnknownRowError(f"steps need two completed rows among: {', '.join(order) or 'none'}")
    frames = []
    for above, row in itertools.pairwise(rows):
        step = paired_differences({above: values[above], row: values[row]}, above)
        frames.append(step.rename_axis("method").reset_index().assign(above=above))
    out = _with_holm(pd.concat(frames, ignore_index=True))
    out = out[["method", "above", *[c for c in out.columns if c not in ("method", "above")]]]
    out.attrs = {**_attrs(recs, per_run), "what": "versus", "reference": "the row above", **out.attrs}
    return out


def _with_holm(table: pd.DataFrame) -> pd.DataFrame:
    """``seeds`` as integers, ``p_holm`` beside ``p`` (Holm over the rows that are comparisons, i.e.
    have a p-value), and ``attrs["comparisons"]``, how many there are."""
    table["seeds"] = table["seeds"].astype(int)
    table["p_holm"] = holm(table["p"].to_numpy())
    table.attrs["comparisons"] = int(table["p"].notna().sum())
    return table


def build_usage(df: pd.DataFrame) -> pd.DataFrame:
    """The expert-usage matrix of every method with a router or gate: one row per (method, task
    family), one column per expert holding its mean routing weight on the global test set (each
    run's last eval round, then mean over seeds; ``<expert>_std`` the seed-to-seed std).

    Where runs recorded routing statistics, ``entropy`` and ``mutual_info`` (with ``_std``) say per
    method how spread and how task-specific its routing is: each client's figure on the global test
    set, mean over clients per run, then mean and std over seeds (the same on every row of a method)."""
    recs = completed_records(df)
    usage = recs[recs["kind"] == "usage"] if "expert" in recs else recs.iloc[:0]
    if usage.empty:
        return pd.DataFrame(columns=["method", "task"])
    usage = usage[usage["round"] == usage.groupby("run_id")["round"].transform("max")]
    experts = list(pd.unique(usage["expert"]))
    per_run = usage.pivot_table(index=["label", "task", "run_id"], columns="expert", values="value")
    grouped = per_run.groupby(level=["label", "task"])
    mean, std = grouped.mean()[experts], grouped.std(ddof=1)[experts].add_suffix("_std")
    out = mean.join(std).reset_index().rename(columns={"label": "method"})
    routing = recs[recs["kind"] == "routing"]
    if not routing.empty:
        routing = routing[routing["round"] == routing.groupby("run_id")["round"].transform("max")]
        per_label = routing.groupby(["label", "run_id"])[list(PER_METHOD)].mean().groupby(level="label")
        out = out.join(per_label.mean().join(per_label.std(ddof=1).add_suffix("_std")), on="method")
        stds = [f"{c}_std" for c in [*experts, *PER_METHOD]]
        out = out[["method", "task", *experts, *PER_METHOD, *stds]]
    runs = recs[(recs["kind"] == "run") & recs["label"].isin(out["method"])]
    out.attrs = {**_attrs(recs[recs["label"].isin(out["method"])], runs), "what": "usage"}
    return out


def round_curves(recs: pd.DataFrame, tasks: Sequence[str] | None = None) -> pd.DataFrame:
    """Global accuracy (mean over ``tasks``, default all) per eval round, averaged over a label's
    seeds: record round x label (record round r follows r + 1 rounds of training)."""
    glob = recs[(recs["kind"] == "eval") & (recs["scope"] == "global")]
    if tasks is not None:
        glob = glob[glob["task"].isin(tasks)]
    per_run = glob.groupby(["label", "run_id", "round"])["value"].mean()
    return per_run.groupby(level=["label", "round"]).mean().unstack("label")
