"""Partitioners: each heterogeneity knob does what it says, measured on the built data."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedbench.api.data import GLOBAL_CLIENT, PartitionConfig
from fedbench.staging.partition import make_plans, partition_summary
from fedbench.tasks import scenes

TASKS = ["classification", "vqa", "grounding", "ocr_vqa"]
N_DOM, N_CLS = scenes.N_DOMAINS, len(scenes.CLASSES)


def _plans(seed: int = 0, **knobs):
    return make_plans(PartitionConfig(**knobs), TASKS, N_DOM, N_CLS, seed)


def test_deterministic():
    assert _plans(seed=4) == _plans(seed=4)
    assert _plans(seed=4) != _plans(seed=5)


@pytest.mark.parametrize(("num_clients", "per_client"), [(8, 2), (3, 2), (2, 2), (5, 1), (4, 0), (6, 3)])
def test_every_task_held(num_clients, per_client):
    plans = _plans(num_clients=num_clients, tasks_per_client=per_client)
    assert len(plans) == num_clients
    assert set().union(*(p.tasks for p in plans)) == set(TASKS)
    k = len(TASKS) if per_client == 0 else per_client
    assert all(len(set(p.tasks)) == k for p in plans)


def test_uncoverable_tasks_rejected():
    with pytest.raises(ValueError, match="cannot cover"):
        _plans(num_clients=2, tasks_per_client=1)


def _tv_to_global(alpha: float) -> float:
    """Mean total-variation distance of the clients' built label histograms to the pooled one."""
    config = PartitionConfig(
        num_clients=6,
        train_images=80,
        test_images=0,
        global_test_images=0,
        tasks_per_client=0,
        dirichlet_alpha=alpha,
        quantity_skew=0.0,
    )
    plans = make_plans(config, ["classification"], N_DOM, N_CLS, 0)
    table = scenes.build_scenes(plans, config, ["classification"], 0)
    hists = np.array([s["label_histogram"]["classification"] for s in partition_summary(table)], float)
    pooled = hists.sum(0) / hists.sum()
    return float(np.mean(0.5 * np.abs(hists / hists.sum(1, keepdims=True) - pooled).sum(1)))


def test_dirichlet_label_skew():
    assert _plans(dirichlet_alpha=0.0)[0].class_weights is None
    assert len(_plans(dirichlet_alpha=0.1)[0].class_weights) == N_CLS
    skewed, iid = _tv_to_global(0.1), _tv_to_global(0.0)
    assert skewed > 0.5 and iid < 0.25 and skewed > 2 * iid


def test_domain_task_coupling():
    config = PartitionConfig(
        num_clients=4, train_images=30, test_images=6, global_test_images=0, domain_task_coupling=1.0
    )
    plans = make_plans(config, TASKS, N_DOM, N_CLS, 0)
    table = scenes.build_scenes(plans, config, TASKS, 0)
    for plan, summary in zip(plans, partition_summary(table), strict=True):
        home = TASKS.index(plan.tasks[0]) % N_DOM
        assert summary["domain_histogram"][home] == summary["images"] == plan.n_train + plan.n_test
    config = dataclasses.replace(config, domain_task_coupling=0.0)
    plans = make_plans(config, TASKS, N_DOM, N_CLS, 0)
    assert all(np.allclose(p.domain_weights, 1 / N_DOM) for p in plans)
    for summary in partition_summary(scenes.build_scenes(plans, config, TASKS, 0)):
        assert sum(h > 0 for h in summary["domain_histogram"]) >= 3
    half = _plans(domain_task_coupling=0.5)[0].domain_weights
    assert np.isclose(sum(half), 1) and np.isclose(max(half), 0.5 + 0.5 / N_DOM)


def test_quantity_skew():
    equal = [p.n_train for p in _plans(quantity_skew=0.0)]
    assert len(set(equal)) == 1
    skewed = [p.n_train for p in _plans(quantity_skew=1.0, num_clients=10, train_images=20)]
    assert len(set(skewed)) > 3 and min(skewed) >= 8


@pytest.mark.parametrize(("fraction", "expected"), [(0.0, 0), (0.01, 1), (0.5, 4), (1.0, 8)])
def test_ocr_fraction(fraction, expected):
    assert sum(p.has_ocr for p in _plans(ocr_fraction=fraction)) == expected


def test_partition_summary():
    config = PartitionConfig(
        num_clients=4,
        train_images=16,
        test_images=4,
        global_test_images=8,
        tasks_per_client=2,
        ocr_fraction=0.5,
    )
    plans = make_plans(config, TASKS, N_DOM, N_CLS, 2)
    summary = partition_summary(scenes.build_scenes(plans, config, TASKS, 2))
    assert [s["client"] for s in summary] == [0, 1, 2, 3, GLOBAL_CLIENT]
    for plan, s in zip(plans, summary[:-1], strict=True):
        assert set(s["rows"]) == set(plan.tasks)
        assert all(r == {"train": plan.n_train, "test": plan.n_test, "global_test": 0} for r in s["rows"].values())
        assert sum(s["domain_histogram"]) == s["images"]
        assert s["has_ocr"] == plan.has_ocr
        if "classification" in plan.tasks:
            assert sum(s["label_histogram"]["classification"]) == plan.n_train + plan.n_test
    assert summary[-1]["has_ocr"] and set(summary[-1]["rows"]) == set(TASKS)
    assert all(r["global_test"] == 8 for r in summary[-1]["rows"].values())
