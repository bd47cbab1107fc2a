"""What the embedded generative VLM is pretrained on, and the words its tokenizer needs (issue 21).

:func:`vlm_pretrain_corpus` draws scenes of the embedded suite from a seed stream of their own (as
:func:`fedbench.tasks.scenes.pretrain_corpus` does for the CLIP backbone), so no client or test image is
among them. Per image: a caption row ("Describe the image." -> a description naming every object and both
signs) and one row per task of the suite, written as the harness writes them for the LM (the family's
``user_text`` and ``target_text``); the OCR line rides on a seeded half of those rows, so the model sees
prompts with and without it. :func:`vlm_vocabulary` lists every word those texts and the suite's own rows
can hold, for a word-level tokenizer (the embedded suite's words only: real data need a real tokenizer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from fedbench.api.data import TRAIN, ExampleTable
from fedbench.api.family import family_of
from fedbench.tasks.families.text_answers import BOX_SCALE
from fedbench.tasks.scenes import (
    CLASSES,
    LEXICON,
    N_DOMAINS,
    SIGN_COLOURS,
    TASK_SPECS,
    Scene,
    draw_scenes,
    row_for,
)

CAPTION_PROMPT = "Describe the image."
# The first key after the seed, as the suite's stream kinds (1-5: clients, global test, CLIP pretraining)
# are: one far from them ("VLM" in ASCII), so these scenes share no stream with any of them.
_STREAM = 0x564C4D
_IMAGES, _OCR, _QUESTIONS = 0, 1, 2
_VOCABULARY_SAMPLE = 64  # images whose rows show every question template (each kind has 1/4 or more per image)
_WORD = re.compile(r"[^\W_]+|\S")  # runs of letters and digits; any other mark is a word of its own


@dataclass(frozen=True)
class VLMCorpus:
    """Rows for teacher-forced pretraining: ``user_texts[r]`` about image ``image_index[r]`` -> ``answers[r]``.

    Attributes:
        images: uint8 tensor [N, 3, H, W].
        user_texts: the user turn of each row, after the image.
        answers: the text the LM is trained to write for each row.
        image_index: int64 [rows] row -> image.
    """

    images: torch.Tensor
    user_texts: list[str]
    answers: list[str]
    image_index: np.ndarray


def _rng(seed: int, part: int, task: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAM, part, task])


def caption(scene: Scene) -> str:
    """One fixed sentence pattern, largest object first, so that the pixels determine the target, e.g.
    ``a large red circle and a small blue cross. the white sign says STOP and the yellow sign says OPEN.``"""
    objects = [f"a large {scene.objects[0].name}", *(f"a small {o.name}" for o in scene.objects[1:])]
    signs = " and ".join(f"the {SIGN_COLOURS[s.colour]} sign says {LEXICON[s.word]}" for s in scene.signs)
    return f"{', '.join(objects[:-1])} and {objects[-1]}. {signs}."


def vlm_pretrain_corpus(n_images: int, seed: int, image_size: int = 64) -> VLMCorpus:
    """``n_images`` held-out scenes, each with a caption row and one row per task of the suite."""
    rng = _rng(seed, _IMAGES)
    domains = rng.integers(0, N_DOMAINS, n_images)
    classes = rng.integers(0, len(CLASSES), n_images)
    images, scenes = draw_scenes(classes, domains, rng, image_size)
    specs = list(TASK_SPECS.values())
    n_rows = n_images * len(specs)
    with_ocr = np.zeros(n_rows, bool)
    with_ocr[_rng(seed, _OCR).choice(n_rows, n_rows // 2, replace=False)] = True
    streams = [_rng(seed, _QUESTIONS, k) for k in range(len(specs))]  # one per task, as the suite keeps them
    cols: dict[str, list] = {k: [] for k in ("image", "task", "question", "ocr", "label", "box")}
    for i, scene in enumerate(scenes):
        for k, spec in enumerate(specs):
            ocr_row = bool(with_ocr[i * len(specs) + k])
            question, label, box, ocr = row_for(scene, spec.name, streams[k], image_size, ocr_row)
            for key, value in zip(cols, (i, spec.name, question, ocr, label, box), strict=True):
                cols[key].append(value)
    n = len(cols["task"])
    table = ExampleTable(  # the rows as the harness holds them, so the families write them as they will in a run
        images=images,
        image_index=np.asarray(cols["image"], np.int64),
        task=np.asarray(cols["task"], object),
        question=np.asarray(cols["question"], object),
        ocr_text=np.asarray(cols["ocr"], object),
        label=np.asarray(cols["label"], np.int64),
        box=np.asarray(cols["box"], np.float32).reshape(-1, 4),
        client=np.zeros(n, np.int64),
        split=np.full(n, TRAIN, np.int8),
        domain=domains[np.asarray(cols["image"], np.int64)],
    )
    user_texts, answers, image_index = [], [], []
    for i, scene in enumerate(scenes):
        user_texts.append(CAPTION_PROMPT)
        answers.append(caption(scene))
        image_index.append(i)
        for row in range(i * len(specs), (i + 1) * len(specs)):
            spec = TASK_SPECS[table.task[row]]
            family = family_of(spec)
            user_texts.append(family.user_text(table.question[row], table.ocr_text[row]))
            answers.append(family.target_text(spec, table, row))
            image_index.append(i)
    return VLMCorpus(images, user_texts, answers, np.asarray(image_index, np.int64))


def text_words(text: str) -> list[str]:
    """The words of ``text`` as a word-level tokenizer splits it: whitespace apart, each punctuation mark alone."""
    return _WORD.findall(text)


def vlm_vocabulary() -> list[str]:
    """Every word of the suite's questions, OCR texts, answers, captions, instructions and box targets, sorted:
    the answer vocabularies and sign colours (every value a question, caption or OCR line can name), the
    families' instructions, the numbers of the box grid, and the rows of a fixed sample of the corpus (the
    question templates, the prompt and caption patterns)."""
    sample = vlm_pretrain_corpus(_VOCABULARY_SAMPLE, seed=0)
    texts = [*sample.user_texts, *sample.answers, *SIGN_COLOURS, *(str(v) for v in range(BOX_SCALE + 1))]
    for spec in TASK_SPECS.values():
        texts += [*spec.answers, family_of(spec).instruction]
    return sorted({word for text in texts for word in text_words(text)})
