"""Paired bootstrap and routing statistics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from fedbench.statistics import paired_differences, routing_entropy, row_intervals, task_expert_mi

REF = np.tile([0.0, 0.5, 0.25, 0.75], 10)  # 40 global-test examples, mean 0.375
FLIP = np.tile([0.25, 0.0, 0.0, 0.0], 10)  # one example in four gains 0.25: mean difference 1/16


def _examples(rows: dict[str, dict[int, np.ndarray]]) -> dict:
    """Two tasks with the same scores (task b reversed, so the tasks are not copies example by example)."""
    return {label: {s: {"a": v, "b": v[::-1]} for s, v in per_seed.items()} for label, per_seed in rows.items()}


def test_known_paired_difference_and_a_constant_one_is_exact():
    ref = {s: np.roll(REF, s) for s in range(3)}
    ref[3] = np.zeros(40)  # a seed only the reference ran: it must not count in any difference
    examples = _examples(
        {
            "ref": ref,
            "flip": {s: np.roll(REF + FLIP, s) for s in range(3)},
            "const": {s: np.roll(REF + 0.25, s) for s in range(3)},
        }
    )
    diff = paired_differences(examples, "ref", n_boot=500)
    assert list(diff.index) == ["flip", "const"] and (diff["seeds"] == 3).all()
    for col in ("acc_a", "acc_b", "mean_acc"):
        flip, const = diff.loc["flip"], diff.loc["const"]
        assert flip[col] == pytest.approx(1 / 16)
        assert 0 < flip[f"{col}_lo"] <= 1 / 16 <= flip[f"{col}_hi"]  # contains it, excludes 0
        # the same difference on every example of every seed: no resample can move it
        assert (const[col], const[f"{col}_lo"], const[f"{col}_hi"]) == (0.25, 0.25, 0.25)


def test_no_shared_seed_gives_nan_and_unequal_test_sets_refuse_to_pair():
    examples = _examples({"ref": {0: REF}, "other": {1: REF}})
    diff = paired_differences(examples, "ref", n_boot=10)
    assert diff.loc["other", "seeds"] == 0 and diff.loc["other"].drop("seeds").isna().all()
    with pytest.raises(ValueError, match=r"seed 0, task 'a'.*cannot be paired"):
        paired_differences(_examples({"ref": {0: REF}, "other": {0: REF[:-1]}}), "ref", n_boot=10)


def test_draws_are_seeded_and_shared_by_every_row():
    one = _examples({"x": {0: REF, 1: np.roll(REF, 1)}})
    two = {**one, **_examples({"y": {0: REF[::-1], 1: REF}})}
    a, b = row_intervals(one, n_boot=300), row_intervals(two, n_boot=300)
    pd.testing.assert_series_equal(a.loc["x"], b.loc["x"])  # adding a row changes no other row's draws
    pd.testing.assert_frame_equal(b, row_intervals(two, n_boot=300))
    assert list(a.columns) == ["acc_a_lo", "acc_b_lo", "mean_acc_lo", "acc_a_hi", "acc_b_hi", "mean_acc_hi"]


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
    """Bernoulli(0.7) answers around a per-seed mean that varies (training noise), 3 seeds x 100
    examples: over 200 simulated result sets, the interval should cover 0.7 in 90-99% of them."""
    rng = np.random.default_rng(7)
    covered = 0
    for i in range(200):
        means = 0.7 + rng.normal(0, 0.03, 3)
        examples = {"x": {s: {"t": (rng.random(100) < m).astype(float)} for s, m in enumerate(means)}}
        ci = row_intervals(examples, n_boot=500, rng_seed=i).loc["x"]
        covered += ci["mean_acc_lo"] <= 0.7 <= ci["mean_acc_hi"]
    assert 0.90 <= covered / 200 <= 0.99


def test_routing_entropy_and_mutual_information_by_hand():
    tasks = np.array(["a", "a", "b", "b", "c", "c"])
    uniform = np.full((6, 4), 0.25)
    assert routing_entropy(uniform) == pytest.approx(math.log(4))
    assert task_expert_mi(uniform, tasks) == pytest.approx(0.0, abs=1e-12)
    aligned = np.eye(4)[[0, 0, 1, 1, 2, 2]]  # each task its own expert (a fourth one unused)
    assert routing_entropy(aligned) == 0.0
    assert task_expert_mi(aligned, tasks) == pytest.approx(math.log(3))
    # two tasks leaning on opposite experts: H(0.5, 0.5) − H(0.75, 0.25)
    leaning = np.array([[0.75, 0.25], [0.25, 0.75]])
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert routing_entropy(leaning) == pytest.approx(h)
    assert task_expert_mi(leaning, np.array(["a", "b"])) == pytest.approx(math.log(2) - h)
    # tasks weigh equally, not by their row count: 3 rows of a on e0, 1 row of b on e1 -> log 2
    assert task_expert_mi(np.eye(2)[[0, 0, 0, 1]], np.array(["a", "a", "a", "b"])) == pytest.approx(math.log(2))
