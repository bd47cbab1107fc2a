"""Answer-classifier families: ``classification``, ``vqa`` and ``ocr_vqa`` (exact-match accuracy).

The usual classifier formulation: the head scores every answer of the task's vocabulary, the loss
is cross-entropy on the row's answer index, a row is correct when the top answer is its answer, and
the majority row predicts the most frequent training answer. On a generative VLM the LM writes the
answer's text (:meth:`AnswerFamily.target_text`), scored by exact match after :func:`normalize_text`.
"""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F

from fedbench.api.family import MetricSpec, TaskFamily
from fedbench.api.model import AnswerHead, AnswerOutput
from fedbench.api.registry import register_family
from fedbench.tasks.families.text_answers import normalize_text


class AnswerFamily(TaskFamily):
    """One answer out of the task's vocabulary, scored by exact match."""

    metric = MetricSpec("accuracy", higher_is_better=True, aggregate="mean")
    has_answers = True
    # a word-level tokenizer writes the longest answer ("green triangle", a VQAv2 phrase) in 1-5 tokens + end
    max_new_tokens = 8

    def __init__(
        self, name: str, symbol: str, label_skew: bool = False, instruction: str = TaskFamily.instruction
    ) -> None:
        self.name, self.symbol, self.label_skew, self.instruction = name, symbol, label_skew, instruction

    def output(self, spec, hidden):
        return AnswerOutput(spec, hidden, self)

    def head(self, spec, token_dim, embed_dim):
        return AnswerHead(spec, token_dim, embed_dim, self)

    def loss(self, out, batch):
        return F.cross_entropy(out, batch.label)

    def correct(self, out, batch):
        return (out.argmax(-1) == batch.label).float()

    @staticmethod
    def majority_answer(spec, table, train: np.ndarray) -> int:
        labels = table.label[train]
        return int(np.bincount(labels[labels >= 0], minlength=max(spec.num_answers, 1)).argmax())

    def majority(self, spec, table, train, test):
        answer = self.majority_answer(spec, table, train)
        return float((table.label[test] == answer).mean())

    def target_text(self, spec, table, row):
        label = int(table.label[row])
        if label < 0:  # real data: a test row whose answer no training client gave
            raise ValueError(f"task '{spec.name}': row {row} has no answer in the vocabulary to train on")
        return spec.answers[label]

    def score_text(self, spec, table, row, text, vqa_metric):
        answer, label = normalize_text(text), int(table.label[row])
        hit = label >= 0 and answer == normalize_text(spec.answers[label])  # an answer outside the vocabulary: 0
        return float(hit), bool(answer)

    def __repr__(self) -> str:
        return f"AnswerFamily({self.name!r})"


CLASSIFICATION = register_family("classification")(
    AnswerFamily("classification", "CLS", label_skew=True, instruction="Answer with the class name.")
)
VQA = register_family("vqa")(AnswerFamily("vqa", "VQA"))
OCR_VQA = register_family("ocr_vqa")(AnswerFamily("ocr_vqa", "OCR"))
