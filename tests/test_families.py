"""Task families as plug-ins: the harness asks a task's family for its head, loss, score and baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedbench.api.family import MetricSpec, TaskFamily
from fedbench.api.model import make_heads, make_trunk
from fedbench.api.registry import FAMILIES, register_family
from fedbench.api.task import TaskSpec
from fedbench.staging.prepare import majority_scores


class _Within(TaskFamily):
    """A toy family in one place: a scalar regressed from the trunk, correct within 0.5 of the target
    (kept in ``box[:, 0]``), baseline the mean training target."""

    name = "toy_scalar"
    metric = MetricSpec("within_half", higher_is_better=True, aggregate="mean")
    has_answers = False
    symbol = "NUM"

    class Out(nn.Module):
        def __init__(self, family, hidden):
            super().__init__()
            self.family, self.value = family, nn.Linear(hidden, 1)

        def forward(self, h):
            return self.value(h.state)[:, 0]

        def loss(self, out, batch):
            return self.family.loss(out, batch)

        def correct(self, out, batch):
            return self.family.correct(out, batch)

    def output(self, spec, hidden):
        return self.Out(self, hidden)

    def head(self, spec, token_dim, embed_dim):
        return self.Out(self, embed_dim)

    def loss(self, out, batch):
        return (out - batch.box[:, 0]).pow(2).mean()

    def correct(self, out, batch):
        return ((out - batch.box[:, 0]).abs() <= 0.5).float()

    def majority(self, spec, table, train, test):
        return float((np.abs(table.box[test, 0] - table.box[train, 0].mean()) <= 0.5).mean())


@pytest.fixture
def toy_family():
    family = register_family("toy_scalar")(_Within())
    yield family
    FAMILIES.unregister("toy_scalar")


def test_a_new_family_is_one_registration(toy_family, tiny_prep):
    spec = TaskSpec("toy", "toy_scalar", "scenes")
    assert spec.metric == "within_half" and spec.is_box  # no answer vocabulary
    heads = make_heads([spec], make_trunk("shared", 8, 8), 8, 8)
    assert isinstance(heads["toy"], _Within.Out)
    table = tiny_prep.table
    rows = np.flatnonzero(table.task == "grounding")
    sub = type(table)(**{**table.__dict__, "task": np.where(table.task == "grounding", "toy", table.task)})
    score = majority_scores(sub, [spec])["toy"]
    expected = toy_family.majority(spec, sub, rows[table.split[rows] == 0], rows[table.split[rows] == 2])
    assert score == expected and 0.0 <= score <= 1.0
    with pytest.raises(ValueError, match="metric 'accuracy' is not its family's"):
        TaskSpec("toy2", "toy_scalar", "scenes", metric="accuracy")


def test_the_embedded_families_keep_their_rules(tiny_prep):
    from fedbench.api.family import family_of
    from fedbench.api.registry import TASKS

    names = {t: family_of(TASKS.get(t)) for t in ("classification", "vqa", "grounding", "ocr_vqa")}
    assert {t: f.metric.name for t, f in names.items()} == {
        "classification": "accuracy",
        "vqa": "accuracy",
        "grounding": "acc_iou50",
        "ocr_vqa": "accuracy",
    }
    assert [t for t, f in names.items() if f.label_skew] == ["classification"]
    assert {f.symbol for f in names.values()} == {"CLS", "VQA", "BOX", "OCR"}
    out = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]])
    batch = tiny_prep.store.batch(np.array([0, 1]))
    batch.box = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.6, 0.6, 1.0, 1.0]])
    assert names["grounding"].correct(out, batch).tolist() == [1.0, 0.0]
