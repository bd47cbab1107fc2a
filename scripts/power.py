"""How many seeds would each family of comparisons need for a paired 95% half-width of TARGET on mean_acc?

Per pair of rows, the per-seed paired difference of mean_acc (the seed is the unit, as in
:mod:`fedbench.reporting.statistics`): with k seeds its sample variance s² has k − 1 degrees of freedom and
the paired 95% half-width is t(k − 1, 0.975) · s / √k. With n seeds it would be
t(n − 1, 0.975) · √(σ² / n), so the seeds needed for TARGET are the smallest n >= 2 with
t(n − 1, 0.975) · √(σ² / n) <= TARGET (:func:`seeds_needed`, iterating on n).

One pair's s² from 5 seeds is a poor estimate of σ² (4 degrees of freedom: a 95% chi-square
interval spans a factor of about 20), and the largest of many such estimates is mostly noise. So
the pairs are grouped into families of comparisons that should share a variance, and each family
gets one pooled variance, the mean of its pairs' s² (:func:`family_power`):

1. router ladder steps: (b) − (a), (c) − (b), …, (g) − (f) and (h) − (b), as in results/README.md:
   (a) ``pilot-ctmoa``, then the learned-router rows of ``mmrouter-moa`` in the protocol's row order
   (the order ``fedbench leaderboard --steps`` reads the ladder in), and each row with a
   ``router_view`` option minus the same row without it;
2. bounds: oracle − uniform, oracle − (a), uniform − (a) (``mmrouter-moa[routing=…]``);
3. pairs of rows of different methods (different method names), not in 1 or 2;
4. the other pairs (one method at two settings), for completeness.

Pairs whose rows are identical on every seed (e.g. (b) − (a), bit-identical by design) are left out:
their variance is 0 by construction, not by chance.

Degrees of freedom. The pairs of a family are not independent (they share rows, and every row's
seed draws its own data for all of them), so the sum of their k − 1 is only an upper bound on the
pooled variance's df. The df used is the conservative (k − 1) · r, where r is the number of linearly
independent pairs of the family (its rows less the connected groups its pairs form: a ladder of
7 steps over 8 rows has r = 7, all 153 pairs of 18 rows r = 17). The range of the seeds needed comes
from the chi-square 95% interval of the pooled variance at that df.

The variance splits into the test-set part (within a seed: the variance of the per-example
differences / n, averaged over tasks, / tasks — the sampling noise of one global test set) and the
seed part (training and data draw): total − test-set part. With unlimited test examples only the
seed part remains; its range subtracts the test-set part (estimated from thousands of examples, so
taken as known) from the ends of the total's interval.

    python scripts/power.py results/default [--target 0.01]
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from fedbench.config import toml_file
from fedbench.reporting import board
from fedbench.utils.records import read_records

LEVEL = 0.95
ROOT = "pilot-ctmoa"  # (a): the ladder's first row
ROUTER = "mmrouter-moa"  # the ladder's method; its ``routing`` option gives the bounds
FAMILIES = (
    "router ladder steps",
    "bounds (oracle, uniform)",
    "different methods",
    "one method, other settings",
)


def t_quantile(df: int, level: float = LEVEL) -> float:
    return float(stats.t.ppf(0.5 + level / 2, df))


def half_width(var: float, n: int, level: float = LEVEL) -> float:
    """Paired half-width with n seeds of a difference whose per-seed variance is ``var``."""
    return t_quantile(n - 1, level) * math.sqrt(var / n)


def seeds_needed(var: float, target: float, level: float = LEVEL, most: int = 1_000_000) -> int:
    """Smallest n >= 2 with t(n − 1) · √(var / n) <= target (``most`` if none up to it). Starts at the
    normal approximation's n, which the t quantile (larger) never undercuts, and counts up."""
    if var <= 0:
        return 2
    z = float(stats.norm.ppf(0.5 + level / 2))
    n = max(2, math.ceil((z / target) ** 2 * var))
    while n < most and half_width(var, n, level) > target:
        n += 1
    return n


@dataclass(frozen=True)
class Pair:
    """One comparison: per-seed differences ``a − b`` of mean_acc and the test-set part of their
    variance (mean over seeds; NaN without per-example scores)."""

    a: str
    b: str
    diffs: np.ndarray
    within: float

    @property
    def var(self) -> float:
        return float(self.diffs.var(ddof=1))

    @property
    def half_width(self) -> float:
        return half_width(self.var, len(self.diffs))

    @property
    def identical(self) -> bool:
        return bool(np.all(self.diffs == 0)) and not self.within > 0


@dataclass
class FamilyPower:
    """A family's pooled variance and the seeds it needs: ``need[m]`` = (n, lo, hi) with m times
    today's test examples (m = inf: unlimited), lo and hi from the chi-square interval."""

    pairs: int
    var: float  # pooled variance of the per-seed difference (mean of the pairs' s²)
    within: float  # its test-set part
    df: int  # conservative df of ``var``
    df_upper: int  # sum of the pairs' df (an upper bound: the pairs are not independent)
    var_lo: float
    var_hi: float
    need: dict[float, tuple[int, int, int]] = field(default_factory=dict)

    @property
    def between(self) -> float:
        return max(self.var - self.within, 0.0) if not math.isnan(self.within) else math.nan


def family_power(
    diffs: Sequence[np.ndarray],
    within: Sequence[float],
    target: float,
    independent: int | None = None,
    level: float = LEVEL,
) -> FamilyPower:
    """Pool the variance of a family's per-seed differences (one array per pair, k values each) and
    solve for the seeds a half-width of ``target`` needs, at today's test set and with unlimited test
    examples (then only the seed part, variance − mean ``within``, remains). ``independent``: how
    many of the pairs are linearly independent (default all), for the df (k − 1) · independent."""
    variances = np.array([np.var(d, ddof=1) for d in diffs])
    dfs = np.array([len(d) - 1 for d in diffs])
    var = float(variances.mean())
    df_upper = int(dfs.sum())
    df = round(float(dfs.mean()) * (len(diffs) if independent is None else independent))
    var_lo = df * var / float(stats.chi2.ppf(0.5 + level / 2, df))
    var_hi = df * var / float(stats.chi2.ppf(0.5 - level / 2, df))
    w = float(np.mean(within)) if len(within) and not np.any(np.isnan(within)) else math.nan
    out = FamilyPower(len(diffs), var, w, df, df_upper, var_lo, var_hi)
    out.need[1.0] = tuple(seeds_needed(v, target, level) for v in (var, var_lo, var_hi))
    if not math.isnan(w):
        out.need[math.inf] = tuple(seeds_needed(max(v - w, 0.0), target, level) for v in (var, var_lo, var_hi))
    return out


def independent_pairs(pairs: Sequence[tuple[str, str]]) -> int:
    """Rank of the pairs as contrasts of their rows: rows less connected groups (union-find)."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        parent[root(a)] = root(b)
    return len(parent) - len({root(x) for x in parent})


def parse_label(label: str) -> tuple[str, dict[str, str]]:
    """``mmrouter-moa[ocr_expert=false,router_inputs=image]`` -> name and options (as written)."""
    name, _, inner = label.partition("[")
    options = dict(item.split("=", 1) for item in inner.rstrip("]").split(",") if item)
    return name, options


def families(order: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """Pairs (a, b), meaning a − b, of the rows in ``order`` (the protocol's row order), by family."""
    parsed = {label: parse_label(label) for label in order}
    ladder = [ROOT] if ROOT in parsed else []
    learned = [
        lab for lab, (name, opts) in parsed.items() if name == ROUTER and not {"routing", "router_view"} & set(opts)
    ]
    ladder += learned
    steps = list(zip(ladder[1:], ladder[:-1], strict=True))
    for lab, (name, opts) in parsed.items():
        if "router_view" in opts:
            base = {k: v for k, v in opts.items() if k != "router_view"}
            steps += [(lab, other) for other, (n2, o2) in parsed.items() if n2 == name and o2 == base]
    routing = {opts.get("routing"): lab for lab, (name, opts) in parsed.items() if name == ROUTER}
    bounds = []
    if "oracle" in routing and "uniform" in routing:
        bounds.append((routing["oracle"], routing["uniform"]))
    for kind in ("oracle", "uniform"):
        if kind in routing and ROOT in parsed:
            bounds.append((routing[kind], ROOT))
    taken = {frozenset(p) for p in steps + bounds}
    rest = [p for p in itertools.combinations(order, 2) if frozenset(p) not in taken]
    different = [(a, b) for a, b in rest if parsed[a][0] != parsed[b][0]]
    same = [(a, b) for a, b in rest if parsed[a][0] == parsed[b][0]]
    return dict(zip(FAMILIES, (steps, bounds, different, same), strict=True))


def load_pairs(results: Path) -> tuple[list[str], dict[tuple[str, str], Pair], list[str]]:
    """Row labels (protocol order), every pair's per-seed differences of mean_acc over the seeds both
    rows ran, and the task names, from the completed runs of a results directory."""
    recs = read_records(results)
    values = board.build_seed_values(recs)  # label -> per-seed figures: the units
    tasks = sorted(c.removeprefix("acc_") for c in next(iter(values.values())).columns if c.startswith("acc_"))
    runs = recs[recs["kind"] == "run"]
    examples = board.per_example_scores(board.completed_records(recs), tasks)
    toml = Path(results) / "protocol.toml"
    listed = [m.label for m in toml_file.load(str(toml)).methods] if toml.is_file() else []
    seen = list(pd.unique(runs["label"]))
    order = [lab for lab in [*listed, *seen] if lab in values]
    order = list(dict.fromkeys(order))
    pairs = {}
    for a, b in itertools.permutations(order, 2):
        seeds = sorted(set(values[a].index) & set(values[b].index))
        if len(seeds) < 2:
            continue
        d = values[a].loc[seeds, "mean_acc"].to_numpy() - values[b].loc[seeds, "mean_acc"].to_numpy()
        pairs[(a, b)] = Pair(a, b, d, _within(examples, a, b, seeds, tasks))
    return order, pairs, tasks


def _within(examples: dict, a: str, b: str, seeds: list[int], tasks: list[str]) -> float:
    """Test-set variance of one seed's mean_acc difference (mean over seeds): Σ_t var_t / n_t / T²."""
    if a not in examples or b not in examples or any(s not in examples[a] or s not in examples[b] for s in seeds):
        return math.nan
    per_seed = []
    for s in seeds:
        d = [examples[a][s][t] - examples[b][s][t] for t in tasks]
        per_seed.append(sum(x.var(ddof=1) / len(x) for x in d) / len(tasks) ** 2)
    return float(np.mean(per_seed))


def _short(label: str) -> str:
    return label.replace("ocr_expert=false,router_inputs=", "…")


def _range(need: tuple[int, int, int]) -> str:
    return f"{need[0]} [{need[1]}, {need[2]}]"


def report(results: Path, target: float) -> str:
    order, pairs, _ = load_pairs(results)
    ks = sorted({len(p.diffs) for p in pairs.values()})
    k = ks[-1]
    lines = [
        f"{results}: {len(order)} rows, {len(order) * (len(order) - 1) // 2} pairs, {k} seeds "
        f"(t({k - 1}, 0.975) = {t_quantile(k - 1):.3f}); target: paired 95% half-width <= {target} on mean_acc",
    ]
    if len(ks) > 1:
        lines.append(f"  (pairs ran {', '.join(map(str, ks))} common seeds: each pair's own k counts)")
    for name, members in families(order).items():
        members = [m for m in members if m in pairs]
        same = [m for m in members if pairs[m].identical]
        members = [m for m in members if m not in same]
        lines.append("")
        lines.append(f"{name}: {len(members)} pair(s)")
        if same:
            lines.append(
                "  left out, identical on every seed: " + "; ".join(f"{_short(a)} − {_short(b)}" for a, b in same)
            )
        if not members:
            continue
        chosen = [pairs[m] for m in members]
        hw = np.array([p.half_width for p in chosen])
        widest = chosen[int(hw.argmax())]
        fam = family_power([p.diffs for p in chosen], [p.within for p in chosen], target, independent_pairs(members))
        lines.append(
            f"  half-width now: median {np.median(hw):.4f}, max {hw.max():.4f} "
            f"({_short(widest.a)} − {_short(widest.b)}); <= {target}: {np.mean(hw <= target):.0%}"
        )
        split = f" = test set {fam.within:.2e} + seeds {fam.between:.2e}" if not math.isnan(fam.within) else ""
        lines.append(
            f"  pooled variance of the per-seed difference {fam.var:.2e}{split}; "
            f"df {fam.df} (sum over pairs {fam.df_upper}, an upper bound), "
            f"95% range [{fam.var_lo:.2e}, {fam.var_hi:.2e}]"
        )
        text = f"  seeds for <= {target} [95% range]: today's test set {_range(fam.need[1.0])}"
        if math.inf in fam.need:
            text += f"; unlimited test examples {_range(fam.need[math.inf])}"
        lines.append(text)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--target", type=float, default=0.01)
    args = parser.parse_args()
    print(report(args.results, args.target))


if __name__ == "__main__":
    main()
