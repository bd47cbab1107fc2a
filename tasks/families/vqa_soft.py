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
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import torch

from fedbench.api.family import MetricSpec
from fedbench.api.registry import register_family
from fedbench.tasks.families.answer import AnswerFamily

# The official VQA evaluation's tables (VQA API, vqaEval.py): contractions written without their
# apostrophe, number words, articles and punctuation.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # a period not followed by a digit (as written upstream)
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _digits_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


@lru_cache(maxsize=1 << 20)  # answers repeat a lot (VQAv2: 2.1M human answers, a few hundred thousand distinct)
def normalize_answer(answer: str) -> str:
    """The official VQA answer normalisation: whitespace, punctuation, number words, articles, contractions."""
    text = str(answer).replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def answer_scores(answers: Sequence[str]) -> dict[str, float]:
    """Normalised answer -> its VQA accuracy against ``answers`` (the human answers), for every answer
    some human gave; any other answer scores 0. One human answer: exact match."""
    norm = [normalize_answer(a) for a in answers]
    counts = Counter(norm)
    n = len(norm)
    if n == 1:
        return {norm[0]: 1.0}
    # leave-one-out: the m subsets without one of a's own occurrences see m - 1 matches, the others m
    return {a: (m * min(1.0, (m - 1) / 3) + (n - m) * min(1.0, m / 3)) / n for a, m in counts.items()}


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official VQA accuracy of ``prediction`` against the human ``answers``."""
    return answer_scores(answers).get(normalize_answer(prediction), 0.0)


def majority_answer(answers: Sequence[str]) -> str:
    """The most frequent normalised answer (first in order on ties): the row's training label."""
    norm = [normalize_answer(a) for a in answers]
    return Counter(norm).most_common(1)[0][0]


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

    def __repr__(self) -> str:
        return "VQASoftFamily('vqa_soft')"


VQA_SOFT = register_family("vqa_soft")(VQASoftFamily())
