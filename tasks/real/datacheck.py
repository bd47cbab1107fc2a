"""``fedbench data check``: a real dataset validated against its adapter and summarised before a long run."""

from __future__ import annotations

import numpy as np

from fedbench.api.data import DataError
from fedbench.api.registry import FAMILIES
from fedbench.tasks.real.adapters import ADAPTERS
from fedbench.tasks.real.images import open_image, xywh_to_unit_xyxy
from fedbench.tasks.real.partition import vocabulary
from fedbench.tasks.real.sources import load_split, read_examples, resolve_source


def check(source: str, task: str) -> dict:
    """Validate a dataset against its adapter and summarise it (``fedbench data check``): rows and
    examples per split, the answer vocabulary, the images (count, and the first one decoded), boxes, OCR."""

    from datasets import Image as ImageFeature

    from fedbench.tasks.families.vqa_soft import majority_answer

    if task not in ADAPTERS:
        raise DataError(f"no real-data adapter '{task}'; adapters: {', '.join(sorted(ADAPTERS))}")
    adapter = ADAPTERS[task]
    family = FAMILIES.get(adapter.family)
    root = resolve_source(source, adapter)
    out: dict = {"task": task, "dataset": adapter.repo, "family": adapter.family, "root": str(root), "splits": {}}
    splits = [adapter.train_split] + ([adapter.test_split] if adapter.test_split else [])
    for split in splits:
        ds = load_split(root, adapter, split)
        ex = read_examples(root, adapter, split)
        keys = set(ex.image_key.tolist())
        images = load_split(root, adapter, split, images=True)
        first = images.select_columns([adapter.image_column])
        first = first.cast_column(adapter.image_column, ImageFeature(decode=False))
        image = open_image(first[0][adapter.image_column], adapter, split, 0)
        info = {
            "rows": len(ds),
            "examples": len(ex),
            "images": len(keys),
            "first_image": f"{image.format} {image.size[0]}x{image.size[1]} {image.mode}",
            "domains": list(ex.domain_names),
        }
        if adapter.image_config:
            info["image_rows"] = len(images)  # the image config joined to the questions
        for name in adapter.natural_splits:  # how many values each natural split would deal to clients
            if name in ex.natural:
                info[f"natural_{name}"] = len(ex.natural[name][0])
        if family.has_answers:
            labels = [a[0] if ex.classes else majority_answer(a) for a in ex.answers]
            vocab = vocabulary(labels, 10**9)
            info["answers"] = len(vocab)
            info["top_answers"] = list(vocab[:8])
            info["human_answers_per_example"] = round(float(np.mean([len(a) for a in ex.answers])), 2) if len(ex) else 0
        else:
            w, h = image.size
            info["first_box_xywh_px"] = ex.box_xywh[0].tolist()
            info["first_box_unit_xyxy"] = [
                round(float(v), 4) for v in xywh_to_unit_xyxy(ex.box_xywh[:1], np.array([[w, h]]))[0]
            ]
        if adapter.uses_ocr:
            info["ocr_tokens_per_example"] = round(float(np.mean([len(str(o).split()) for o in ex.ocr])), 2)
        out["splits"][split] = info
    return out
