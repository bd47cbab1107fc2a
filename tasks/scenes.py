"""The embedded synthetic suite ``scenes``: one procedurally drawn image, four task families.

Every image holds 2-3 coloured shapes and two small word signs, so the *same pixels* carry a
classification, a VQA, a grounding and an OCR-VQA question; the global test set uses this to
compare routers on identical images with different questions. Image domains (background,
noise, font size, palette) are the client-style shift the partitioner couples to tasks.

All randomness comes from :func:`numpy.random.default_rng` streams keyed by
``(seed, stream kind, client, split, family)``, so adding a client or a task never changes the
pixels or questions of any other client.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from fedbench.api.data import GLOBAL_CLIENT, GLOBAL_TEST, TEST, TRAIN, ClientPlan, ExampleTable, PartitionConfig
from fedbench.api.registry import register_suite, register_task
from fedbench.api.task import TaskSpec

SUITE = "scenes"
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue")
CLASSES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)  # class = colour * 4 + shape
LEXICON = ("STOP", "OPEN", "EXIT", "SALE", "PARK", "BANK", "CAFE", "TAXI")
SIGN_COLOURS = ("white", "yellow", "orange")
COUNT_WORDS = ("two", "three")
# the per-family question streams are keyed by this order (a fixed part of the seeds, not a registry)
FAMILY_STREAMS = ("classification", "vqa", "grounding", "ocr_vqa")
VQA_ANSWERS = (*COLOURS, *SHAPES, *COUNT_WORDS, "yes", "no")
CLASSIFICATION_PROMPT = "what is the largest object?"

_RGB = np.array([(210, 40, 40), (40, 165, 60), (45, 75, 215)], dtype=np.int16)
_SIGN_RGB = ((246, 246, 240), (250, 225, 80), (250, 150, 50))
_LARGE, _SMALL = (18, 24), (10, 14)  # object side ranges in pixels at 64 px
_GAP = 2  # pixels kept free between any two items


@dataclass(frozen=True)
class Domain:
    """An image style: a client's camera/world, independent of what is in the scene."""

    name: str
    noise: float  # std of per-pixel Gaussian luminance noise (0-255 scale)
    font_size: int  # sign font size at 64 px
    jitter: int  # max per-channel shift of object colours
    tint: tuple[int, int, int]  # fixed shift of the object palette


DOMAINS = (
    Domain("plain", 3.0, 10, 10, (0, 0, 0)),
    Domain("gradient", 6.0, 11, 20, (15, 0, -10)),
    Domain("stripes", 5.0, 9, 15, (0, 10, 0)),
    Domain("noise", 22.0, 11, 25, (0, 0, 0)),
    Domain("checker", 8.0, 10, 20, (-10, 0, 15)),
    Domain("dark", 6.0, 12, 20, (20, 20, 20)),
)
N_DOMAINS = len(DOMAINS)

# Stream kinds: the first key after the seed, so no two purposes ever share a stream.
_CLIENT_IMAGES, _CLIENT_QUESTIONS, _GLOBAL_IMAGES, _GLOBAL_QUESTIONS, _PRETRAIN = 1, 2, 3, 4, 5


def _rng(seed: int, kind: int, client: int = 0, split: int = 0, family: int = 0) -> np.random.Generator:
    # Fixed-length keys: SeedSequence pads short keys with zeros, so [a, b] would equal [a, b, 0].
    return np.random.default_rng([seed, kind, client, split, family])


@dataclass(frozen=True)
class SceneObject:
    colour: int
    shape: int
    box: tuple[int, int, int, int]  # pixel (x0, y0, x1, y1), x1/y1 exclusive

    @property
    def cls(self) -> int:
        return self.colour * len(SHAPES) + self.shape

    @property
    def name(self) -> str:
        return CLASSES[self.cls]


@dataclass(frozen=True)
class Sign:
    colour: int
    word: int
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Scene:
    """What was drawn, enough to ask and answer every question about the image."""

    domain: int
    objects: tuple[SceneObject, ...]  # largest first
    signs: tuple[Sign, ...]  # left-to-right reading order

    @property
    def ocr_text(self) -> str:
        return " ".join(LEXICON[s.word] for s in self.signs)


@lru_cache(maxsize=256)
def _word_mask(word: str, size: int) -> Image.Image:
    """The word rendered once per font size as an antialiased mask (text rendering is the slow part)."""
    font = ImageFont.load_default(size=size)
    x0, y0, x1, y1 = font.getbbox(word)
    mask = Image.new("L", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(mask).text((-x0, -y0), word, fill=255, font=font)
    return mask


@lru_cache(maxsize=32)
def _background(domain: int, size: int) -> np.ndarray:
    """The domain's texture (uint8, 2*size square); each image crops a random window of it."""
    n = 2 * size
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) / n
    name = DOMAINS[domain].name
    if name == "plain":
        img = np.full((n, n, 3), 220.0, np.float32)
    elif name == "gradient":
        top, bottom = np.array([235, 220, 190]), np.array([150, 175, 200])
        img = top + (bottom - top) * y[..., None]
    elif name == "stripes":
        period = max(4, size // 8)
        on = ((np.arange(n)[:, None] + np.arange(n)[None, :]) // (period // 2)) % 2
        img = np.where(on[..., None] == 1, 205.0, 165.0) * np.ones(3)
    elif name == "noise":
        img = np.full((n, n, 3), 160.0, np.float32)
    elif name == "checker":
        cell = max(4, size // 8)
        on = ((np.arange(n)[:, None] // cell) + (np.arange(n)[None, :] // cell)) % 2
        img = np.where(on[..., None] == 1, [215.0, 200.0, 170.0], [185.0, 165.0, 135.0])
    else:  # dark
        img = np.array([45.0, 50.0, 65.0]) + 40 * x[..., None]
    return img.astype(np.uint8)


def _place(sizes: list[tuple[int, int]], size: int, rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """Non-overlapping boxes fully inside the image: 64 candidates per item, first free one wins."""
    for _ in range(100):
        boxes = np.empty((0, 4), dtype=np.int64)
        for w, h in sizes:
            xy = rng.integers(0, [size - w + 1, size - h + 1], size=(64, 2))
            cand = np.concatenate([xy, xy + np.array([w, h])], axis=1)
            clash = (
                (cand[:, None, 0] < boxes[None, :, 2] + _GAP)
                & (boxes[None, :, 0] < cand[:, None, 2] + _GAP)
                & (cand[:, None, 1] < boxes[None, :, 3] + _GAP)
                & (boxes[None, :, 1] < cand[:, None, 3] + _GAP)
            ).any(axis=1)
            free = np.flatnonzero(~clash)
            if not len(free):
                break
            boxes = np.vstack([boxes, cand[free[0]]])
        if len(boxes) == len(sizes):
            return [tuple(int(v) for v in b) for b in boxes]
    raise RuntimeError(f"cannot lay out {len(sizes)} items in a {size}px image; use a larger image_size")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: int, box: tuple[int, int, int, int], rgb: tuple) -> None:
    x0, y0, x1, y1 = box
    x1, y1 = x1 - 1, y1 - 1  # PIL includes the end pixel
    if SHAPES[shape] == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=rgb)
    elif SHAPES[shape] == "square":
        draw.rectangle((x0, y0, x1, y1), fill=rgb)
    elif SHAPES[shape] == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=rgb)
    else:  # cross
        t = (x1 - x0 + 1) / 3
        draw.rectangle((x0, y0 + t, x1, y1 - t), fill=rgb)
        draw.rectangle((x0 + t, y0, x1 - t, y1), fill=rgb)


def _draw_one(cls: int, domain: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, Scene]:
    scale = size / 64
    dom = DOMAINS[domain]
    n_objects = int(rng.integers(2, 4))
    others = rng.choice(len(CLASSES) - 1, size=n_objects - 1, replace=False)
    classes = [cls] + [int(c) + int(c >= cls) for c in others]  # distinct (colour, shape) combos
    sides = [int(rng.integers(round(_LARGE[0] * scale), round(_LARGE[1] * scale) + 1))]
    sides += [int(s) for s in rng.integers(round(_SMALL[0] * scale), round(_SMALL[1] * scale) + 1, n_objects - 1)]
    jitter = rng.integers(-dom.jitter, dom.jitter + 1, (n_objects, 3)).tolist()

    font_size = max(6, round(dom.font_size * scale))
    words = rng.choice(len(LEXICON), size=2, replace=False).tolist()
    sign_colours = rng.choice(len(SIGN_COLOURS), size=2, replace=False).tolist()
    pad = max(2, round(2 * scale))
    masks = [_word_mask(LEXICON[w], font_size) for w in words]
    sign_sizes = [(m.width + 2 * pad, m.height + 2 * pad) for m in masks]

    # Large object first, then the signs, then the small objects: biggest items are hardest to fit.
    boxes = _place([(sides[0], sides[0]), *sign_sizes, *((s, s) for s in sides[1:])], size, rng)
    obj_boxes, sign_boxes = [boxes[0], *boxes[3:]], boxes[1:3]

    dy, dx = rng.integers(0, size, 2).tolist()
    img = Image.fromarray(np.ascontiguousarray(_background(domain, size)[dy : dy + size, dx : dx + size]))
    draw = ImageDraw.Draw(img)
    objects = []
    for c, box, jit in zip(classes, obj_boxes, jitter, strict=True):
        colour, shape = divmod(c, len(SHAPES))
        rgb = tuple(min(255, max(0, int(v) + t + j)) for v, t, j in zip(_RGB[colour], dom.tint, jit, strict=True))
        _draw_shape(draw, shape, box, rgb)
        objects.append(SceneObject(colour, shape, box))
    signs = []
    for w, sc, box, mask in zip(words, sign_colours, sign_boxes, masks, strict=True):
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=_SIGN_RGB[sc], outline=(60, 60, 60))
        img.paste((15, 15, 15), (box[0] + pad, box[1] + pad), mask)
        signs.append(Sign(sc, w, box))
    signs.sort(key=lambda s: (s.box[0], s.box[1]))
    return np.asarray(img), Scene(domain, tuple(objects), tuple(signs))


def draw_scenes(
    classes: np.ndarray, domains: np.ndarray, rng: np.random.Generator, image_size: int = 64
) -> tuple[torch.Tensor, list[Scene]]:
    """Render one image per (largest-object class, domain) pair: uint8 [N, 3, H, W] and the scenes.

    After drawing, each image gets a random brightness shift and the domain's luminance noise.
    """
    arrays, scenes = [], []
    for cls, dom in zip(classes, domains, strict=True):
        arr, scene = _draw_one(int(cls), int(dom), image_size, rng)
        arrays.append(arr)
        scenes.append(scene)
    if not arrays:
        return torch.zeros((0, 3, image_size, image_size), dtype=torch.uint8), []
    n = len(arrays)
    sigma = np.array([DOMAINS[int(d)].noise for d in domains], np.float32)[:, None, None, None]
    shift = rng.integers(-12, 13, (n, 1, 1, 3)).astype(np.float32)
    noise = sigma * rng.standard_normal((n, image_size, image_size, 1), dtype=np.float32) + shift
    batch = np.clip(np.stack(arrays) + noise, 0, 255).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2))), scenes


# ---- questions ---------------------------------------------------------------------------------


def _vqa(scene: Scene, rng: np.random.Generator) -> tuple[str, int]:
    """One templated question, asked only where its answer is unambiguous."""
    shapes = [o.shape for o in scene.objects]
    colours = [o.colour for o in scene.objects]
    unique_shapes = [s for s in shapes if shapes.count(s) == 1]
    unique_colours = [c for c in colours if colours.count(c) == 1]
    kinds = ["count", "exists"] + ["colour_of"] * bool(unique_shapes) + ["shape_of"] * bool(unique_colours)
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "count":
        return "how many shapes are there?", VQA_ANSWERS.index(COUNT_WORDS[len(shapes) - 2])
    if kind == "colour_of":
        shape = unique_shapes[int(rng.integers(len(unique_shapes)))]
        return f"what colour is the {SHAPES[shape]}?", VQA_ANSWERS.index(COLOURS[colours[shapes.index(shape)]])
    if kind == "shape_of":
        colour = unique_colours[int(rng.integers(len(unique_colours)))]
        return f"what shape is the {COLOURS[colour]} object?", VQA_ANSWERS.index(SHAPES[shapes[colours.index(colour)]])
    present = {o.cls for o in scene.objects}
    if rng.random() < 0.5:
        cls, answer = sorted(present)[int(rng.integers(len(present)))], "yes"
    else:
        absent = [c for c in range(len(CLASSES)) if c not in present]
        cls, answer = absent[int(rng.integers(len(absent)))], "no"
    return f"is there a {CLASSES[cls]}?", VQA_ANSWERS.index(answer)


def row_for(
    scene: Scene, task: str, rng: np.random.Generator, size: int, with_ocr: bool
) -> tuple[str, int, tuple[float, float, float, float], str]:
    """(question, label, normalised box, OCR text) of one task's row about ``scene``."""
    nan = (float("nan"),) * 4
    ocr = scene.ocr_text if with_ocr else ""  # OCR is the client's modality: every row of its images
    if task == "classification":
        return CLASSIFICATION_PROMPT, scene.objects[0].cls, nan, ocr
    if task == "vqa":
        question, label = _vqa(scene, rng)
        return question, label, nan, ocr
    if task == "grounding":
        obj = scene.objects[int(rng.integers(len(scene.objects)))]
        return f"the {obj.name}", -1, tuple(v / size for v in obj.box), ocr
    sign = scene.signs[int(rng.integers(len(scene.signs)))]
    return f"what does the {SIGN_COLOURS[sign.colour]} sign say?", sign.word, nan, ocr


# ---- registry ----------------------------------------------------------------------------------

TASK_SPECS = {
    spec.name: register_task(spec.name)(spec)
    for spec in (
        TaskSpec("classification", "classification", SUITE, CLASSES),
        TaskSpec("vqa", "vqa", SUITE, VQA_ANSWERS),
        TaskSpec("grounding", "grounding", SUITE, (), metric="acc_iou50"),
        TaskSpec("ocr_vqa", "ocr_vqa", SUITE, LEXICON, uses_ocr=True),
    )
}


def _sample(weights: tuple[float, ...] | None, n_options: int, n: int, rng: np.random.Generator) -> np.ndarray:
    if weights is None:
        return rng.integers(0, n_options, n)
    p = np.asarray(weights, dtype=np.float64)
    if len(p) != n_options:
        raise ValueError(f"scenes: expected {n_options} weights, got {len(p)}")
    return rng.choice(n_options, size=n, p=p / p.sum())


@register_suite(SUITE)
def build_scenes(plans: list[ClientPlan], config: PartitionConfig, tasks: list[str], seed: int) -> ExampleTable:
    """Draw every client's train/test images and the global test set, one row per (image, task).

    Client rows exist only for the plan's tasks that are in ``tasks``; each global-test image
    carries a row of every task in ``tasks``. OCR text (the words of the image's signs) rides
    on every row of a client with OCR, whatever the task, so modality skew is its own
    partition axis, not a proxy for the task; global-test rows always carry it (the global set
    measures the full-modality model; the modality gap shows on the clients' personal test sets).
    """
    unknown = [t for t in tasks if t not in TASK_SPECS]
    if unknown:
        raise ValueError(f"scenes: unknown task(s) {unknown}; the suite provides {sorted(TASK_SPECS)}")
    size = config.image_size
    groups = []  # (client, split, task names, n, domain weights, class weights, has_ocr)
    for plan in plans:
        held = [t for t in tasks if t in plan.tasks]
        if not held:
            continue
        for split, n in ((TRAIN, plan.n_train), (TEST, plan.n_test)):
            groups.append((plan.client, split, held, n, plan.domain_weights, plan.class_weights, plan.has_ocr))
    groups.append((GLOBAL_CLIENT, GLOBAL_TEST, list(tasks), config.global_test_images, None, None, True))

    columns = ("image_index", "task", "question", "ocr", "label", "box", "client", "split", "domain")
    cols: dict[str, list] = {k: [] for k in columns}
    images: list[torch.Tensor] = []
    n_images = 0
    for client, split, held, n, domain_weights, class_weights, has_ocr in groups:
        is_global = client == GLOBAL_CLIENT
        key = (0, 0) if is_global else (client, split)
        rng = _rng(seed, _GLOBAL_IMAGES if is_global else _CLIENT_IMAGES, *key)
        domains = _sample(domain_weights, N_DOMAINS, n, rng)
        classes = _sample(class_weights, len(CLASSES), n, rng)
        batch, scenes = draw_scenes(classes, domains, rng, size)
        images.append(batch)
        for task in held:
            # One question stream per task, so holding another task never changes these rows.
            family = FAMILY_STREAMS.index(TASK_SPECS[task].family) + 1
            q_rng = _rng(seed, _GLOBAL_QUESTIONS if is_global else _CLIENT_QUESTIONS, *key, family)
            for i, scene in enumerate(scenes):
                question, label, box, ocr = row_for(scene, task, q_rng, size, has_ocr)
                values = (n_images + i, task, question, ocr, label, box, client, split, scene.domain)
                for k, v in zip(columns, values, strict=True):
                    cols[k].append(v)
        n_images += n

    def objects(values: list) -> np.ndarray:
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out

    return ExampleTable(
        images=torch.cat(images) if images else torch.zeros((0, 3, size, size), dtype=torch.uint8),
        image_index=np.asarray(cols["image_index"], dtype=np.int64),
        task=objects(cols["task"]),
        question=objects(cols["question"]),
        ocr_text=objects(cols["ocr"]),
        label=np.asarray(cols["label"], dtype=np.int64),
        box=np.asarray(cols["box"], dtype=np.float32).reshape(-1, 4),
        client=np.asarray(cols["client"], dtype=np.int64),
        split=np.asarray(cols["split"], dtype=np.int8),
        domain=np.asarray(cols["domain"], dtype=np.int64),
        synthetic=True,
        meta={
            "suite": SUITE,
            "classes": list(CLASSES),
            "lexicon": list(LEXICON),
            "n_domains": N_DOMAINS,
            "domains": [d.name for d in DOMAINS],
            "image_size": size,
            "global_test_ocr": True,
            "plans": [plan.as_record() for plan in plans],
        },
    )


# ---- backbone pretraining ----------------------------------------------------------------------

_CAPTION_TEMPLATES = (
    "{objects}. signs say {w0} and {w1}.",
    "a photo of {objects}. the {s0} sign says {w0} and the {s1} sign says {w1}.",
    "{objects}, with signs {w0} and {w1}.",
    "a picture of {objects}.",
    "signs {w0} and {w1} next to {objects}.",
)


def _caption(scene: Scene, rng: np.random.Generator) -> str:
    """A varied description naming every object (the largest called large) and both sign words."""
    names = [f"a large {scene.objects[0].name}"] + [
        f"a small {o.name}" if rng.random() < 0.5 else f"a {o.name}" for o in scene.objects[1:]
    ]
    order = [0, *(1 + rng.permutation(len(names) - 1))] if rng.random() < 0.6 else rng.permutation(len(names))
    names = [names[i] for i in order]
    objects = ", ".join(names[:-1]) + " and " + names[-1]
    template = _CAPTION_TEMPLATES[int(rng.integers(len(_CAPTION_TEMPLATES)))]
    s0, s1 = scene.signs
    return template.format(
        objects=objects,
        w0=LEXICON[s0.word],
        w1=LEXICON[s1.word],
        s0=SIGN_COLOURS[s0.colour],
        s1=SIGN_COLOURS[s1.colour],
    )


def pretrain_corpus(n: int, seed: int, image_size: int = 64) -> tuple[torch.Tensor, list[str], np.ndarray]:
    """Images, captions and classification labels from a stream no client or test set ever uses.

    This is what the embedded CLIP backbone is contrastively pretrained on (DESIGN §5).
    """
    rng = _rng(seed, _PRETRAIN)
    domains = rng.integers(0, N_DOMAINS, n)
    classes = rng.integers(0, len(CLASSES), n)
    images, scenes = draw_scenes(classes, domains, rng, image_size)
    return images, [_caption(s, rng) for s in scenes], classes.astype(np.int64)


def zero_shot_prompts() -> list[str]:
    """One prompt per classification class, in class-index order, phrased like the captions."""
    return [f"a photo of a large {c}." for c in CLASSES]


build_scenes.n_domains = N_DOMAINS  # read by the partitioner through the suite registry
