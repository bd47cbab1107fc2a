"""How many seeds would every pair of rows need for a paired 95% half-width of TARGET on mean_acc?

Per pair of rows, the per-seed paired difference of mean_acc (mean over tasks of the mean over a
task's global-test examples) has a variance across seeds that splits into the test-set part
(within a seed: var of per-example differences / n, averaged over tasks) and the seed-to-seed part
(training and data draw). The half-width with S seeds and m times the test examples is about
1.96 * sqrt((within / m + between) / S).

    python scripts/power.py results/default [--target 0.01]
"""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path

import numpy as np

from fedbench import leaderboard
from fedbench.records import read_records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", type=Path)
    parser.add_argument("--target", type=float, default=0.01)
    args = parser.parse_args()
    recs = leaderboard._completed(read_records(args.results))
    _, tasks = leaderboard._per_run(recs)
    examples = leaderboard._examples(recs, tasks)
    labels = sorted(examples)
    seeds = sorted(set.intersection(*(set(examples[label]) for label in labels)))
    rows = []
    for a, b in itertools.combinations(labels, 2):
        diffs = [[np.asarray(examples[a][s][t]) - np.asarray(examples[b][s][t]) for t in tasks] for s in seeds]
        per_seed = np.array([np.mean([d.mean() for d in ds]) for ds in diffs])
        within = float(np.mean([np.mean([d.var(ddof=1) / len(d) for d in ds]) / len(tasks) for ds in diffs]))
        between = max(float(per_seed.var(ddof=1)) - within, 0.0)
        rows.append((a, b, 1.96 * per_seed.std(ddof=1) / math.sqrt(len(seeds)), within, between))
    hw = np.array([r[2] for r in rows])
    within = np.array([r[3] for r in rows])
    between = np.array([r[4] for r in rows])
    print(f"{len(rows)} pairs of {len(labels)} rows, {len(seeds)} seeds")
    share = np.mean(hw <= args.target)
    print(f"paired half-width now: median {np.median(hw):.4f}, max {hw.max():.4f}, <= {args.target}: {share:.0%}")
    print(
        "variance of the per-seed difference: test-set part median "
        f"{np.median(within):.2e}, seed part median {np.median(between):.2e}"
    )
    for m in (1, 4, float("inf")):
        need = (1.96 / args.target) ** 2 * (within / m + between)
        every, median = math.ceil(need.max()), math.ceil(np.median(need))
        print(f"test set x{m}: seeds for every pair <= {args.target}: {every} (median pair {median})")
    worst = sorted(rows, key=lambda r: -r[2])[:3]
    for a, b, h, _, _ in worst:
        print(f"  widest: {a} vs {b}: {h:.4f}")


if __name__ == "__main__":
    main()
