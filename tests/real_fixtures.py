"""Tiny parquet snapshots of the real datasets, in each hub dataset's schema and file layout.

Each writer lays out ``DIR`` as ``huggingface-cli download --repo-type dataset REPO --local-dir DIR``
does (``data/<split>-00000-of-00001.parquet``, or a config subfolder for CIFAR-100), with the same
column names and types (HF features kept in the parquet metadata, images embedded as
``{'bytes': png, 'path': name}`` like an ``Image`` feature), and returns what the test checks against.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

VQA_ANSWERS = ["yes", "no", "2", "red", "dog"]
QUESTION_TYPES = ["what color is the", "how many", "is the", "what is the", "are there"]  # VQAv2's question_type


def png(rng: np.random.Generator, w: int = 24, h: int = 16) -> dict:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": f"img{rng.integers(1e9)}.png"}


def _write(root: Path, rel: str, data: dict, features) -> None:
    from datasets import Dataset

    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(data, features=features).to_parquet(str(path))


def vqav2(root: Path, n_images: int = 12, per_image: int = 3, seed: int = 0) -> None:
    """lmms-lab/VQAv2 (validation split): 10 answers as {answer, answer_confidence, answer_id}."""
    from datasets import Features, Image, Sequence, Value

    rng = np.random.default_rng(seed)
    features = Features(
        {
            "question_type": Value("string"),
            "multiple_choice_answer": Value("string"),
            "answers": [{"answer": Value("string"), "answer_confidence": Value("string"), "answer_id": Value("int64")}],
            "image_id": Value("int64"),
            "answer_type": Value("string"),
            "question_id": Value("int64"),
            "question": Value("string"),
            "image": Image(),
        }
    )
    del Sequence
    cols = {k: [] for k in features}
    for i in range(n_images):
        image = png(rng)
        for j in range(per_image):
            main = VQA_ANSWERS[(i + j) % len(VQA_ANSWERS)]
            spoken = {"2": "two", "dog": "a dog", "yes": "Yes."}.get(main, main)  # normalisation must undo these
            others = [VQA_ANSWERS[(i + j + 1) % len(VQA_ANSWERS)]] * 3
            answers = [spoken] * 7 + others
            cols["question_type"].append(QUESTION_TYPES[(i * per_image + j) % len(QUESTION_TYPES)])
            cols["multiple_choice_answer"].append(main)
            cols["answers"].append(
                [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)]
            )
            cols["image_id"].append(1000 + i)
            cols["answer_type"].append("yes/no" if main in ("yes", "no") else "number" if main == "2" else "other")
            cols["question_id"].append(1000 * i + j)
            cols["question"].append(f"question {j} about image {i}?")
            cols["image"].append(image)
    _write(root, "data/validation-00000-of-00001.parquet", cols, features)


def textvqa(root: Path, n: int = 24, seed: int = 1) -> None:
    """lmms-lab/textvqa: 10 answers as strings, ocr_tokens; train and validation splits."""
    from datasets import Features, Image, Value

    features = Features(
        {
            "image_id": Value("string"),
            "question_id": Value("int32"),
            "question": Value("string"),
            "question_tokens": [Value("string")],
            "image": Image(),
            "image_width": Value("int32"),
            "image_height": Value("int32"),
            "flickr_original_url": Value("string"),
            "flickr_300k_url": Value("string"),
            "answers": [Value("string")],
            "image_classes": [Value("string")],
            "set_name": Value("string"),
            "ocr_tokens": [Value("string")],
        }
    )
    rng = np.random.default_rng(seed)
    words = ["STOP", "CAFE", "EXIT", "BANK"]
    for split, count in (("train", n), ("validation", n // 2)):
        cols = {k: [] for k in features}
        for i in range(count):
            word = words[i % len(words)]
            q = "what does the sign say?"
            cols["image_id"].append(f"{split}{i}")
            cols["question_id"].append(i)
            cols["question"].append(q)
            cols["question_tokens"].append(q.split())
            cols["image"].append(png(rng))
            cols["image_width"].append(24)
            cols["image_height"].append(16)
            cols["flickr_original_url"].append("")
            cols["flickr_300k_url"].append("")
            cols["answers"].append([word.lower()] * 9 + ["unanswerable"])
            cols["image_classes"].append(["Sign"])
            cols["set_name"].append(split)
            cols["ocr_tokens"].append([word, "open", "24h"])
        _write(root, f"data/{split}-00000-of-00001.parquet", cols, features)


def ocrvqa(root: Path, n: int = 10, seed: int = 2) -> None:
    """howard-hou/OCR-VQA: one row per image, parallel questions / answers lists, ocr_tokens, ocr_info."""
    from datasets import Features, Image, Value

    box = {"width": Value("float32"), "height": Value("float32"), "top_left_x": Value("float32")}
    box["top_left_y"] = Value("float32")
    features = Features(
        {
            "image": Image(),
            "image_id": Value("string"),
            "questions": [Value("string")],
            "answers": [Value("string")],
            "ocr_tokens": [Value("string")],
            "ocr_info": [{"word": Value("string"), "bounding_box": box}],
            "title": Value("string"),
            "authorName": Value("string"),
            "genre": Value("string"),
            "image_width": Value("int64"),
            "image_height": Value("int64"),
            "set_name": Value("string"),
        }
    )
    rng = np.random.default_rng(seed)
    genres = ["Travel", "Cookbooks", "Travel", "Humor"]
    for split, count in (("train", n), ("validation", n // 2)):
        cols = {k: [] for k in features}
        for i in range(count):
            genre, title = genres[i % len(genres)], f"Book {i}"
            tokens = ["Book", str(i), "by", "Ann"]
            cols["image"].append(png(rng))
            cols["image_id"].append(f"{split}{i}")
            cols["questions"].append(["Who wrote this book?", "What is the genre of this book?", "Is this a novel?"])
            cols["answers"].append(["Ann", genre, "No"])
            cols["ocr_tokens"].append(tokens)
            cols["ocr_info"].append(
                [
                    {"word": t, "bounding_box": {"width": 0.1, "height": 0.1, "top_left_x": 0.1, "top_left_y": 0.1}}
                    for t in tokens
                ]
            )
            cols["title"].append(title)
            cols["authorName"].append("Ann")
            cols["genre"].append(genre)
            cols["image_width"].append(24)
            cols["image_height"].append(16)
            cols["set_name"].append(split)
        _write(root, f"data/{split}-00000-of-00001.parquet", cols, features)


CIFAR_FINE = ["apple", "aquarium_fish", "baby", "bear", "beaver"]


def cifar100(root: Path, n: int = 30, seed: int = 3) -> None:
    """uoft-cs/cifar100: ``img``, ``fine_label``, ``coarse_label`` ClassLabels, in the ``cifar100/`` folder."""
    from datasets import ClassLabel, Features, Image

    features = Features(
        {
            "img": Image(),
            "fine_label": ClassLabel(names=CIFAR_FINE),
            "coarse_label": ClassLabel(names=["fruit_and_vegetables", "fish", "people", "large_carnivores"]),
        }
    )
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("test", n // 2)):
        cols = {"img": [png(rng, 32, 32) for _ in range(count)]}
        cols["fine_label"] = [i % len(CIFAR_FINE) for i in range(count)]
        cols["coarse_label"] = [i % 4 for i in range(count)]
        _write(root, f"cifar100/{split}-00000-of-00001.parquet", cols, features)


DOMAINS = ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]
DOMAINNET_CLASSES = ["aircraft_carrier", "airplane", "alarm_clock", "ambulance"]


def domainnet(root: Path, n: int = 48, seed: int = 4) -> None:
    """wltjr1007/DomainNet: ``image``, ``label`` and ``domain`` ClassLabels (domain names in the features)."""
    from datasets import ClassLabel, Features, Image

    features = Features(
        {"image": Image(), "label": ClassLabel(names=DOMAINNET_CLASSES), "domain": ClassLabel(names=DOMAINS)}
    )
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("test", n // 4)):
        cols = {
            "image": [png(rng) for _ in range(count)],
            "label": [i % len(DOMAINNET_CLASSES) for i in range(count)],
            "domain": [(i // 2) % len(DOMAINS) for i in range(count)],
        }
        _write(root, f"data/{split}-00000-of-00001.parquet", cols, features)


def refcoco(root: Path, n: int = 16, seed: int = 5) -> list[tuple[list[float], int, int]]:
    """lmms-lab/RefCOCO (val split): one row per object, ``answer`` its expressions, ``bbox`` [x, y, w, h] px."""
    from datasets import Features, Image, Value

    features = Features(
        {
            "question_id": Value("string"),
            "image": Image(),
            "question": Value("string"),
            "answer": [Value("string")],
            "segmentation": [Value("float32")],
            "bbox": [Value("float32")],
            "iscrowd": Value("int8"),
            "file_name": Value("string"),
        }
    )
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in features}
    boxes = []
    for i in range(n):
        w, h = 40, 20
        bbox = [4.0 + i % 3, 2.0, 20.0, 10.0]
        boxes.append((bbox, w, h))
        cols["question_id"].append(str(i))
        cols["image"].append(png(rng, w, h))
        cols["question"].append("Please carefully observe the area circled in the image and come up with a caption.")
        cols["answer"].append([f"the thing on the left {i}", f"left object {i}"])
        cols["segmentation"].append([0.0] * 8)
        cols["bbox"].append(bbox)
        cols["iscrowd"].append(0)
        cols["file_name"].append(f"COCO_train2014_{i:012d}.jpg")
    _write(root, "data/val-00000-of-00001.parquet", cols, features)
    return boxes


def solid(color: tuple[int, int, int], w: int = 20, h: int = 14) -> dict:
    """A PNG of one colour: after any resize its pixels still say which image it was."""
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": f"{color}.png"}


GQA_STRUCTURAL = ["verify", "query", "choose", "logical", "compare"]
GQA_SEMANTIC = ["attr", "rel", "obj", "cat", "global"]
GQA_ANSWERS = ["yes", "no", "left", "two", "table"]  # "two" is "2" once normalised


def gqa_color(image_id: str) -> tuple[int, int, int]:
    k = int(image_id[1:])
    return (k * 37 % 256, k * 91 % 256, k * 13 % 256)


def gqa(root: Path, n_images: int = 10, per_image: int = 4, seed: int = 6) -> dict[str, dict[str, str]]:
    """lmms-lab/GQA: ``{split}_balanced_instructions`` (questions, one ``answer`` each, ``types`` struct) and
    ``{split}_balanced_images`` (``id``, ``image``) config folders for ``train`` and ``testdev``; each image a
    solid colour (:func:`gqa_color` of its id). The image configs list the images in another order than the
    questions name them, and hold one image no question names. Returns split -> question id -> imageId."""
    from datasets import Features, Image, Value

    obj = [{"objectId": Value("string"), "value": Value("string")}]
    features = Features(
        {
            "id": Value("string"),
            "imageId": Value("string"),
            "question": Value("string"),
            "answer": Value("string"),
            "fullAnswer": Value("string"),
            "isBalanced": Value("bool"),
            "groups": {"global": Value("string"), "local": Value("string")},
            "entailed": Value("string"),
            "equivalent": Value("string"),
            "types": {"structural": Value("string"), "semantic": Value("string"), "detailed": Value("string")},
            "annotations": {"answer": obj, "question": obj, "fullAnswer": obj},
            "semantic": [{"operation": Value("string"), "argument": Value("string"), "dependencies": [Value("int32")]}],
            "semanticStr": Value("string"),
        }
    )
    image_features = Features({"id": Value("string"), "image": Image()})
    rng = np.random.default_rng(seed)
    joins: dict[str, dict[str, str]] = {}
    for split, count, first in (("train", n_images, 0), ("testdev", n_images // 2, 100)):
        cols = {k: [] for k in features}
        ids = [f"n{first + i}" for i in range(count)]
        joins[split] = {}
        for i, image_id in enumerate(ids):
            for j in range(per_image):
                q = i * per_image + j
                answer = GQA_ANSWERS[q % len(GQA_ANSWERS)]
                qid = f"{split}{q:05d}"
                joins[split][qid] = image_id
                cols["id"].append(qid)
                cols["imageId"].append(image_id)
                cols["question"].append(f"Question {j} about the picture {image_id}?")
                cols["answer"].append(answer)
                cols["fullAnswer"].append(f"The answer is {answer}.")
                cols["isBalanced"].append(True)
                cols["groups"].append({"global": None, "local": f"10q-{image_id}"})
                cols["entailed"].append("")
                cols["equivalent"].append(qid)
                cols["types"].append(
                    {
                        "structural": GQA_STRUCTURAL[q % len(GQA_STRUCTURAL)],
                        "semantic": GQA_SEMANTIC[(q // 2) % len(GQA_SEMANTIC)],
                        "detailed": f"type{q % 7}",
                    }
                )
                mention = [{"objectId": "1", "value": "2"}]
                cols["annotations"].append({"answer": [], "question": mention, "fullAnswer": []})
                cols["semantic"].append([{"operation": "select", "argument": "table (1)", "dependencies": []}])
                cols["semanticStr"].append("select: table (1)")
        _write(root, f"{split}_balanced_instructions/{split}-00000-of-00001.parquet", cols, features)
        listed = [ids[k] for k in rng.permutation(count)] + [f"n{first + 99}"]  # another order, one unasked
        images = {"id": listed, "image": [solid(gqa_color(k)) for k in listed]}
        _write(root, f"{split}_balanced_images/{split}-00000-of-00001.parquet", images, image_features)
    return joins


WRITERS = {
    "vqav2": vqav2,
    "textvqa": textvqa,
    "ocrvqa": ocrvqa,
    "cifar100": cifar100,
    "domainnet": domainnet,
    "refcoco": refcoco,
    "gqa": gqa,
}
