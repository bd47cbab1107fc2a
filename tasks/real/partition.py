"""How a task's examples are dealt to clients: the held-out global test, the seeded weighted draws, the
answer vocabulary, natural splits (``data.natural_splits``) and flwr-datasets' partitioners
(``data.partitioner``), with the protocol options checked against the adapters."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from fedbench.api.data import DataError, PartitionConfig
from fedbench.tasks.real.adapters import ADAPTERS, Adapter, Examples


def hold_out(examples: Examples, n: int, rng: np.random.Generator) -> np.ndarray:
    """Examples of whole images, in a seeded order of images, until at least ``n`` (a boolean mask)."""
    keys, inverse = np.unique(examples.image_key.astype(str), return_inverse=True)
    mask = np.zeros(len(examples), bool)
    for k in rng.permutation(len(keys)):
        if mask.sum() >= n:
            break
        mask |= inverse == k
    return mask


def pick(rng: np.random.Generator, weights: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` distinct indices drawn with probability proportional to ``weights`` (sorted)."""
    n = min(n, int((weights > 0).sum()))
    if n == 0:
        return np.zeros(0, np.int64)
    return np.sort(rng.choice(len(weights), size=n, replace=False, p=weights / weights.sum()))


def vocabulary(labels: list[str], max_answers: int) -> tuple[str, ...]:
    """The ``max_answers`` most frequent labels, most frequent first (ties: alphabetical)."""
    counts = Counter(labels)
    return tuple(a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max_answers])


PARTITIONERS = ("iid", "dirichlet", "inner_dirichlet", "pathological")  # data.partitioner: flwr-datasets'


def natural_split(config: PartitionConfig, adapter: Adapter) -> str | None:
    """The natural split whose values the task's clients hold: the protocol's, else the adapter's default."""
    name = config.natural_splits.get(adapter.task, adapter.natural_default)
    return None if name in (None, "none") else name


def check_partition_options(config: PartitionConfig, tasks: Sequence[str]) -> None:
    """``data.natural_splits``, ``data.partitioner`` and ``data.classes_per_client`` against the tasks and
    their adapters: one line naming the bad value and the valid ones."""
    from fedbench.config.protocol import ProtocolError

    for task, name in config.natural_splits.items():
        if task not in tasks:
            raise ProtocolError(
                f"protocol field 'data.natural_splits' names task '{task}', which the protocol does not run "
                f"(tasks: {', '.join(tasks)})"
            )
        valid = (*ADAPTERS[task].natural_splits, "none")
        if name not in valid:
            raise ProtocolError(
                f"protocol field 'data.natural_splits.{task}' = {name!r} is invalid: expected one of {', '.join(valid)}"
            )
    if config.partitioner and config.partitioner not in PARTITIONERS:
        raise ProtocolError(
            f"protocol field 'data.partitioner' = {config.partitioner!r} is invalid: expected one of "
            f"{', '.join(PARTITIONERS)} (flwr-datasets), or an empty string for fedbench's own draw"
        )
    if config.partitioner in ("dirichlet", "inner_dirichlet") and config.dirichlet_alpha <= 0:
        raise ProtocolError(
            f"protocol field 'data.dirichlet_alpha' = {config.dirichlet_alpha!r} is invalid with partitioner "
            f"'{config.partitioner}': expected a number > 0 (or partitioner 'iid')"
        )
    if (config.partitioner == "pathological") != (config.classes_per_client > 0):
        raise ProtocolError(
            f"protocol field 'data.classes_per_client' = {config.classes_per_client!r} is invalid with partitioner "
            f"{config.partitioner!r}: set it (an integer >= 1) with 'pathological' only"
        )


def natural_codes(train: Examples, test: Examples, name: str) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """The natural split's names (the training split's, then any only the test split has) and both splits'
    codes into them: the test split may lack a value or hold one the training split has not."""
    if name not in train.natural or name not in test.natural:
        raise DataError(f"the dataset has no '{name}' column to split clients by (it has {sorted(train.natural)})")
    train_names, train_codes = train.natural[name]
    test_names, test_codes = test.natural[name]
    names = (*train_names, *(n for n in test_names if n not in train_names))
    recode = np.asarray([names.index(n) for n in test_names], np.int64)
    return names, train_codes, recode[test_codes] if len(test_codes) else test_codes


def natural_groups(codes: np.ndarray, n_values: int, n_clients: int, group: bool) -> list[np.ndarray]:
    """The natural-split values each of ``n_clients`` clients holds, from the training pool's ``codes``.

    Without ``group`` (DomainNet) client ``k`` holds value ``k % n_values``. With it, when there are more
    values present than clients, every value goes to exactly one client: largest first to the client with
    the fewest examples so far (ties: the lower client, then the lower value), so the clients' pools stay
    balanced; with fewer values than clients, client ``k`` holds the ``k % n``-th value present.
    """
    if not group:
        return [np.asarray([k % n_values]) for k in range(n_clients)]
    counts = np.bincount(codes, minlength=n_values)
    present = np.flatnonzero(counts)
    if len(present) == 0:
        return [np.zeros(0, np.int64) for _ in range(n_clients)]
    if len(present) <= n_clients:
        return [present[k % len(present) : k % len(present) + 1] for k in range(n_clients)]
    load, held = np.zeros(n_clients, np.int64), [[] for _ in range(n_clients)]
    for value in sorted(present.tolist(), key=lambda v: (-counts[v], v)):
        k = int(np.argmin(load))
        held[k].append(value)
        load[k] += counts[value]
    return [np.asarray(sorted(v), np.int64) for v in held]


def flwr_partition(
    config: PartitionConfig, sizes: list[int], available: np.ndarray, labels: np.ndarray | None, seed: int
) -> tuple[str, list[np.ndarray]]:
    """Each client's pool (example indices) from a flwr-datasets partitioner run on a local
    ``datasets.Dataset`` of the task's available training examples (never ``FederatedDataset``: it downloads).

    The pool is shuffled with ``seed`` first (``IidPartitioner`` shards contiguously) and ``seed`` seeds the
    partitioner. Label partitioners split by the example's label (class, or most frequent normalised answer;
    ``pathological`` deals the first classes deterministically, so every class has a client);
    a task without labels (grounding) is split IID. ``inner_dirichlet`` draws the plans' ``sizes`` (so
    ``quantity_skew``), scaled down to fit the pool. Returns the partitioner's name and the pools.
    """
    from fedbench.config.protocol import ProtocolError

    try:
        from datasets import Dataset
        from flwr_datasets import partitioner as fp
    except ImportError:
        raise ProtocolError(
            f"protocol field 'data.partitioner' = {config.partitioner!r} needs flwr-datasets: "
            "pip install 'flwr-datasets>=0.6,<0.7'"
        ) from None
    name = config.partitioner if labels is not None else "iid"
    pool = np.random.default_rng(seed).permutation(np.flatnonzero(available))
    n = len(sizes)
    if name == "inner_dirichlet":
        total = sum(sizes)
        if total > len(pool):
            sizes = [max(1, s * len(pool) // total) for s in sizes]
        pool = pool[: sum(sizes)]
    columns: dict = {"index": pool}
    if labels is not None:  # as codes 0..K-1 of the labels present: InnerDirichletPartitioner needs those
        columns["label"] = np.unique(labels[pool].astype(str), return_inverse=True)[1].reshape(-1)
    alpha, least = config.dirichlet_alpha, min(min(sizes), len(pool) // (2 * n))
    make = {
        "iid": lambda: fp.IidPartitioner(n),
        "dirichlet": lambda: fp.DirichletPartitioner(n, "label", alpha, min_partition_size=least, seed=seed),
        "inner_dirichlet": lambda: fp.InnerDirichletPartitioner(sizes, "label", alpha, seed=seed),
        "pathological": lambda: fp.PathologicalPartitioner(
            n, "label", config.classes_per_client, class_assignment_mode="first-deterministic", seed=seed
        ),
    }
    partitioner = make[name]()
    partitioner.dataset = Dataset.from_dict(columns)
    try:
        parts = [np.asarray(partitioner.load_partition(k)["index"], np.int64) for k in range(n)]
    except ValueError as err:
        raise DataError(
            f"flwr-datasets' {type(partitioner).__name__} could not split {len(pool)} examples over {n} clients: "
            + " ".join(str(err).split())
        ) from None
    return name, parts
