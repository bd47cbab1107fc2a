"""Partitioners: decide what each client holds before any data are drawn (DESIGN §6).

One :class:`~fedbench.api.data.ClientPlan` per client combines four kinds of heterogeneity:
task families (round-robin), Dirichlet(alpha) label skew, log-normal quantity skew and OCR
availability, plus the domain-task coupling knob that sets how much a client's pixels reveal its
task. Each knob draws from its own seed stream, so turning one never reshuffles the others.
"""

from __future__ import annotations

import numpy as np

from fedbench.api.data import GLOBAL_CLIENT, SPLIT_NAMES, ClientPlan, ExampleTable, PartitionConfig
from fedbench.api.family import family_of
from fedbench.api.registry import TASKS

_DIRICHLET, _QUANTITY, _OCR = 1, 2, 3  # seed-stream tags
MIN_TRAIN_IMAGES = 8


def _task_assignment(tasks: list[str], num_clients: int, per_client: int) -> list[tuple[str, ...]]:
    """Client c holds a window of consecutive tasks; window starts are spread so all are covered."""
    n_tasks = len(tasks)
    k = n_tasks if per_client <= 0 else min(per_client, n_tasks)
    if num_clients * k < n_tasks:
        raise ValueError(
            f"{num_clients} clients holding {k} task(s) each cannot cover all {n_tasks} tasks {tasks}; "
            "raise num_clients or tasks_per_client"
        )
    starts = [c % n_tasks if num_clients >= n_tasks else c * n_tasks // num_clients for c in range(num_clients)]
    return [tuple(tasks[(s + j) % n_tasks] for j in range(k)) for s in starts]


def make_plans(
    config: PartitionConfig, tasks: list[str], n_domains: int, n_classes: int, seed: int
) -> list[ClientPlan]:
    """One plan per client from the config's heterogeneity knobs, deterministic from ``seed``.

    A client's domain weights are ``kappa * one_hot(home(first task)) + (1 - kappa) * uniform``
    with ``home(task i) = i % n_domains`` and ``kappa = config.domain_task_coupling``.
    """
    if not tasks:
        raise ValueError("make_plans: no tasks given")
    kappa = config.domain_task_coupling
    if not 0.0 <= kappa <= 1.0:
        raise ValueError(f"domain_task_coupling must lie in [0, 1], got {kappa}")
    n = config.num_clients
    assignment = _task_assignment(tasks, n, config.tasks_per_client)

    if config.dirichlet_alpha > 0:
        rng = np.random.default_rng([seed, _DIRICHLET])
        class_weights = [tuple(float(p) for p in rng.dirichlet([config.dirichlet_alpha] * n_classes)) for _ in range(n)]
    else:
        class_weights = [None] * n

    if config.quantity_skew > 0:
        factors = np.random.default_rng([seed, _QUANTITY]).lognormal(0.0, config.quantity_skew, n)
    else:
        factors = np.ones(n)
    n_train = [max(MIN_TRAIN_IMAGES, round(config.train_images * f)) for f in factors]

    n_ocr = round(config.ocr_fraction * n)
    if config.ocr_fraction > 0:
        n_ocr = max(1, n_ocr)
    ocr_clients = set(np.random.default_rng([seed, _OCR]).permutation(n)[:n_ocr].tolist())

    plans = []
    for c in range(n):
        weights = np.full(n_domains, (1.0 - kappa) / n_domains)
        weights[tasks.index(assignment[c][0]) % n_domains] += kappa
        plans.append(
            ClientPlan(
                client=c,
                tasks=assignment[c],
                n_train=int(n_train[c]),
                n_test=config.test_images,
                domain_weights=tuple(float(w) for w in weights),
                class_weights=class_weights[c],
                has_ocr=c in ocr_clients,
            )
        )
    return plans


def partition_summary(table: ExampleTable) -> list[dict]:
    """Per client (and the global test set last): rows per task and split, label and domain histograms.

    ``has_ocr`` comes from the plans recorded in ``table.meta["plans"]`` when present (a client
    may have OCR yet hold no OCR task), else from the data: whether any of its rows carries OCR text.
    ``label_histogram`` counts the labels of each task whose family takes label skew (classification).
    """
    n_domains = int(table.meta.get("n_domains", int(table.domain.max()) + 1 if len(table) else 0))
    planned_ocr = {p["client"]: p["has_ocr"] for p in table.meta.get("plans", [])}
    clients = sorted(set(table.client.tolist()) - {GLOBAL_CLIENT})
    if (table.client == GLOBAL_CLIENT).any():
        clients.append(GLOBAL_CLIENT)
    summary = []
    for client in clients:
        mine = table.client == client
        rows: dict[str, dict[str, int]] = {}
        labels: dict[str, list[int]] = {}
        for task in sorted(set(table.task[mine].tolist())):
            in_task = mine & (table.task == task)
            rows[task] = {name: int((in_task & (table.split == code)).sum()) for code, name in SPLIT_NAMES.items()}
            spec = TASKS.get(task)
            if family_of(spec).label_skew:
                labels[task] = np.bincount(table.label[in_task], minlength=spec.num_answers).tolist()
        images, first = np.unique(table.image_index[mine], return_index=True)
        domains = table.domain[np.flatnonzero(mine)[first]]
        summary.append(
            {
                "client": int(client),
                "images": len(images),
                "rows": rows,
                "label_histogram": labels,
                "has_ocr": planned_ocr.get(client, bool((table.ocr_text[mine] != "").any())),
                "domain_histogram": np.bincount(domains, minlength=n_domains).tolist(),
            }
        )
    return summary
