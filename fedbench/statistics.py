"""Confidence intervals for the leaderboard, and the routing statistics recorded at evaluation.

Every leaderboard row of one seed is scored on the same global-test examples (one table per
seed), so rows are paired: a paired bootstrap draws seeds, then examples within each drawn seed
and task, and applies the SAME draws to every row. The spread of a row's own figure then covers
both seed-to-seed and test-set noise, and a difference between two rows keeps only the noise that
does not cancel on shared seeds and examples.

Inputs are per-example scores: ``examples[label][seed][task]`` is the vector, over the task's
global-test rows in table order, of each row's correctness averaged over the clients that hold the
task (the ``per_example`` field of a ``scope="global"`` eval record). Its mean is the task score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

N_BOOT = 2000
RNG_SEED = 0
PERCENTILES = (2.5, 97.5)  # a 95% interval

Examples = Mapping[str, Mapping[int, Mapping[str, np.ndarray]]]  # label -> seed -> task -> scores


def _resample(
    data: Mapping[int, Mapping[str, np.ndarray]], tasks: Sequence[str], n_boot: int, rng_seed: int
) -> np.ndarray:
    """``data[seed][task]`` is [rows, examples]; returns [n_boot, rows, tasks]: per resample, the mean
    over drawn seeds of each task's mean over drawn examples. The draws depend only on the seeds, the
    example counts and ``rng_seed``, never on the rows, so every row sees the same resamples."""
    rng = np.random.default_rng(rng_seed)
    seeds = sorted(data)
    k = len(seeds)
    n_rows = len(next(iter(data[seeds[0]].values())))
    slots = rng.integers(k, size=(n_boot, k))  # which seed fills each of the k slots of a resample
    out = np.zeros((n_boot, n_rows, len(tasks)))
    for j, task in enumerate(tasks):
        for i, seed in enumerate(seeds):
            scores = np.asarray(data[seed][task], dtype=np.float64)  # [rows, n]
            n = scores.shape[1]
            for slot in range(k):
                drawn = np.nonzero(slots[:, slot] == i)[0]  # resamples whose slot holds this seed
                picks = rng.integers(n, size=(len(drawn), n)) + n * np.arange(len(drawn))[:, None]
                counts = np.bincount(picks.ravel(), minlength=len(drawn) * n).reshape(len(drawn), n)
                out[drawn, :, j] += counts.astype(np.float64) @ scores.T / n
    return out / k


def _stack(
    examples: Examples, labels: Sequence[str], seeds: Sequence[int], tasks: Sequence[str], minus: str | None
) -> dict[int, dict[str, np.ndarray]]:
    """[rows, examples] per (seed, task) for ``labels``, less the ``minus`` row's scores if given."""
    rows = [*labels] if minus is None else [*labels, minus]
    data: dict[int, dict[str, np.ndarray]] = {}
    for seed in seeds:
        for task in tasks:
            vectors = [np.asarray(examples[row][seed][task], dtype=np.float64) for row in rows]
            if len({len(v) for v in vectors}) > 1:
                raise ValueError(
                    f"seed {seed}, task '{task}': rows were scored on global-test sets of different sizes "
                    "(the records mix protocols with different data), so they cannot be paired"
                )
            if minus is not None:
                vectors = [v - vectors[-1] for v in vectors[:-1]]
            data.setdefault(seed, {})[task] = np.stack(vectors)
    return data


def _tasks(examples: Examples) -> list[str]:
    tasks = {tuple(sorted(per_task)) for per_seed in examples.values() for per_task in per_seed.values()}
    if len(tasks) != 1:
        raise ValueError(f"every (row, seed) needs per-example scores of the same tasks; got {sorted(tasks)}")
    return list(tasks.pop())


def _interval_frame(labels: Sequence[str], stats: np.ndarray, tasks: Sequence[str]) -> pd.DataFrame:
    """``stats`` [n_boot, rows, tasks] -> per row the percentile interval of each task and of their mean."""
    cols = [*(f"acc_{t}" for t in tasks), "mean_acc"]
    lo, hi = np.percentile(np.concatenate([stats, stats.mean(-1, keepdims=True)], -1), PERCENTILES, axis=0)
    return pd.concat(
        [
            pd.DataFrame(lo, index=labels, columns=cols).add_suffix("_lo"),
            pd.DataFrame(hi, index=labels, columns=cols).add_suffix("_hi"),
        ],
        axis=1,
    )


def row_intervals(examples: Examples, n_boot: int = N_BOOT, rng_seed: int = RNG_SEED) -> pd.DataFrame:
    """95% interval of each row's ``acc_<task>`` and ``mean_acc``: one row per label, columns
    ``<figure>_lo`` / ``<figure>_hi``. Rows with the same seeds share every draw."""
    if not examples:
        return pd.DataFrame()
    tasks = _tasks(examples)
    groups: dict[tuple[int, ...], list[str]] = {}
    for label, per_seed in examples.items():
        groups.setdefault(tuple(sorted(per_seed)), []).append(label)
    frames = [
        _interval_frame(labels, _resample(_stack(examples, labels, seeds, tasks, None), tasks, n_boot, rng_seed), tasks)
        for seeds, labels in groups.items()
    ]
    return pd.concat(frames).loc[list(examples)]


def paired_differences(
    examples: Examples, reference: str, n_boot: int = N_BOOT, rng_seed: int = RNG_SEED
) -> pd.DataFrame:
    """Each other row minus ``reference``, per task and in mean, with its 95% interval: one row per
    label, columns ``seeds`` (how many count), ``<figure>``, ``<figure>_lo``, ``<figure>_hi``.

    Only the seeds present for both rows count, so a row run on fewer seeds is compared on those; a
    row sharing no seed with the reference gets ``seeds`` 0 and NaN figures.
    """
    tasks = _tasks(examples)
    cols = [*(f"acc_{t}" for t in tasks), "mean_acc"]
    groups: dict[tuple[int, ...], list[str]] = {}
    for label in examples:
        if label != reference:
            groups.setdefault(tuple(sorted(set(examples[label]) & set(examples[reference]))), []).append(label)
    frames = []
    for seeds, labels in groups.items():
        if not seeds:
            frames.append(pd.DataFrame({"seeds": 0}, index=labels))
            continue
        data = _stack(examples, labels, seeds, tasks, reference)
        point = np.mean([[data[s][t].mean(-1) for t in tasks] for s in seeds], 0).T  # [rows, tasks]
        point = pd.DataFrame(np.column_stack([point, point.mean(-1)]), index=labels, columns=cols)
        stats = _resample(data, tasks, n_boot, rng_seed)
        frames.append(
            pd.concat(
                [pd.Series(len(seeds), index=labels, name="seeds"), point, _interval_frame(labels, stats, tasks)],
                axis=1,
            )
        )
    out = pd.concat(frames) if frames else pd.DataFrame()
    columns = ["seeds", *(c + s for c in cols for s in ("", "_lo", "_hi"))]
    return out.reindex(index=[label for label in examples if label != reference], columns=columns)


def routing_entropy(weights: np.ndarray) -> float:
    """Mean over rows of the entropy (nats) of each row's expert weights [rows, E]: log E when every
    row spreads evenly, 0 when each row picks one expert (zero weights contribute nothing)."""
    w = np.asarray(weights, dtype=np.float64)
    return float(-(w * np.log(np.where(w > 0, w, 1.0))).sum(-1).mean())


def task_expert_mi(weights: np.ndarray, task: Sequence[str] | np.ndarray) -> float:
    """I(task; expert) in nats with tasks weighted equally: H(mean_t p(e|t)) − mean_t H(p(e|t)), where
    p(e|t) is the mean weight of the rows of task t. 0 when routing ignores the task; log T when each
    of the T tasks has an expert of its own."""
    w, task = np.asarray(weights, dtype=np.float64), np.asarray(task)
    per_task = np.stack([w[task == t].mean(0) for t in np.unique(task)])
    return routing_entropy(per_task.mean(0, keepdims=True)) - routing_entropy(per_task)
