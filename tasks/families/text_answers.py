"""Answers as text: normalising, parsing and scoring what a generative VLM writes (``vlm`` backbones).

The families import these for ``target_text`` / ``score_text``; the VQA answer processing also builds the
real data's answer vocabularies and ``vqa_soft`` scores (:func:`normalize_answer`, :func:`answer_scores`).

- **Exact match** (``classification``, ``vqa``, ``ocr_vqa``): :func:`normalize_text` on both sides (lower
  case, whitespace stripped and collapsed, one trailing period dropped), so "Red circle." is "red circle".
- **Boxes** (``grounding``): written ``[x1, y1, x2, y2]`` with integers 0-1000 (Shikra's bracketed list,
  Qwen-VL's 0-1000 grid; :func:`format_box`); read back by :func:`parse_box`, which takes the first
  bracketed list of four numbers (integers or decimals, spaces anywhere, as lmms-eval's RefCOCO parser)
  and refuses one outside 0-1000 or with x1 > x2 or y1 > y2.
- **VQA accuracy** against up to ten human answers, two modes (``vlm.vqa_metric``):

  - ``official`` (:func:`vqa_accuracy_official`): the VQA evaluation script (GT-Vision-Lab/VQA,
    ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, as of its 2021 fix) bit for bit. Answers and
    prediction get newlines and tabs turned into spaces and are stripped; then, **only when the human
    answers are not all identical**, all of them and the prediction go through
    :func:`process_punctuation` and :func:`process_digit_article`. So against ten "yes", "Yes" and
    "yes." score 0, while against nine "yes" and a "no" they score 1. Accuracy: the mean over the
    leave-one-out subsets of ``min(1, matches / 3)`` (the script drops the one answer record equal to the
    current one; VQA answer records carry distinct ids, so this is leaving out by position). One human
    answer: always 0 (its only subset is empty); none: 0 (the script would divide by zero).
  - ``normalized`` (:func:`vqa_accuracy_normalized`): both sides always go through the same processing,
    as the ``vqa_soft`` classifier head is scored and trained, and as EvalAI-style evaluators do (lmms-eval's
    VQAv2 task always processes the prediction, with EvalAI's processor, which also lower-cases first and
    drops "?" and ","; it keeps the gate on the human side). One human answer: exact match after processing.
    Where the human answers differ the two modes agree, up to the last bit of the float (summation order).

  The two modes share the processing, quirks included: the period rule ``(?!<=\\d)(\\.)(?!\\d)`` meant a
  look-behind but is a look-ahead for the text "<=", so every period not followed by a digit goes ("2." is
  "2", "1.5" stays); its ``re.UNICODE`` lands in ``sub``'s ``count``, so only the first 32 such periods go;
  ``\\d`` is ASCII (Python 2 without ``re.UNICODE``). A punctuation mark is deleted everywhere when it
  touches a space anywhere in the text or the text holds a digit-comma-digit ("1,000" is "1000"), else
  replaced by a space everywhere ("left-side" is "left side"), mark by mark. Contractions are looked up
  after lower-casing, so their capitalised keys ("Im") never match, as upstream.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

from fedbench.config.sections import VQA_METRICS

# The official VQA evaluation's tables (vqaEval.py): contractions written without their apostrophe,
# number words, articles and punctuation.
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
# As written upstream (see the module docstring); ASCII digits, as Python 2 matches without re.UNICODE.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
_PERIOD_COUNT = re.UNICODE.value  # upstream passes re.UNICODE as sub's third argument: count = 32
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)", re.ASCII)

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_BOX = re.compile(r"\[\s*" + r"\s*,\s*".join([_NUMBER] * 4) + r"\s*\]", re.ASCII)
BOX_SCALE = 1000  # box coordinates as written: integers on a 0-1000 grid of the image


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: each mark deleted or spaced out, then periods stripped."""
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower case, number words to digits, no articles, contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean(answer: str) -> str:
    """What the script does to every answer first: newlines and tabs to spaces, then strip."""
    return str(answer).replace("\n", " ").replace("\t", " ").strip()


@lru_cache(maxsize=1 << 20)  # answers repeat a lot (VQAv2: 2.1M human answers, a few hundred thousand distinct)
def normalize_answer(answer: str) -> str:
    """The official VQA answer processing of one answer: whitespace, punctuation, number words, articles,
    contractions."""
    return process_digit_article(process_punctuation(_clean(answer)))


def answer_scores(answers: Sequence[str]) -> dict[str, float]:
    """Normalised answer -> its VQA accuracy (``normalized`` mode) against ``answers`` (the human answers),
    for every answer some human gave; any other answer scores 0. One human answer: exact match."""
    norm = [normalize_answer(a) for a in answers]
    counts = Counter(norm)
    n = len(norm)
    if n == 1:
        return {norm[0]: 1.0}
    # leave-one-out: the m subsets without one of a's own occurrences see m - 1 matches, the others m
    return {a: (m * min(1.0, (m - 1) / 3) + (n - m) * min(1.0, m / 3)) / n for a, m in counts.items()}


def majority_answer(answers: Sequence[str]) -> str:
    """The most frequent normalised answer (first in order on ties): a ``vqa_soft`` row's training label."""
    norm = [normalize_answer(a) for a in answers]
    return Counter(norm).most_common(1)[0][0]


def vqa_accuracy_normalized(prediction: str, human_answers: Sequence[str]) -> float:
    """VQA accuracy with every answer processed (``normalized``; see the module docstring)."""
    return answer_scores(human_answers).get(normalize_answer(prediction), 0.0)


def vqa_accuracy_official(prediction: str, human_answers: Sequence[str]) -> float:
    """VQA accuracy as the official script computes it, bit for bit (``official``; see the module docstring)."""
    answers = [_clean(a) for a in human_answers]
    if not answers:
        return 0.0
    pred = _clean(prediction)
    if len(set(answers)) > 1:  # the gate: identical human answers leave everything unprocessed
        answers = [process_digit_article(process_punctuation(a)) for a in answers]
        pred = process_digit_article(process_punctuation(pred))
    total = 0.0
    for i in range(len(answers)):  # summed left to right as Python 2 did (sum() compensates from 3.12 on)
        matches = sum(a == pred for j, a in enumerate(answers) if j != i)
        total += min(1.0, float(matches) / 3)
    return total / len(answers)


def score_vqa(prediction: str, human_answers: Sequence[str], vqa_metric: str) -> float:
    """VQA accuracy of a generated answer in the protocol's ``vlm.vqa_metric`` mode."""
    if vqa_metric == "official":
        return vqa_accuracy_official(prediction, human_answers)
    if vqa_metric == "normalized":
        return vqa_accuracy_normalized(prediction, human_answers)
    raise ValueError(f"vqa_metric '{vqa_metric}' is not one of: {', '.join(VQA_METRICS)}")


def normalize_text(text: str) -> str:
    """Exact-match normalisation: lower case, whitespace stripped and collapsed, one trailing period dropped
    (LMs end short answers with one; the vocabularies' answers never do)."""
    out = " ".join(str(text).lower().split())
    return out[:-1].rstrip() if out.endswith(".") else out


def format_box(box: Sequence[float]) -> str:
    """``[x1, y1, x2, y2]``: a normalised (x0, y0, x1, y1) box as integers on the 0-1000 grid."""
    values = [float(v) for v in box]
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"a box is four finite numbers, got {list(box)}")
    return "[" + ", ".join(str(min(BOX_SCALE, max(0, round(v * BOX_SCALE)))) for v in values) + "]"


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first ``[a, b, c, d]`` of ``text`` as a normalised box, or None when there is none, or it lies
    outside 0-1000 or has x1 > x2 or y1 > y2 (a parse failure)."""
    found = _BOX.search(str(text))
    if found is None:
        return None
    x0, y0, x1, y1 = (float(v) for v in found.groups())
    if max(x0, y0, x1, y1) > BOX_SCALE or x0 > x1 or y0 > y1:
        return None
    return x0 / BOX_SCALE, y0 / BOX_SCALE, x1 / BOX_SCALE, y1 / BOX_SCALE


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes; 0 when both are empty."""
    ax0, ay0, ax1, ay1 = (float(v) for v in a)
    bx0, by0, bx1, by1 = (float(v) for v in b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0 else 0.0
