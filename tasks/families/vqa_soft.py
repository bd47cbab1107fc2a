"""The ``vqa_soft`` family: VQA answered from a vocabulary, scored with the official VQA accuracy.

A row carries up to ten human answers. After the official answer normalisation (:func:`normalize_answer`:
punctuation, number words, articles, contractions), predicting answer ``a`` scores
``mean_i min(1, #{j != i : answer_j == a} / 3)`` over the leave-one-out subsets of the human answers
(:func:`vqa_accuracy`); with a single human answer, exact match. The suite stores, per row, each distinct
normalised human answer that is in the vocabulary with its score (``ExampleTable.answer_ids`` /
``answer_scores``), so scoring a prediction is a lookup.

Harness choices: the loss is cross-entropy on the row's most frequent normalised answer (the suite keeps
only training rows whose answer is in the vocabulary, which comes from the training clients' rows);
the normalisation runs on every answer (EvalAI's answer processor; the original script skipped it when
all ten humans agreed); the majority row predicts the most frequent training answer.

On a generative VLM the LM is trained to write that same answer, and what it writes is scored against
the row's raw human answers (``ExampleTable.human_answers``) in the protocol's ``vlm.vqa_metric`` mode,
``official`` (the script, its all-identical gate included) or ``normalized`` (as above):
:mod:`fedbench.tasks.families.text_answers`, where the answer processing lives.
"""

from __future__ import annotations

import torch

from fedbench.api.family import MetricSpec
from fedbench.api.registry import register_family
from fedbench.tasks.families.answer import AnswerFamily
from fedbench.tasks.families.text_answers import (
    answer_scores,
    majority_answer,
    normalize_answer,
    normalize_text,
    score_vqa,
)
from fedbench.tasks.families.text_answers import vqa_accuracy_normalized as vqa_accuracy

# the real-data suite, ``data check`` and their tests read the answer processing here, where it began
__all__ = ["VQA_SOFT", "VQASoftFamily", "answer_scores", "majority_answer", "normalize_answer", "vqa_accuracy"]


class VQASoftFamily(AnswerFamily):
    """VQA accuracy over several human answers (VQAv2, TextVQA): the answer family's heads and loss
    (cross-entropy on each row's most frequent answer), scored against every human answer."""

    metric = MetricSpec("vqa_accuracy", higher_is_better=True, aggregate="mean")

    def __init__(self) -> None:
        super().__init__("vqa_soft", "VQA")

    def correct(self, out, batch):
        if batch.answer_ids is None:  # no human answers stored: exact match on the label
            return super().correct(out, batch)
        hit = batch.answer_ids == out.argmax(-1, keepdim=True)
        return (batch.answer_scores * hit).sum(-1).clamp(max=1.0)

    def majority(self, spec, table, train, test):
        if table.answer_ids is None:
            return super().majority(spec, table, train, test)
        hit = table.answer_ids[test] == self.majority_answer(spec, table, train)
        return float(torch.as_tensor((table.answer_scores[test] * hit).sum(-1)).clamp(max=1.0).mean())

    def score_text(self, spec, table, row, text, vqa_metric):
        humans = None if table.human_answers is None else table.human_answers[row]
        if not humans:  # no human answers kept (a suite without them): exact match on the label
            return super().score_text(spec, table, row, text, vqa_metric)
        return score_vqa(text, humans, vqa_metric), bool(normalize_text(text))

    def __repr__(self) -> str:
        return "VQASoftFamily('vqa_soft')"


VQA_SOFT = register_family("vqa_soft")(VQASoftFamily())
