"""The embedded ``scenes`` suite: determinism, row structure, and answers that match the pixels."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedbench.api.data import GLOBAL_CLIENT, GLOBAL_TEST, TEST, TRAIN, PartitionConfig
from fedbench.api.registry import SUITES, TASKS
from fedbench.staging.partition import make_plans
from fedbench.tasks import scenes

TASK_NAMES = ["classification", "vqa", "grounding", "ocr_vqa"]
CONFIG = PartitionConfig(num_clients=4, train_images=24, test_images=8, global_test_images=20)


def _build(config: PartitionConfig = CONFIG, seed: int = 0, tasks: list[str] = TASK_NAMES):
    plans = make_plans(config, tasks, scenes.N_DOMAINS, len(scenes.CLASSES), seed)
    return plans, scenes.build_scenes(plans, config, tasks, seed)


@pytest.fixture(scope="module")
def built():
    return _build()


def _same_rows(a, b) -> bool:
    fields = ("image_index", "task", "question", "ocr_text", "label", "client", "split", "domain")
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in fields) and np.array_equal(
        a.box, b.box, equal_nan=True
    )


def test_registered():
    assert SUITES.get("scenes") is scenes.build_scenes
    assert TASKS.get("classification").answers == scenes.CLASSES
    assert TASKS.get("vqa").answers == scenes.VQA_ANSWERS
    assert TASKS.get("grounding").metric == "acc_iou50" and TASKS.get("grounding").is_box
    assert TASKS.get("ocr_vqa").uses_ocr and TASKS.get("ocr_vqa").answers == scenes.LEXICON
    assert len(scenes.CLASSES) == 12 and len(set(scenes.VQA_ANSWERS)) == len(scenes.VQA_ANSWERS)


def test_deterministic(built):
    _, table = built
    _, again = _build()
    assert torch.equal(table.images, again.images) and _same_rows(table, again)
    _, other = _build(seed=1)
    assert not torch.equal(table.images[:10], other.images[:10])


def test_adding_a_client_keeps_other_clients_data():
    _, bigger = _build(dataclasses.replace(CONFIG, num_clients=5, tasks_per_client=0))
    _, same_tasks = _build(dataclasses.replace(CONFIG, tasks_per_client=0))
    for split in (TRAIN, TEST):
        a = same_tasks.rows(client=0, split=split, task="classification")
        b = bigger.rows(client=0, split=split, task="classification")
        assert torch.equal(same_tasks.images[same_tasks.image_index[a]], bigger.images[bigger.image_index[b]])
        assert np.array_equal(same_tasks.question[a], bigger.question[b])


def test_table_structure(built):
    plans, table = built
    assert table.synthetic and table.meta["suite"] == "scenes"
    assert table.meta["n_domains"] == scenes.N_DOMAINS and table.meta["lexicon"] == list(scenes.LEXICON)
    assert table.images.dtype == torch.uint8 and table.images.shape[1:] == (3, 64, 64)
    assert len(np.unique(table.image_index)) == len(table.images)
    # every image belongs to exactly one (client, split): train/test/global are disjoint by image
    owners = {}
    for i, c, s in zip(table.image_index, table.client, table.split, strict=True):
        assert owners.setdefault(int(i), (int(c), int(s))) == (int(c), int(s))
    for plan in plans:
        for split, n in ((TRAIN, plan.n_train), (TEST, plan.n_test)):
            rows = table.rows(client=plan.client, split=split)
            assert set(table.task[rows]) == set(plan.tasks)
            assert len(np.unique(table.image_index[rows])) == n
            assert len(rows) == n * len(plan.tasks)
    g = table.rows(split=GLOBAL_TEST)
    assert set(table.client[g]) == {GLOBAL_CLIENT}
    assert len(np.unique(table.image_index[g])) == CONFIG.global_test_images
    for i in np.unique(table.image_index[g]):
        assert sorted(table.task[table.image_index == i]) == sorted(TASK_NAMES)


def test_rows_only_for_requested_tasks():
    plans = make_plans(CONFIG, TASK_NAMES, scenes.N_DOMAINS, 12, 0)
    table = scenes.build_scenes(plans, CONFIG, ["vqa", "grounding"], 0)
    assert set(table.task) == {"vqa", "grounding"}
    with pytest.raises(ValueError, match="unknown task"):
        scenes.build_scenes(plans, CONFIG, ["vqa", "nope"], 0)


def test_labels_and_boxes(built):
    _, table = built
    box = table.box[table.task == "grounding"]
    assert np.isfinite(box).all() and (box >= 0).all() and (box <= 1).all()
    assert (box[:, 2] > box[:, 0]).all() and (box[:, 3] > box[:, 1]).all()
    assert np.isnan(table.box[table.task != "grounding"]).all()
    assert (table.label[table.task == "grounding"] == -1).all()
    for task in ("classification", "vqa", "ocr_vqa"):
        labels = table.label[table.task == task]
        assert labels.min() >= 0 and labels.max() < TASKS.get(task).num_answers
    assert (table.question[table.task == "classification"] == scenes.CLASSIFICATION_PROMPT).all()


def test_grounding_box_holds_the_named_object(built):
    _, table = built
    size = table.images.shape[-1]
    for r in table.rows(task="grounding"):
        colour = scenes.COLOURS.index(table.question[r].split()[1])
        x0, y0, x1, y1 = table.box[r] * size
        cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)  # inside every shape (triangle included)
        patch = table.images[table.image_index[r], :, cy - 1 : cy + 2, cx - 1 : cx + 2].float().mean((1, 2))
        assert int(patch.argmax()) == colour, table.question[r]


def test_ocr_rows(built):
    plans, table = built
    ocr_clients = {p.client for p in plans if p.has_ocr}
    assert 0 < len(ocr_clients) < len(plans)
    for r in table.rows(task="ocr_vqa"):
        words = table.ocr_text[r].split()
        if table.client[r] in ocr_clients or table.client[r] == GLOBAL_CLIENT:
            assert len(words) == 2 and scenes.LEXICON[table.label[r]] in words
        else:
            assert words == []
        sign_colour = table.question[r].split()[3]
        assert sign_colour in scenes.SIGN_COLOURS
    # OCR is the client's modality: every row of an OCR client (and of the global test) carries the
    # image's words, whatever the task; no row of a client without OCR does
    has_text = np.array([bool(t) for t in table.ocr_text])
    with_ocr = np.isin(table.client, [*ocr_clients, GLOBAL_CLIENT])
    assert (has_text == with_ocr).all()
    for image in np.unique(table.image_index):
        assert len(set(table.ocr_text[table.image_index == image])) == 1  # one image, one OCR text


def test_scene_layout_and_requested_class():
    rng = np.random.default_rng(3)
    classes, domains = np.arange(48) % 12, np.arange(48) % scenes.N_DOMAINS
    images, drawn = scenes.draw_scenes(classes, domains, rng, image_size=64)
    assert images.shape == (48, 3, 64, 64)
    for cls, dom, scene in zip(classes, domains, drawn, strict=True):
        assert scene.objects[0].cls == cls and scene.domain == dom
        assert 2 <= len(scene.objects) <= 3 and len({o.cls for o in scene.objects}) == len(scene.objects)
        side = [o.box[2] - o.box[0] for o in scene.objects]
        assert side[0] > max(side[1:])
        assert scene.signs[0].box[0] <= scene.signs[1].box[0]  # reading order
        assert scene.signs[0].word != scene.signs[1].word and scene.signs[0].colour != scene.signs[1].colour
        boxes = [o.box for o in scene.objects] + [s.box for s in scene.signs]
        for i, a in enumerate(boxes):
            assert 0 <= a[0] < a[2] <= 64 and 0 <= a[1] < a[3] <= 64
            for b in boxes[i + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_vqa_answers_match_scene():
    rng = np.random.default_rng(5)
    _, drawn = scenes.draw_scenes(rng.integers(0, 12, 200), rng.integers(0, scenes.N_DOMAINS, 200), rng)
    answers = []
    for scene in drawn:
        question, label, _, _ = scenes.row_for(scene, "vqa", rng, 64, True)
        answer = scenes.VQA_ANSWERS[label]
        answers.append(answer)
        names = [o.name for o in scene.objects]
        words = question.rstrip("?").split()
        if question.startswith("how many"):
            assert answer == scenes.COUNT_WORDS[len(names) - 2]
        elif question.startswith("is there"):
            assert (answer == "yes") == (" ".join(words[3:5]) in names)
        elif question.startswith("what colour"):
            matches = [n for n in names if n.endswith(" " + words[-1])]
            assert matches == [f"{answer} {words[-1]}"]
        else:
            matches = [n for n in names if n.startswith(words[4] + " ")]
            assert matches == [f"{words[4]} {answer}"]
    assert 0.3 < answers.count("yes") / (answers.count("yes") + answers.count("no")) < 0.7


def test_pretrain_corpus(built):
    _, table = built
    images, captions, labels = scenes.pretrain_corpus(40, seed=0)
    assert images.shape == (40, 3, 64, 64) and len(captions) == 40 and labels.shape == (40,)
    again = scenes.pretrain_corpus(40, seed=0)
    assert torch.equal(images, again[0]) and captions == again[1]
    for caption, label in zip(captions, labels, strict=True):
        assert f"a large {scenes.CLASSES[label]}" in caption
    assert len(set(captions)) == 40
    flat = {bytes(img.numpy()) for img in table.images}
    assert not any(bytes(img.numpy()) in flat for img in images)
    prompts = scenes.zero_shot_prompts()
    assert len(prompts) == 12 and all(c in p for c, p in zip(scenes.CLASSES, prompts, strict=True))
