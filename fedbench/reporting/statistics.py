"""Confidence intervals for the leaderboard, and the routing statistics recorded at evaluation.

The seed is the unit. Every seed draws its own data, its own global test set and its own
initialisation, so a row's per-seed figure already carries the test-set noise, and per-seed figures
of one row are independent replicates. An interval is the Student t-interval over the k per-seed
values, mean ± t(k − 1, 0.975) · s / √k; a comparison of two rows is the same interval over their
per-seed paired differences (only the seeds both rows ran). A row with one seed has no interval.
``tests/test_statistics.py`` simulates experiments with seed effects and per-example test noise
around a known true difference and checks that these intervals cover it 93–97% of the time at 3, 5
and 10 seeds.

Inputs are per-seed figures: ``values[label]`` is a DataFrame indexed by seed with one column per
figure (``acc_<task>``, ``mean_acc``). Tables that mark intervals excluding 0 also carry the
comparison's two-sided t-test p-value and its Holm adjustment over the table's comparisons
(:func:`holm`), so a reader can tell one lucky interval among many from a finding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

LEVEL = 0.95  # every interval the project prints
INTERVAL = "95% t-interval over seeds (the seed is the unit)"
PAIRED_INTERVAL = "95% t-interval over seeds of the per-seed paired differences (the seed is the unit)"

Values = Mapping[str, pd.DataFrame]  # label -> per-seed figures (index: seed, columns: figures)


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (``scipy.stats.t.ppf``, which
    is ``scipy.special.stdtrit``; imported here, not at import time, so reading this module stays cheap)."""
    from scipy.special import stdtrit

    return float(stdtrit(df, q))


def t_interval(values: np.ndarray | Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, lo, hi) of ``values`` (one per seed): mean ± t(k − 1) · s / √k. NaN ends for k < 2."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return np.nan, np.nan, np.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, np.nan, np.nan
    half = float(t_quantile(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return mean, mean - half, mean + half


def t_pvalue(values: np.ndarray | Sequence[float]) -> float:
    """Two-sided p-value of the one-sample t-test of mean 0 (the test whose 95% interval excludes 0
    exactly when p < 0.05). Values that do not vary: p = 1 when all are 0, else 0; NaN for k < 2."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if len(x) < 2:
        return np.nan
    s = x.std(ddof=1)
    if s == 0:
        return 1.0 if np.all(x == 0) else 0.0
    tstat = x.mean() / (s / np.sqrt(len(x)))
    from scipy.special import stdtr  # here, not at import: scipy loads only when a p-value is needed

    return float(2 * stdtr(len(x) - 1, -abs(tstat)))  # the t distribution's survival function at |t|


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (NaN entries are not comparisons and stay
    NaN): reject the i-th smallest when every p_(j) · (m − j + 1) for j ≤ i is below the level."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = len(valid)
    if m == 0:
        return out
    order = valid[np.argsort(p[valid], kind="stable")]
    adjusted = np.maximum.accumulate(p[order] * (m - np.arange(m)))
    out[order] = np.minimum(adjusted, 1.0)
    return out


def row_intervals(values: Values) -> pd.DataFrame:
    """Each row's interval of every figure: one row per label, columns ``<figure>_lo`` / ``<figure>_hi``."""
    if not values:
        return pd.DataFrame()
    rows = {}
    for label, per_seed in values.items():
        ends = {}
        for figure in per_seed.columns:
            _, ends[f"{figure}_lo"], ends[f"{figure}_hi"] = t_interval(per_seed[figure])
        rows[label] = ends
    return pd.DataFrame.from_dict(rows, orient="index")


def paired_differences(values: Values, reference: str) -> pd.DataFrame:
    """Each other row minus ``reference``, per figure, with its interval over the seeds both rows ran:
    one row per label, columns ``seeds`` (how many count), ``<figure>``, ``<figure>_lo``,
    ``<figure>_hi``, and ``p`` (two-sided t-test of the mean_acc difference). A row sharing no seed
    with the reference gets ``seeds`` 0 and NaN figures."""
    ref = values[reference]
    figures = list(ref.columns)
    rows = {}
    for label, per_seed in values.items():
        if label == reference:
            continue
        seeds = sorted(set(per_seed.index) & set(ref.index))
        diff = per_seed.loc[seeds, figures] - ref.loc[seeds, figures]
        row: dict[str, float] = {"seeds": len(seeds)}
        for figure in figures:
            row[figure], row[f"{figure}_lo"], row[f"{figure}_hi"] = t_interval(diff[figure])
        row["p"] = t_pvalue(diff["mean_acc"]) if "mean_acc" in diff else np.nan
        rows[label] = row
    columns = ["seeds", *(f + s for f in figures for s in ("", "_lo", "_hi")), "p"]
    return pd.DataFrame.from_dict(rows, orient="index").reindex(columns=columns)


def pooled_difference(per_setting: Sequence[Mapping[int, float]]) -> tuple[int, float, float, float, float]:
    """A difference pooled over several settings (a sweep's values) with the seed as the unit:
    ``per_setting[i][seed]`` is the seed's paired difference at setting i. A seed run under several
    settings contributes one value, the mean of its differences there (its settings share its test
    set and initialisation, so they are not independent), and the interval is over those seeds.
    Returns (seeds, mean, lo, hi, p)."""
    by_seed: dict[int, list[float]] = {}
    for setting in per_setting:
        for seed, diff in setting.items():
            if not np.isnan(diff):
                by_seed.setdefault(int(seed), []).append(float(diff))
    per_seed = [float(np.mean(d)) for d in by_seed.values()]
    return (len(per_seed), *t_interval(per_seed), t_pvalue(per_seed))
