"""Answers as text (generative VLM): VQA accuracy in both modes, exact match, boxes, the families' targets and
scores, and the held-out pretraining corpus of the embedded VLM with its vocabulary.

The ``official`` expectations follow the rules of the VQA evaluation script (vqaEval.py, 2021); the float
values with a last-bit difference are what Python 2.7 prints running that script on the same answers.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import real_fixtures as rf
import torch
from conftest import TINY

from fedbench.api.data import TRAIN, ExampleTable, PartitionConfig
from fedbench.api.family import family_of
from fedbench.api.registry import FAMILIES, TASKS
from fedbench.staging.partition import make_plans
from fedbench.tasks import real, scenes
from fedbench.tasks.families.text_answers import (
    box_iou,
    format_box,
    normalize_text,
    parse_box,
    process_digit_article,
    process_punctuation,
    score_vqa,
    vqa_accuracy_normalized,
    vqa_accuracy_official,
)
from fedbench.tasks.vlm_corpus import CAPTION_PROMPT, text_words, vlm_pretrain_corpus, vlm_vocabulary


@pytest.fixture(scope="module")
def tiny_table() -> ExampleTable:
    """The embedded suite's table of the tiny protocol, seed 0 (as ``prepare`` draws it)."""
    tasks = list(TINY.tasks)
    plans = make_plans(TINY.data, tasks, scenes.N_DOMAINS, len(scenes.CLASSES), 0)
    return scenes.build_scenes(plans, TINY.data, tasks, 0)


def _one_row(*, label: int = -1, box=(np.nan,) * 4, human_answers=None) -> ExampleTable:
    humans = None
    if human_answers is not None:
        humans = np.empty(1, object)
        humans[0] = tuple(human_answers)
    return ExampleTable(
        torch.zeros(1, 3, 4, 4, dtype=torch.uint8), np.zeros(1, np.int64), np.array(["t"], object),
        np.array(["q"], object), np.array([""], object), np.array([label]), np.array([box], np.float32),
        np.zeros(1, np.int64), np.array([TRAIN], np.int8), np.zeros(1, np.int64), human_answers=humans,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ VQA accuracy


@pytest.mark.parametrize(
    ("prediction", "answers", "official", "normalized"),
    [
        ("Yes", ["yes"] * 10, 0.0, 1.0),  # identical answers: nothing is processed, case counts
        ("yes.", ["yes"] * 10, 0.0, 1.0),  # ... and so does the period
        ("yes", ["yes"] * 10, 1.0, 1.0),
        (" yes\n", ["yes"] * 10, 1.0, 1.0),  # newlines, tabs and the ends are cleaned before the gate
        ("two", ["2"] * 10, 0.0, 1.0),
        ("2", ["two"] * 3 + ["three"] * 7, 0.9, 0.9),  # answers differ: number words become digits
        ("dog", ["a dog"] * 4 + ["cat"] * 6, 1.0, 1.0),  # ... articles go
        ("dog", ["a dog"] * 10, 0.0, 1.0),
        ("don't", ["dont"] * 3 + ["no"] * 7, 0.9, 0.9),  # ... contractions get their apostrophe
        ("1000", ["1,000"] * 3 + ["500"] * 7, 0.9, 0.9),  # digit-comma-digit: the comma goes
        ("red blue", ["red,blue"] * 4 + ["red"] * 6, 1.0, 1.0),  # no space next to it: a space instead
        ("yes", ["yes"], 0.0, 1.0),  # one human answer: the script's only subset is empty
        ("yes", [], 0.0, 0.0),
    ],
)
def test_official_and_normalized_modes(prediction, answers, official, normalized):
    assert vqa_accuracy_official(prediction, answers) == official
    assert vqa_accuracy_normalized(prediction, answers) == pytest.approx(normalized)
    assert score_vqa(prediction, answers, "official") == official


def test_leave_one_out_means_by_hand():
    # m of 10 humans gave the answer: m subsets (one of them left out) see m - 1, the other 10 - m see m
    three = ["cat"] * 3 + ["dog"] * 7
    assert vqa_accuracy_official("cat", three) == pytest.approx((3 * (2 / 3) + 7 * 1) / 10) == pytest.approx(0.9)
    assert vqa_accuracy_official("cat", ["cat"] * 4 + ["dog"] * 6) == 1.0
    two = ["cat"] * 2 + ["dog"] * 8
    assert vqa_accuracy_official("cat", two) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10) == pytest.approx(0.6)
    assert vqa_accuracy_official("cat", ["cat"] + ["dog"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    # summed in the script's order, as Python 2.7 prints them: bit for bit, not only approximately
    assert repr(vqa_accuracy_official("cat", two)) == "0.6"
    assert repr(vqa_accuracy_official("cat", two[::-1])) == "0.5999999999999999"


def test_the_scripts_punctuation_quirks():
    assert process_punctuation("left-side") == "left side" and process_punctuation("red, blue") == "red blue"
    assert process_punctuation("1,000-yes") == "1000yes"  # a digit-comma-digit deletes every mark
    assert process_punctuation("2.") == "2" and process_punctuation("1.5") == "1.5"  # "(?!<=" is no look-behind
    assert process_punctuation("a." * 40) == "a" * 32 + "a." * 8  # re.UNICODE is sub's count: 32 periods
    assert process_punctuation("\u0663.\u0665") == "\u0663\u0665"  # ASCII digits only, as in Python 2
    assert process_digit_article(process_punctuation("a - b")) == "b"  # "a" is an article once spaced out
    assert process_digit_article("The Two dogs") == "2 dogs" and process_digit_article("Im") == "im"
    assert vqa_accuracy_official("a" * 40, ["a." * 40] * 3 + ["b"] * 7) == 0.0


def test_unknown_vqa_metric_is_refused():
    with pytest.raises(ValueError, match="official, normalized"):
        score_vqa("yes", ["yes"], "lenient")


# --------------------------------------------------------------------------------- exact match and boxes


def test_exact_match_normalisation():
    assert normalize_text("  Red   Circle. ") == "red circle"
    assert normalize_text("STOP\n") == "stop" and normalize_text("yes .") == "yes"
    assert normalize_text("") == normalize_text(" . ") == ""


def test_box_format_parse_round_trip(tiny_table):
    boxes = tiny_table.box[tiny_table.task == "grounding"]
    assert len(boxes)
    for box in boxes:
        text = format_box(box)
        assert text.startswith("[") and text.count(", ") == 3
        parsed = parse_box(text)
        assert parsed == tuple(round(float(v) * 1000) / 1000 for v in box)
        assert box_iou(parsed, box) > 0.9
    assert format_box((0.0, -0.01, 1.2, 0.5)) == "[0, 0, 1000, 500]"  # clamped to the grid
    with pytest.raises(ValueError, match="four finite"):
        format_box((np.nan,) * 4)


@pytest.mark.parametrize(
    ("text", "box"),
    [
        ("[ 123 , 45 , 678 , 900 ]", (0.123, 0.045, 0.678, 0.9)),  # a word-level tokenizer's spacing
        ("The box is [10, 20, 30.5, 40].", (0.01, 0.02, 0.0305, 0.04)),
        ("[1, 2] then [0, 0, 1000, 1000] and [5, 5, 6, 6]", (0.0, 0.0, 1.0, 1.0)),  # the first list of four
    ],
)
def test_parse_box_reads_the_first_list_of_four(text, box):
    assert parse_box(text) == pytest.approx(box)


@pytest.mark.parametrize(
    "text",
    ["(1, 2, 3, 4)", "[1, 2, 3]", "[1, 2, 3, 4, 5]", "left", "", "[5, 5, 1, 1]", "[0, 0, 1001, 10]",
     "[-1, 0, 5, 5]", "[a, b, c, d]", "[1, 2, 3, 4"],
)  # fmt: skip
def test_unparsable_boxes_score_zero_without_raising(text):
    # parentheses are not the format the instruction asks for (lmms-eval's RefCOCO parser reads brackets too)
    assert parse_box(text) is None
    assert FAMILIES.get("grounding").score_text(TASKS.get("grounding"), _one_row(box=(0, 0, 1, 1)), 0, text, "") == (
        0.0,
        False,
    )


def test_grounding_scores_iou_at_one_half():
    fam, spec, table = FAMILIES.get("grounding"), TASKS.get("grounding"), _one_row(box=(0, 0, 1, 1))
    assert box_iou((0, 0, 0.5, 1), (0, 0, 1, 1)) == 0.5
    assert fam.score_text(spec, table, 0, "[0, 0, 500, 1000]", "official") == (1.0, True)  # IoU 0.5 exactly
    assert fam.score_text(spec, table, 0, "[0, 0, 499, 1000]", "official") == (0.0, True)
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


# ------------------------------------------------------------------------------- the families' contract


def test_instructions_and_generation_budgets():
    short = "Answer the question using a single word or phrase."
    expected = {
        "classification": ("Answer with the class name.", 8),
        "vqa": (short, 8),
        "ocr_vqa": (short, 8),
        "vqa_soft": (short, 8),
        "grounding": ("Answer with the bounding box as [x1, y1, x2, y2], coordinates from 0 to 1000.", 12),
    }
    assert {name: (FAMILIES.get(name).instruction, FAMILIES.get(name).max_new_tokens) for name in expected} == expected


def test_target_text_of_the_tiny_table(tiny_table):
    table = tiny_table
    for task in ("classification", "vqa", "grounding", "ocr_vqa"):
        spec = TASKS.get(task)
        family = family_of(spec)
        for row in table.rows(task=task)[:5]:
            target = family.target_text(spec, table, row)
            if task == "grounding":
                assert target == format_box(table.box[row]) and box_iou(parse_box(target), table.box[row]) > 0.9
                assert family.score_text(spec, table, row, target, "official") == (1.0, True)
                continue
            assert target == spec.answers[table.label[row]]
            assert family.score_text(spec, table, row, f" {target.upper()}.", "official") == (1.0, True)
            if task == "ocr_vqa" and table.ocr_text[row]:
                assert target in table.ocr_text[row].split()
    row = int(table.rows(task="classification")[0])
    spec, family = TASKS.get("classification"), FAMILIES.get("classification")
    wrong = next(a for a in spec.answers if a != spec.answers[table.label[row]])
    assert family.score_text(spec, table, row, wrong, "official") == (0.0, True)
    assert family.score_text(spec, table, row, " . ", "official") == (0.0, False)  # empty: a parse failure


def test_answer_families_on_rows_without_a_vocabulary_answer():
    spec, family = TASKS.get("vqa"), FAMILIES.get("vqa")
    table = _one_row(label=-1)  # real data: a test row whose answer no training client gave
    assert family.score_text(spec, table, 0, "yes", "official") == (0.0, True)
    with pytest.raises(ValueError, match="no answer in the vocabulary"):
        family.target_text(spec, table, 0)


def test_vqa_soft_scores_generated_text_against_the_raw_human_answers():
    spec = dataclasses.replace(TASKS.get("vqav2"), answers=("yes", "no"))
    family = family_of(spec)
    table = _one_row(label=0, human_answers=["yes"] * 10)
    assert family.target_text(spec, table, 0) == "yes"
    assert family.score_text(spec, table, 0, "Yes", "official") == (0.0, True)
    assert family.score_text(spec, table, 0, "Yes", "normalized") == (1.0, True)
    assert family.score_text(spec, table, 0, "", "normalized") == (0.0, False)
    bare = _one_row(label=0)  # no human answers kept: exact match on the label
    assert family.score_text(spec, bare, 0, "Yes.", "official") == (1.0, True)


def test_real_vqa_rows_keep_their_raw_human_answers(tmp_path, monkeypatch):
    from fedbench.api.data import ClientPlan

    monkeypatch.setenv("FEDBENCH_CACHE", str(tmp_path / "cache"))
    rf.vqav2(tmp_path / "v")
    config = PartitionConfig(
        suite="real", num_clients=2, train_images=4, test_images=2, global_test_images=4, image_size=16,
        sources={"vqav2": str(tmp_path / "v")},
    )  # fmt: skip
    plans = [ClientPlan(c, ("vqav2",), 4, 2, (1.0,), None, True) for c in range(2)]
    table = real.build_real(plans, config, ["vqav2"], seed=0)
    assert table.human_answers is not None and table.human_answers.shape == (len(table),)
    spec = dataclasses.replace(TASKS.get("vqav2"), answers=tuple(table.meta["answers"]["vqav2"]))
    family = family_of(spec)
    raw = set()
    for row in range(len(table)):
        humans = table.human_answers[row]
        assert isinstance(humans, tuple) and len(humans) == 10
        raw |= set(humans)
        if table.label[row] >= 0:  # 7 of 10 humans gave the training answer, in some spelling; 3 another answer
            target = family.target_text(spec, table, row)
            for mode in ("official", "normalized"):  # answers that differ are processed in both modes
                assert family.score_text(spec, table, row, target, mode) == (1.0, True)
    assert {"two", "a dog", "Yes."} & raw  # as the dataset wrote them, before normalisation


# ------------------------------------------------------------------------------ the VLM pretraining corpus


def test_vlm_corpus_is_deterministic_and_held_out(tiny_table):
    corpus = vlm_pretrain_corpus(24, seed=0)
    again = vlm_pretrain_corpus(24, seed=0)
    assert torch.equal(corpus.images, again.images) and corpus.user_texts == again.user_texts
    assert corpus.answers == again.answers and np.array_equal(corpus.image_index, again.image_index)
    assert not torch.equal(vlm_pretrain_corpus(24, seed=1).images, corpus.images)
    assert corpus.images.shape == (24, 3, 64, 64) and corpus.images.dtype == torch.uint8
    seen = {bytes(img.numpy()) for img in tiny_table.images}
    assert not any(bytes(img.numpy()) in seen for img in corpus.images)
    clip = {bytes(img.numpy()) for img in scenes.pretrain_corpus(24, seed=0)[0]}  # nor the CLIP backbone's
    assert not any(bytes(img.numpy()) in clip for img in corpus.images)


def test_vlm_corpus_rows():
    corpus = vlm_pretrain_corpus(24, seed=0)
    per_image = 1 + len(scenes.TASK_SPECS)
    assert len(corpus.user_texts) == len(corpus.answers) == len(corpus.image_index) == 24 * per_image
    assert np.array_equal(corpus.image_index, np.repeat(np.arange(24), per_image))
    captions = corpus.user_texts[::per_image]
    assert set(captions) == {CAPTION_PROMPT}
    task_rows = [t for i, t in enumerate(corpus.user_texts) if i % per_image]
    assert sum(t.startswith("OCR: ") for t in task_rows) == len(task_rows) // 2  # a seeded half
    instructions = {family_of(s).instruction for s in scenes.TASK_SPECS.values()}
    assert all(t.split("\n")[-1] in instructions for t in task_rows)
    for text, answer in zip(corpus.user_texts, corpus.answers, strict=True):
        if text != CAPTION_PROMPT:  # every target fits its family's generation budget, with the end token
            family = next(f for f in map(family_of, scenes.TASK_SPECS.values()) if text.endswith(f.instruction))
            assert len(text_words(answer)) + 1 <= family.max_new_tokens


def test_vlm_vocabulary_covers_the_corpus_and_the_suites_rows(tiny_table):
    vocabulary = vlm_vocabulary()
    assert vocabulary == sorted(set(vocabulary)) and {"0", "500", "1000", "[", "]", ","} <= set(vocabulary)
    words = set(vocabulary)
    corpus = vlm_pretrain_corpus(40, seed=3)
    assert all(set(text_words(t)) <= words for t in [*corpus.user_texts, *corpus.answers])
    table = tiny_table
    for row in range(len(table)):
        spec = TASKS.get(str(table.task[row]))
        family = family_of(spec)
        texts = [family.user_text(table.question[row], table.ocr_text[row]), family.target_text(spec, table, row)]
        assert all(set(text_words(t)) <= words for t in texts), texts
