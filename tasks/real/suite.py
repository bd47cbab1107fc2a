"""The suite ``real``: rows of the real datasets for a partition plan (:func:`build_real`), registered as
a :class:`RealSuite` so that callers reach ``data check`` and the adapter table through the suite registry."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fedbench.api.data import GLOBAL_CLIENT, GLOBAL_TEST, TEST, TRAIN, ClientPlan, ExampleTable, PartitionConfig
from fedbench.api.registry import FAMILIES, register_suite
from fedbench.api.task import TaskSpec
from fedbench.tasks.real import datacheck
from fedbench.tasks.real.adapters import ADAPTERS, SUITE, Adapter, adapter_table, nan_boxes, object_array
from fedbench.tasks.real.images import decode_images, xywh_to_unit_xyxy
from fedbench.tasks.real.partition import (
    check_partition_options,
    flwr_partition,
    hold_out,
    natural_codes,
    natural_groups,
    natural_split,
    pick,
    vocabulary,
)
from fedbench.tasks.real.sources import read_examples, resolve_source, source_of


def label_space(config: PartitionConfig, specs: Sequence[TaskSpec]) -> int:
    """Classes of the label-skew (classification) tasks, read from the datasets' features."""
    n = 1
    for spec in specs:
        adapter = ADAPTERS.get(spec.name)
        if adapter is not None and FAMILIES.get(adapter.family).label_skew:
            root = resolve_source(source_of(config, spec.name), adapter)
            n = max(n, len(read_examples(root, adapter, adapter.train_split).classes or ()))
    return n


def build_real(plans: list[ClientPlan], config: PartitionConfig, tasks: list[str], seed: int) -> ExampleTable:
    """Rows of the real datasets for a partition plan (see :mod:`fedbench.tasks.real`)."""
    from fedbench.tasks.families.vqa_soft import answer_scores, majority_answer

    unknown = [t for t in tasks if t not in ADAPTERS]
    if unknown:
        raise ValueError(f"task(s) {unknown} have no real-data adapter; adapters: {', '.join(sorted(ADAPTERS))}")
    parts: list[dict] = []
    vocabularies: dict[str, list[str]] = {}
    sources: dict[str, str] = {}
    n_images = 0
    requests: list[tuple[Path, Adapter, str, np.ndarray]] = []
    domain_names: dict[str, list[str]] = {}
    partitioning: dict[str, str] = {}  # task -> how its clients' examples were drawn, when not fedbench's default
    check_partition_options(config, tasks)
    for t_index, task in enumerate(tasks):
        adapter, family = ADAPTERS[task], FAMILIES.get(ADAPTERS[task].family)
        root = resolve_source(source_of(config, task), adapter)
        sources[task] = str(root)
        rng = np.random.default_rng([seed, 7, t_index])
        train_ex = read_examples(root, adapter, adapter.train_split)
        if adapter.test_split is None:
            held = hold_out(train_ex, config.global_test_images, rng)
            test_ex, test_split, test_pool = train_ex, adapter.train_split, held
        else:
            test_ex, test_split = read_examples(root, adapter, adapter.test_split), adapter.test_split
            held, test_pool = np.zeros(len(train_ex), bool), np.ones(len(test_ex), bool)
        natural = natural_split(config, adapter)
        names, train_dom, test_dom = train_ex.domain_names, train_ex.domain, test_ex.domain
        if natural is not None:
            names, train_dom, test_dom = natural_codes(train_ex, test_ex, natural)
        domain_names[task] = list(names)
        global_idx = pick(rng, test_pool.astype(float), config.global_test_images)
        # the training labels: class names, or the most frequent normalised human answer
        if family.has_answers:
            label_of = object_array([a[0] if train_ex.classes else majority_answer(a) for a in train_ex.answers])
        available = ~held
        blocks = []  # (client, split, examples, indices)
        holders = [p for p in plans if task in p.tasks]
        groups = flwr = None
        if natural is not None:
            groups = natural_groups(train_dom[available], len(names), len(holders), adapter.group_natural)
            partitioning[task] = f"natural:{natural}"
        elif config.partitioner:
            labels = label_of if family.has_answers else None
            seed_k = int(np.random.SeedSequence([seed, 11, t_index]).generate_state(1)[0])
            name, flwr = flwr_partition(config, [p.n_train + p.n_test for p in holders], available, labels, seed_k)
            partitioning[task] = f"flwr:{name}"
        for k, plan in enumerate(holders):
            weights = available.astype(float)
            if flwr is not None:  # the flwr-datasets partition replaces fedbench's label skew
                weights *= np.isin(np.arange(len(weights)), flwr[k])
            elif family.label_skew and plan.class_weights is not None and train_ex.classes:
                cw = np.asarray(plan.class_weights)
                classes = np.asarray([train_ex.classes.index(str(v)) for v in label_of])
                weights *= cw[classes % len(cw)]
            if groups is not None:
                weights *= np.isin(train_dom, groups[k])
            chosen = pick(rng, weights, plan.n_train + plan.n_test)
            chosen = rng.permutation(chosen)
            available[chosen] = False
            n_train = round(len(chosen) * plan.n_train / (plan.n_train + plan.n_test))
            blocks.append((plan.client, TRAIN, plan.has_ocr, np.sort(chosen[:n_train])))
            blocks.append((plan.client, TEST, plan.has_ocr, np.sort(chosen[n_train:])))
        if family.has_answers:
            if train_ex.classes:
                vocab = train_ex.classes
            else:
                train_labels = [label_of[i] for c, s, _, idx in blocks if s == TRAIN for i in idx]
                vocab = vocabulary(train_labels, adapter.max_answers)
            vocabularies[task] = list(vocab)
            index = {a: i for i, a in enumerate(vocab)}
        for client, split, has_ocr, idx in [*blocks, (GLOBAL_CLIENT, GLOBAL_TEST, True, global_idx)]:
            ex, ex_split = (test_ex, test_split) if split == GLOBAL_TEST else (train_ex, adapter.train_split)
            domain = test_dom if split == GLOBAL_TEST else train_dom
            if family.has_answers:
                labels = (
                    np.asarray([index.get(str(label_of[i]), -1) for i in idx], np.int64)
                    if ex is train_ex
                    else np.asarray(
                        [
                            index.get(ex.answers[i][0] if ex.classes else majority_answer(ex.answers[i]), -1)
                            for i in idx
                        ],
                        np.int64,
                    )
                )
                if split == TRAIN:  # a training example must have an answer the head can give
                    idx, labels = idx[labels >= 0], labels[labels >= 0]
            else:
                labels = np.full(len(idx), -1, np.int64)
            if len(idx) == 0:
                continue
            # one image per distinct image (examples asking several questions of one image share it)
            _, first, image_pos = np.unique(ex.image_key[idx].astype(str), return_index=True, return_inverse=True)
            image_rows = ex.row[idx][first]
            requests.append((root, adapter, ex_split, image_rows))
            box_xywh = None if family.has_answers else ex.box_xywh[idx]  # normalised once sizes are known
            soft = human = None
            if adapter.family == "vqa_soft":
                soft = np.full((len(idx), 10), -1, np.int64), np.zeros((len(idx), 10), np.float32)
                human = [tuple(str(a) for a in ex.answers[i]) for i in idx]  # raw: the official script's input
                for j, i in enumerate(idx):
                    scored = [(index[a], s) for a, s in answer_scores(ex.answers[i]).items() if a in index]
                    for m, (a, s) in enumerate(scored[:10]):
                        soft[0][j, m], soft[1][j, m] = a, s
            parts.append(
                {
                    "image_index": n_images + image_pos,
                    "task": [task] * len(idx),
                    "question": ex.question[idx].tolist(),
                    "ocr": [str(o) if has_ocr else "" for o in ex.ocr[idx]],
                    "label": labels,
                    "box_xywh": box_xywh,
                    "client": np.full(len(idx), client, np.int64),
                    "split": np.full(len(idx), split, np.int8),
                    "domain": domain[idx],
                    "soft": soft,
                    "human": human,
                }
            )
            n_images += len(image_rows)
    size = config.image_size
    pixels, sizes = decode_images(requests, size) if requests else (torch.zeros((0, 3, size, size), torch.uint8), None)
    for p in parts:
        n_rows = len(p["task"])
        p["box"] = (
            nan_boxes(n_rows) if p["box_xywh"] is None else xywh_to_unit_xyxy(p["box_xywh"], sizes[p["image_index"]])
        )
    n = sum(len(p["task"]) for p in parts)
    any_soft = any(p["soft"] is not None for p in parts)
    answer_ids = answer_scores_ = human_answers = None
    if any_soft:
        human_answers = object_array([h for p in parts for h in (p["human"] or [()] * len(p["task"]))])
        answer_ids = np.concatenate([p["soft"][0] if p["soft"] else np.full((len(p["task"]), 10), -1) for p in parts])
        answer_scores_ = np.concatenate(
            [p["soft"][1] if p["soft"] else np.zeros((len(p["task"]), 10), np.float32) for p in parts]
        ).astype(np.float32)
    cat = lambda k, dt: np.concatenate([np.asarray(p[k], dt) for p in parts]) if parts else np.zeros(0, dt)  # noqa: E731
    return ExampleTable(
        images=pixels,
        image_index=cat("image_index", np.int64),
        task=object_array([t for p in parts for t in p["task"]]),
        question=object_array([q for p in parts for q in p["question"]]),
        ocr_text=object_array([o for p in parts for o in p["ocr"]]),
        label=cat("label", np.int64),
        box=np.concatenate([p["box"] for p in parts]).astype(np.float32) if parts else nan_boxes(0),
        client=cat("client", np.int64),
        split=cat("split", np.int8),
        domain=cat("domain", np.int64),
        synthetic=False,
        meta={
            "suite": SUITE,
            "sources": sources,
            "answers": vocabularies,
            "domains": domain_names,
            **({"partitioning": partitioning} if partitioning else {}),
            "n_domains": max((len(v) for v in domain_names.values()), default=1),
            "image_size": size,
            "global_test_ocr": True,
            "plans": [plan.as_record() for plan in plans],
            "rows": n,
        },
        answer_ids=answer_ids,
        answer_scores=answer_scores_,
        human_answers=human_answers,
    )


class RealSuite:
    """The object registered as suite ``real``: called as the suite builder (:func:`build_real`), it also
    answers ``fedbench data check`` (:meth:`check`) and the adapter table of ``fedbench list``
    (:meth:`adapter_table`), so the CLI needs the suite registry only, never this package."""

    n_domains = 1  # the partitioner's domain weights are unused: natural domains come from the data

    def __call__(self, plans: list[ClientPlan], config: PartitionConfig, tasks: list[str], seed: int) -> ExampleTable:
        return build_real(plans, config, tasks, seed)

    def label_space(self, config: PartitionConfig, specs: Sequence[TaskSpec]) -> int:
        """Classes of the label-skew tasks, read from the datasets (:func:`label_space`)."""
        return label_space(config, specs)

    def check(self, source: str, task: str) -> dict:
        """``fedbench data check`` (:func:`fedbench.tasks.real.datacheck.check`)."""
        return datacheck.check(source, task)

    def adapter_table(self) -> list[dict]:
        """What ``fedbench list`` shows per real-data adapter (:func:`adapter_table`)."""
        return adapter_table()


REAL_SUITE = register_suite(SUITE)(RealSuite())
