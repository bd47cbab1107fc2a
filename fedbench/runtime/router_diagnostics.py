"""How a routed model spreads its rows over its experts, measured when a run records its routing
(``routing`` records: per client, the entropy and I(task; expert) of its routing weights)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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
