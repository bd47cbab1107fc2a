"""The real-data adapters: how one hub dataset's rows become examples of one task (one adapter per dataset).

Registering an adapter registers its task (suite ``real``); the schema each adapter reads is checked by
``fedbench data check`` and listed by ``fedbench list`` (:func:`adapter_table`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedbench.api.data import DataError
from fedbench.api.registry import register_task
from fedbench.api.task import TaskSpec

SUITE = "real"
CLASSIFICATION_QUESTION = "what is in the image?"


@dataclass
class Examples:
    """An adapter's examples of one split (columns; ``row``: the dataset row holding the image)."""

    row: np.ndarray
    image_key: np.ndarray
    question: np.ndarray
    answers: list[list[str]]
    box_xywh: np.ndarray  # float [n,4] pixels; NaN for answer tasks
    ocr: np.ndarray
    domain: np.ndarray
    domain_names: tuple[str, ...] = ("all",)
    classes: tuple[str, ...] | None = None  # classification: the dataset's class names
    natural: dict[str, tuple[tuple[str, ...], np.ndarray]] = field(default_factory=dict)  # split -> (names, codes)

    def __len__(self) -> int:
        return len(self.row)


@dataclass(frozen=True)
class Adapter:
    """How one hub dataset becomes examples of one task."""

    task: str
    family: str
    repo: str
    columns: tuple[str, ...]  # the columns it reads (checked by ``fedbench data check``)
    extract: Callable[[dict, tuple[str, ...] | None, dict], Examples] = field(repr=False)
    train_split: str = "train"
    test_split: str | None = None  # None: the global test set is held out of the train split by image
    config: str | None = None  # subfolder of the snapshot holding the parquet files ("{split}": the split's)
    image_column: str = "image"
    image_config: str | None = None  # subfolder of the images when they sit apart (GQA), joined on image_join
    image_join: tuple[str, str] = ("imageId", "id")  # (question column, image column) of that join
    uses_ocr: bool = False
    max_answers: int = 3129
    natural_splits: tuple[str, ...] = ()  # columns whose values can be the clients (looked up in the data)
    natural_default: str | None = None  # the natural split used unless the protocol names another (DomainNet)
    group_natural: bool = True  # more values than clients: a group of values per client (False: one each)
    include: tuple[str, ...] = ()  # the snapshot's files the adapter reads, where the repo holds many more
    notes: str = ""

    def get_command(self) -> str:
        only = "".join(f' --include "{pattern}"' for pattern in self.include)
        return f"huggingface-cli download --repo-type dataset {self.repo}{only} --local-dir DIR"

    def folder(self, split: str, images: bool = False) -> str | None:
        """The snapshot subfolder holding a split's questions (or, with ``images``, its images)."""
        config = self.image_config if images and self.image_config else self.config
        return config.format(split=split) if config else None


def object_array(values: Sequence) -> np.ndarray:
    """A 1-d object array of ``values`` (strings and lists stay Python objects, never a 2-d array)."""
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def nan_boxes(n: int) -> np.ndarray:
    """``n`` empty boxes: the box column of examples that have none (answer tasks)."""
    return np.full((n, 4), np.nan, np.float32)


def _codes(values: Sequence) -> tuple[tuple[str, ...], np.ndarray]:
    """The distinct values (sorted) and each row's index into them: a natural split read from the data."""
    names, codes = np.unique(np.asarray([str(v) for v in values], dtype=object).astype(str), return_inverse=True)
    return tuple(str(n) for n in names), codes.astype(np.int64).reshape(-1)


def _vqav2(cols: dict, _classes, features: dict) -> Examples:
    n = len(cols["question"])
    answers = [[a["answer"] if isinstance(a, dict) else str(a) for a in ans] for ans in cols["answers"]]
    types = [str(t) for t in cols.get("answer_type", ["other"] * n)]
    names = tuple(sorted(set(types)))
    domain = np.asarray([names.index(t) for t in types], np.int64)
    natural = {"answer_type": (names, domain)}
    if "question_type" in cols:
        natural["question_type"] = _codes(cols["question_type"])
    return Examples(
        np.arange(n),
        object_array([str(k) for k in cols.get("image_id", range(n))]),
        object_array([str(q) for q in cols["question"]]),
        answers,
        nan_boxes(n),
        object_array([""] * n),
        domain,
        names,
        natural=natural,
    )


GQA_TYPES = ("structural", "semantic", "detailed")  # the fields of GQA's ``types`` struct


def _gqa(cols: dict, _classes, features: dict) -> Examples:
    """One example per question; ``row`` is set by the join to the image config (:func:`read_examples`)."""
    n = len(cols["question"])
    types = [t or {} for t in cols["types"]]
    natural = {k: _codes([t.get(k) or "" for t in types]) for k in GQA_TYPES}
    return Examples(
        np.arange(n),
        object_array([str(k) for k in cols["imageId"]]),
        object_array([str(q) for q in cols["question"]]),
        [[str(a)] for a in cols["answer"]],
        nan_boxes(n),
        object_array([""] * n),
        natural["structural"][1],
        natural["structural"][0],
        natural=natural,
    )


def _textvqa(cols: dict, _classes, features: dict) -> Examples:
    n = len(cols["question"])
    return Examples(
        np.arange(n),
        object_array([str(k) for k in cols.get("image_id", range(n))]),
        object_array([str(q) for q in cols["question"]]),
        [[str(a) for a in ans] for ans in cols["answers"]],
        nan_boxes(n),
        object_array([" ".join(str(t) for t in (toks or [])) for toks in cols["ocr_tokens"]]),
        np.zeros(n, np.int64),
    )


def _ocrvqa(cols: dict, _classes, features: dict) -> Examples:
    rows, keys, questions, answers, ocr = [], [], [], [], []
    image_ids = cols.get("image_id", range(len(cols["questions"])))
    for i, (qs, ans, toks, key) in enumerate(
        zip(cols["questions"], cols["answers"], cols["ocr_tokens"], image_ids, strict=True)
    ):
        if len(qs) != len(ans):
            raise DataError(f"OCR-VQA row {i}: {len(qs)} questions but {len(ans)} answers (parallel lists)")
        text = " ".join(str(t) for t in (toks or []))
        for q, a in zip(qs, ans, strict=True):
            rows.append(i)
            keys.append(str(key))
            questions.append(str(q))
            answers.append([str(a)])
            ocr.append(text)
    n = len(rows)
    return Examples(
        np.asarray(rows, np.int64),
        object_array(keys),
        object_array(questions),
        answers,
        nan_boxes(n),
        object_array(ocr),
        np.zeros(n, np.int64),
    )


def _refcoco(cols: dict, _classes, features: dict) -> Examples:
    rows, keys, questions, boxes = [], [], [], []
    names = cols.get("file_name", [str(i) for i in range(len(cols["bbox"]))])
    for i, (expressions, bbox, key) in enumerate(zip(cols["answer"], cols["bbox"], names, strict=True)):
        if len(bbox) != 4:
            raise DataError(f"RefCOCO row {i}: bbox {bbox!r} is not [x, y, w, h]")
        for expression in expressions if isinstance(expressions, list) else [expressions]:
            rows.append(i)
            keys.append(str(key))
            questions.append(str(expression))
            boxes.append([float(v) for v in bbox])
    n = len(rows)
    return Examples(
        np.asarray(rows, np.int64),
        object_array(keys),
        object_array(questions),
        [[] for _ in range(n)],
        np.asarray(boxes, np.float32).reshape(-1, 4),
        object_array([""] * n),
        np.zeros(n, np.int64),
    )


def _class_names(features: dict, column: str) -> tuple[str, ...]:
    feature = features.get(column)
    names = getattr(feature, "names", None)
    if not names:
        raise DataError(f"column '{column}' is not a ClassLabel with names (features: {feature!r})")
    return tuple(str(n) for n in names)


def _check_codes(values: Sequence, names: tuple[str, ...], column: str) -> None:
    """Every value of a ClassLabel column is the index of one of its names, or one line naming the
    first row that is not (a label outside the class names, a missing label)."""
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < len(names):
            raise DataError(
                f"column '{column}' row {i}: label {v!r} is outside its {len(names)} class names "
                f"(expected an integer in [0, {len(names) - 1}])"
            )


def _classification(label_column: str, domain_column: str | None = None) -> Callable[..., Examples]:
    def extract(cols: dict, _classes, features: dict) -> Examples:
        classes = _class_names(features, label_column)
        labels = cols[label_column]
        n = len(labels)
        _check_codes(labels, classes, label_column)
        domain_names, domains, natural = ("all",), np.zeros(n, np.int64), {}
        if domain_column is not None:
            domain_names = _class_names(features, domain_column)  # looked up, never hard-coded
            _check_codes(cols[domain_column], domain_names, domain_column)
            domains = np.asarray(cols[domain_column], np.int64)
            natural[domain_column] = (domain_names, domains)
        return Examples(
            np.arange(n),
            object_array([str(i) for i in range(n)]),
            object_array([CLASSIFICATION_QUESTION] * n),
            [[classes[int(v)]] for v in labels],
            nan_boxes(n),
            object_array([""] * n),
            domains,
            domain_names,
            classes,
            natural,
        )

    return extract


ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> Adapter:
    ADAPTERS[adapter.task] = adapter
    register_task(adapter.task)(TaskSpec(adapter.task, adapter.family, SUITE, (), uses_ocr=adapter.uses_ocr))
    return adapter


register_adapter(
    Adapter(
        "vqav2", "vqa_soft", "lmms-lab/VQAv2", ("question", "image", "answers"), _vqav2,
        train_split="validation", natural_splits=("question_type", "answer_type"),
        notes="validation split (214k rows, the only one with answers); VQA accuracy",
    )
)  # fmt: skip
register_adapter(
    Adapter(
        "gqa", "vqa", "lmms-lab/GQA", ("imageId", "question", "answer", "types"), _gqa, test_split="testdev",
        config="{split}_balanced_instructions", image_config="{split}_balanced_images", natural_splits=GQA_TYPES,
        include=("train_balanced_*", "testdev_balanced_*"),
        notes="train + testdev balanced; questions joined to images on imageId -> id; exact match",
    )
)  # fmt: skip
register_adapter(
    Adapter(
        "textvqa", "vqa_soft", "lmms-lab/textvqa", ("question", "image", "answers", "ocr_tokens"), _textvqa,
        test_split="validation", uses_ocr=True, notes="train + validation; OCR tokens; VQA accuracy",
    )
)  # fmt: skip
register_adapter(
    Adapter(
        "ocrvqa", "ocr_vqa", "howard-hou/OCR-VQA", ("image", "questions", "answers", "ocr_tokens"), _ocrvqa,
        test_split="validation", uses_ocr=True, notes="train + validation; one example per question; exact match",
    )
)  # fmt: skip
register_adapter(
    Adapter(
        "cifar100", "classification", "uoft-cs/cifar100", ("img", "fine_label"), _classification("fine_label"),
        test_split="test", image_column="img", notes="train + test; 100 fine labels",
    )
)  # fmt: skip
register_adapter(
    Adapter(
        "domainnet", "classification", "wltjr1007/DomainNet", ("image", "label", "domain"),
        _classification("label", "domain"), test_split="test", natural_splits=("domain",), natural_default="domain",
        group_natural=False,
        notes="train + test; 345 classes; each client one domain",
    )
)  # fmt: skip
for _task, _repo in (
    ("refcoco", "lmms-lab/RefCOCO"),
    ("refcoco_plus", "lmms-lab/RefCOCOplus"),
    ("refcocog", "lmms-lab/RefCOCOg"),
):
    register_adapter(
        Adapter(
            _task, "grounding", _repo, ("image", "answer", "bbox"), _refcoco, train_split="val",
            notes="val split; one example per expression; Acc@IoU>=0.5",
        )
    )  # fmt: skip


def adapter_table() -> list[dict]:
    """What ``fedbench list`` shows per real-data adapter."""
    return [
        {
            "task": a.task,
            "family": a.family,
            "dataset": a.repo,
            "needs": ", ".join(a.columns),
            "splits": a.train_split + (f" + {a.test_split}" if a.test_split else " (global test held out)"),
            "notes": a.notes,
        }
        for a in ADAPTERS.values()
    ]
