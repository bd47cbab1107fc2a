"""Real datasets through Hugging Face ``datasets``: the suite ``real`` and one adapter per dataset.

Each adapter reads the parquet files of a hub dataset, as ``huggingface-cli download --repo-type dataset
REPO --local-dir DIR`` leaves them (``data/<split>-NNNNN-of-NNNNN.parquet``, or config subfolders), from a
local directory or from the hub cache (``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``: the cache only).
The protocol names where each task's dataset is (``[data.sources] vqav2 = "/data/VQAv2"``); a task not
named there uses its adapter's hub id. A dataset that is not there stops the run with one line naming
it and the command that gets it (:class:`DatasetUnavailable`, exit 2).

How a dataset becomes rows of the federated table (:func:`build_real`):

- **Examples.** An adapter maps a dataset row to examples (question, human answers, box, OCR tokens,
  natural domain): one per question (VQAv2, TextVQA; GQA, whose questions sit in
  ``{split}_balanced_instructions`` and are joined to ``{split}_balanced_images`` on ``imageId`` -> ``id``),
  one per (question, answer) pair (OCR-VQA's parallel lists), one per referring expression (RefCOCO/+/g:
  ``answer`` lists the expressions of one box), one per image (CIFAR-100, DomainNet).
- **Partition.** The global test set comes from the dataset's evaluation split, or (VQAv2 and RefCOCO*,
  whose hub versions have answers for one split only) is held out of it by image. Each client that
  holds the task draws ``train_images + test_images`` examples without replacement from the rest,
  weighted by its Dirichlet class weights for label-skew families. Two protocol options change that
  (:func:`natural_groups`, :func:`flwr_partition`): ``data.natural_splits`` restricts each client to
  values of a natural split (DomainNet's domain by default: domain ``k % n_domains`` for the task's
  ``k``-th client; VQAv2's ``question_type``, GQA's ``types.structural`` / ``semantic`` / ``detailed``
  on request, dealt out in groups when there are more values than clients; the names are read from the
  data, never hard-coded), and ``data.partitioner`` draws from the pool flwr-datasets' partitioner gave
  the client (run on a local ``datasets.Dataset``, seeded from the run's seed).
- **Answers.** VQA-style answers are normalised as the official evaluation does
  (:func:`fedbench.tasks.families.vqa_soft.normalize_answer`); the answer vocabulary is the
  ``max_answers`` most frequent training answers of the clients (never the test sets); training
  examples whose answer is outside it are dropped; ``vqa_soft`` rows keep every human answer's score.
  Classification keeps the dataset's class names.
- **Boxes.** ``[x, y, w, h]`` in pixels -> ``[x0, y0, x1, y1]`` in [0, 1] of the image (our box format).
- **OCR.** ``ocr_tokens`` feed the OCR channel of the rows of clients with OCR (and the global test).
- **Images.** Only the selected examples' images are decoded, once, resized to ``data.image_size``,
  into an on-disk ``.npy`` cache keyed by (dataset files, split, rows, size) under ``$FEDBENCH_CACHE``
  (default ``~/.cache/fedbench``) and memory-mapped: the table's image tensor is that file, paged in
  as rows are read, never a decoded copy of the dataset in memory.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedbench.api.data import (
    GLOBAL_CLIENT,
    GLOBAL_TEST,
    TEST,
    TRAIN,
    ClientPlan,
    DataError,
    DatasetUnavailable,
    ExampleTable,
    PartitionConfig,
)
from fedbench.api.registry import FAMILIES, register_suite, register_task
from fedbench.api.task import TaskSpec
from fedbench.staging.feature_cache import cache_root
from fedbench.utils.checks import is_local_path
from fedbench.utils.integrity import IntegrityError, sha256_file, write_atomic

SUITE = "real"
CLASSIFICATION_QUESTION = "what is in the image?"
OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


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


def _obj(values: Sequence) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def _nan_boxes(n: int) -> np.ndarray:
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
        _obj([str(k) for k in cols.get("image_id", range(n))]),
        _obj([str(q) for q in cols["question"]]),
        answers,
        _nan_boxes(n),
        _obj([""] * n),
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
        _obj([str(k) for k in cols["imageId"]]),
        _obj([str(q) for q in cols["question"]]),
        [[str(a)] for a in cols["answer"]],
        _nan_boxes(n),
        _obj([""] * n),
        natural["structural"][1],
        natural["structural"][0],
        natural=natural,
    )


def _textvqa(cols: dict, _classes, features: dict) -> Examples:
    n = len(cols["question"])
    return Examples(
        np.arange(n),
        _obj([str(k) for k in cols.get("image_id", range(n))]),
        _obj([str(q) for q in cols["question"]]),
        [[str(a) for a in ans] for ans in cols["answers"]],
        _nan_boxes(n),
        _obj([" ".join(str(t) for t in (toks or [])) for toks in cols["ocr_tokens"]]),
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
        _obj(keys),
        _obj(questions),
        answers,
        _nan_boxes(n),
        _obj(ocr),
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
        _obj(keys),
        _obj(questions),
        [[] for _ in range(n)],
        np.asarray(boxes, np.float32).reshape(-1, 4),
        _obj([""] * n),
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
            _obj([str(i) for i in range(n)]),
            _obj([CLASSIFICATION_QUESTION] * n),
            [[classes[int(v)]] for v in labels],
            _nan_boxes(n),
            _obj([""] * n),
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


# ---------------------------------------------------------------------------------------------- loading


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARS)


def resolve_source(source: str, adapter: Adapter) -> Path:
    """A local snapshot directory, or the hub cache's snapshot of a hub id (downloaded only when not offline).

    Which one ``source`` names follows :func:`fedbench.utils.checks.is_local_path`: a local path when it exists,
    when it is not ``OWNER/NAME`` (e.g. starts with ``.``, ``/`` or ``~``, or has more or fewer than one
    ``/``), or when ``OWNER`` is a local directory; a missing local path is said not to exist, never looked
    up on the hub."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    how = f"get it with: {adapter.get_command()} (then name DIR in [data.sources])"
    if is_local_path(source):
        what = "is a file, not a snapshot directory" if path.exists() else "does not exist (a local path)"
        raise DatasetUnavailable(f"dataset '{adapter.repo}' for task '{adapter.task}': '{source}' {what}; {how}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, repo_type="dataset", local_files_only=True))
    except Exception:  # not in the hub cache
        if _offline():
            raise DatasetUnavailable(
                f"dataset '{source}' for task '{adapter.task}' is not in the hub cache (offline mode); {how}"
            ) from None
    try:
        return Path(snapshot_download(source, repo_type="dataset"))
    except Exception as err:
        raise DatasetUnavailable(
            f"dataset '{source}' for task '{adapter.task}' could not be fetched ({type(err).__name__}); {how}"
        ) from None


def split_files(root: Path, adapter: Adapter, split: str, images: bool = False) -> list[Path]:
    """A split's parquet files (with ``images``: those of its images, which GQA keeps in another config)."""
    folder = adapter.folder(split, images)
    base = root / folder if folder else root
    files = sorted(p for p in base.rglob("*.parquet") if p.name.startswith(f"{split}-") or p.parent.name == split)
    if not files:
        where = f"{folder}/{split}" if folder else f"data/{split}"
        raise DatasetUnavailable(
            f"dataset '{adapter.repo}' for task '{adapter.task}': no '{split}' parquet files under {base} "
            f"(expected {where}-NNNNN-of-NNNNN.parquet); get it with: {adapter.get_command()}"
        )
    return files


_LOADED: dict[tuple, object] = {}


def load_split(root: Path, adapter: Adapter, split: str, images: bool = False):
    """The split (or, with ``images``, the config holding its images) as a memory-mapped
    :class:`datasets.Dataset`, loaded once per process."""
    files = split_files(root, adapter, split, images)
    key = tuple((str(f), f.stat().st_size) for f in files)
    if key not in _LOADED:
        import datasets

        datasets.disable_progress_bars()
        cache = os.environ.get("FEDBENCH_HF_CACHE")
        if _parquet_rows(files, adapter, split) == 0:
            names = ", ".join(f.relative_to(root).as_posix() for f in files)
            raise DataError(
                f"dataset '{adapter.repo}' split '{split}' ({root}) has 0 rows ({names}): task '{adapter.task}' "
                "needs examples; re-download it"
            )
        ds = datasets.load_dataset("parquet", data_files={split: [str(f) for f in files]}, split=split, cache_dir=cache)
        separate = images and adapter.image_config
        needed = (adapter.image_join[1], adapter.image_column) if separate else adapter.columns
        missing = [c for c in needed if c not in ds.column_names]
        if missing:
            name = f"{split}' ({adapter.folder(split, True)}" if separate else split
            raise DataError(
                f"dataset '{adapter.repo}' split '{name}') ({root}) lacks column(s) {missing} that task "
                f"'{adapter.task}' reads; it has {ds.column_names}"
            )
        _LOADED[key] = ds
    return _LOADED[key]


def _parquet_rows(files: list[Path], adapter: Adapter, split: str) -> int:
    """The rows of a split's files, read from their footers: a file named like a parquet shard that is
    not one (text, a truncated download) stops with one line naming it and why."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = 0
    for f in files:
        try:
            rows += pq.read_metadata(f).num_rows
        except (pa.ArrowException, OSError) as err:
            reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
            raise DataError(
                f"dataset '{adapter.repo}' split '{split}': '{f}' is not a readable parquet file ({reason}); "
                f"re-download it: {adapter.get_command()}"
            ) from None
    return rows


def _files_key(root: Path, adapter: Adapter, split: str, images: bool = False) -> list:
    return [[f.relative_to(root).as_posix(), f.stat().st_size] for f in split_files(root, adapter, split, images)]


OPTIONAL_COLUMNS = ("image_id", "answer_type", "question_type", "file_name")  # read when present


def _columns(ds, names: list[str]) -> dict[str, list]:
    """Python lists of the named columns, from the memory-mapped Arrow table; a list of
    ``{answer, ...}`` structs (VQAv2) is read as the list of its ``answer`` strings, never as dicts."""
    import pyarrow as pa

    table = ds.data.table if hasattr(ds.data, "table") else ds.data
    out = {}
    for name in names:
        column = table.column(name).combine_chunks()
        kind = column.type
        if (
            pa.types.is_list(kind)
            and pa.types.is_struct(kind.value_type)
            and kind.value_type.get_field_index("answer") >= 0
        ):
            flat = column.flatten().field("answer").to_pylist()
            offsets = column.offsets.to_numpy()
            offsets = offsets - offsets[0]  # flatten() starts at the first list of a sliced array
            out[name] = [flat[a:b] for a, b in itertools.pairwise(offsets)]
        else:
            out[name] = column.to_pylist()
    return out


def read_examples(root: Path, adapter: Adapter, split: str) -> Examples:
    ds = load_split(root, adapter, split)
    names = [c for c in (*adapter.columns, *OPTIONAL_COLUMNS) if c in ds.column_names and c != adapter.image_column]
    cols = _columns(ds, list(dict.fromkeys(names)))  # metadata only: no image is decoded
    try:
        examples = adapter.extract(cols, None, dict(ds.features))
    except DataError as err:  # a bad row or column: say which dataset and split it is in
        raise DataError(f"dataset '{adapter.repo}' split '{split}' ({root}): {err}") from None
    if adapter.image_config:
        examples.row = _join_images(root, adapter, split, examples.image_key)
    return examples


def _join_images(root: Path, adapter: Adapter, split: str, keys: np.ndarray) -> np.ndarray:
    """Each question's row in the split's image config (GQA: ``imageId`` -> ``id``); a question whose image
    is not there stops with one line naming it."""
    column = adapter.image_join[1]
    ids = _columns(load_split(root, adapter, split, images=True), [column])[column]
    where = {str(k): i for i, k in enumerate(ids)}
    missing = [k for k in keys.tolist() if k not in where]
    if missing:
        raise DataError(
            f"dataset '{adapter.repo}' split '{split}': {len(missing)} question(s) name an image that "
            f"'{adapter.folder(split, True)}' lacks (first: {adapter.image_join[0]} {missing[0]!r}); "
            f"download both configs: {adapter.get_command()}"
        )
    return np.asarray([where[k] for k in keys.tolist()], np.int64)


def open_image(item: dict, adapter: Adapter, split: str, row: int):
    """The PIL image of one row's image cell (``{bytes, path}``), decoded; a file that cannot be read or
    bytes that are not an image stop with one line naming the row and why."""
    from io import BytesIO

    from PIL import Image, UnidentifiedImageError

    where = f"dataset '{adapter.repo}' split '{split}' row {row}, column '{adapter.image_column}'"
    try:
        data = item["bytes"] if item.get("bytes") is not None else Path(item["path"]).read_bytes()
    except (OSError, TypeError, KeyError) as err:
        reason = getattr(err, "strerror", None) or type(err).__name__
        raise DataError(f"{where}: cannot read image file {item.get('path')!r} ({reason})") from None
    try:
        image = Image.open(BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        reason = "not an image PIL can identify" if isinstance(err, UnidentifiedImageError) else str(err)
        raise DataError(f"{where}: {len(data)} bytes do not decode as an image ({reason})") from None
    return image


def decode_images(
    requests: Sequence[tuple[Path, Adapter, str, np.ndarray]], size: int
) -> tuple[torch.Tensor, np.ndarray]:
    """The images of ``requests`` ((root, adapter, split, dataset rows) each), in order, as one uint8
    [n,3,size,size] tensor memory-mapped from the on-disk cache, and each image's original (w, h)."""

    from datasets import Image as ImageFeature
    from PIL import Image

    spec = [[a.repo, a.config, split, _files_key(root, a, split, True), r.tolist()] for root, a, split, r in requests]
    key = hashlib.sha256(json.dumps([spec, size]).encode()).hexdigest()[:24]
    directory = cache_root() / "images"
    path, sizes_path = directory / f"{key}.npy", directory / f"{key}.sizes.npy"
    sums_path = directory / f"{key}.sha256.json"
    total = sum(len(rows) for *_, rows in requests)
    if not (path.exists() and sizes_path.exists() and sums_path.exists()):
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(total, 3, size, size))
        sizes = np.zeros((total, 2), np.int64)
        at = 0
        for root, adapter, split, rows in requests:
            ds = load_split(root, adapter, split, images=True).select_columns([adapter.image_column])
            ds = ds.cast_column(adapter.image_column, ImageFeature(decode=False))
            for start in range(0, len(rows), 256):  # bounded memory: 256 encoded images at a time
                chunk = rows[start : start + 256].tolist()
                for row, item in zip(chunk, ds.select(chunk)[adapter.image_column], strict=True):
                    image = open_image(item, adapter, split, row).convert("RGB")
                    sizes[at] = image.size
                    out[at] = np.asarray(image.resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)
                    at += 1
        out.flush()
        del out
        np.save(sizes_path, sizes)
        digests = {"images": sha256_file(tmp), "sizes": sha256_file(sizes_path)}
        write_atomic(sums_path, json.dumps(digests).encode())
        os.replace(tmp, path)
    _check_cache(path, sizes_path, sums_path)
    images = np.load(path, mmap_mode="c")  # copy-on-write map: pages are read as rows are indexed
    return torch.from_numpy(images), np.load(sizes_path)


def _check_cache(path: Path, sizes_path: Path, sums_path: Path) -> None:
    """The image cache's files against the sha256 recorded when they were written: a truncated or
    changed cache stops with one line naming the file, never with an error deep in numpy."""
    fix = f"delete '{path.parent}' (or just that file): the cache is rebuilt on the next run"
    try:
        digests = json.loads(sums_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        raise IntegrityError(f"image cache checksums '{sums_path}' are missing or unreadable; {fix}") from None
    for file, key in ((path, "images"), (sizes_path, "sizes")):
        if not file.is_file() or sha256_file(file) != digests.get(key):
            raise IntegrityError(
                f"image cache '{file}' is missing or damaged (sha256 differs from the one recorded); {fix}"
            )


def xywh_to_unit_xyxy(box: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """[x, y, w, h] in pixels -> [x0, y0, x1, y1] in [0, 1] of each image's (width, height)."""
    w, h = sizes[:, 0:1].astype(np.float32), sizes[:, 1:2].astype(np.float32)
    out = np.concatenate(
        [box[:, 0:1] / w, box[:, 1:2] / h, (box[:, 0:1] + box[:, 2:3]) / w, (box[:, 1:2] + box[:, 3:4]) / h], 1
    )
    return np.clip(out, 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------ suite


def source_of(config: PartitionConfig, task: str) -> str:
    return config.sources.get(task, ADAPTERS[task].repo)


def label_space(config: PartitionConfig, specs: Sequence[TaskSpec]) -> int:
    """Classes of the label-skew (classification) tasks, read from the datasets' features."""
    n = 1
    for spec in specs:
        adapter = ADAPTERS.get(spec.name)
        if adapter is not None and FAMILIES.get(adapter.family).label_skew:
            root = resolve_source(source_of(config, spec.name), adapter)
            n = max(n, len(read_examples(root, adapter, adapter.train_split).classes or ()))
    return n


def _hold_out(examples: Examples, n: int, rng: np.random.Generator) -> np.ndarray:
    """Examples of whole images, in a seeded order of images, until at least ``n`` (a boolean mask)."""
    keys, inverse = np.unique(examples.image_key.astype(str), return_inverse=True)
    mask = np.zeros(len(examples), bool)
    for k in rng.permutation(len(keys)):
        if mask.sum() >= n:
            break
        mask |= inverse == k
    return mask


def _pick(rng: np.random.Generator, weights: np.ndarray, n: int) -> np.ndarray:
    n = min(n, int((weights > 0).sum()))
    if n == 0:
        return np.zeros(0, np.int64)
    return np.sort(rng.choice(len(weights), size=n, replace=False, p=weights / weights.sum()))


def _vocabulary(labels: list[str], max_answers: int) -> tuple[str, ...]:
    counts = Counter(labels)
    return tuple(a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max_answers])


PARTITIONERS = ("iid", "dirichlet", "inner_dirichlet", "pathological")  # data.partitioner: flwr-datasets'


def natural_split(config: PartitionConfig, adapter: Adapter) -> str | None:
    """The natural split whose values the task's clients hold: the protocol's, else the adapter's default."""
    name = config.natural_splits.get(adapter.task, adapter.natural_default)
    return None if name in (None, "none") else name


def check_partition_options(config: PartitionConfig, tasks: Sequence[str]) -> None:
    """``data.natural_splits``, ``data.partitioner`` and ``data.classes_per_client`` against the tasks and
    their adapters: one line naming the bad value and the valid ones."""
    from fedbench.config.protocol import ProtocolError

    for task, name in config.natural_splits.items():
        if task not in tasks:
            raise ProtocolError(
                f"protocol field 'data.natural_splits' names task '{task}', which the protocol does not run "
                f"(tasks: {', '.join(tasks)})"
            )
        valid = (*ADAPTERS[task].natural_splits, "none")
        if name not in valid:
            raise ProtocolError(
                f"protocol field 'data.natural_splits.{task}' = {name!r} is invalid: expected one of {', '.join(valid)}"
            )
    if config.partitioner and config.partitioner not in PARTITIONERS:
        raise ProtocolError(
            f"protocol field 'data.partitioner' = {config.partitioner!r} is invalid: expected one of "
            f"{', '.join(PARTITIONERS)} (flwr-datasets), or an empty string for fedbench's own draw"
        )
    if config.partitioner in ("dirichlet", "inner_dirichlet") and config.dirichlet_alpha <= 0:
        raise ProtocolError(
            f"protocol field 'data.dirichlet_alpha' = {config.dirichlet_alpha!r} is invalid with partitioner "
            f"'{config.partitioner}': expected a number > 0 (or partitioner 'iid')"
        )
    if (config.partitioner == "pathological") != (config.classes_per_client > 0):
        raise ProtocolError(
            f"protocol field 'data.classes_per_client' = {config.classes_per_client!r} is invalid with partitioner "
            f"{config.partitioner!r}: set it (an integer >= 1) with 'pathological' only"
        )


def _natural_codes(train: Examples, test: Examples, name: str) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """The natural split's names (the training split's, then any only the test split has) and both splits'
    codes into them: the test split may lack a value or hold one the training split has not."""
    if name not in train.natural or name not in test.natural:
        raise DataError(f"the dataset has no '{name}' column to split clients by (it has {sorted(train.natural)})")
    train_names, train_codes = train.natural[name]
    test_names, test_codes = test.natural[name]
    names = (*train_names, *(n for n in test_names if n not in train_names))
    recode = np.asarray([names.index(n) for n in test_names], np.int64)
    return names, train_codes, recode[test_codes] if len(test_codes) else test_codes


def natural_groups(codes: np.ndarray, n_values: int, n_clients: int, group: bool) -> list[np.ndarray]:
    """The natural-split values each of ``n_clients`` clients holds, from the training pool's ``codes``.

    Without ``group`` (DomainNet) client ``k`` holds value ``k % n_values``. With it, when there are more
    values present than clients, every value goes to exactly one client: largest first to the client with
    the fewest examples so far (ties: the lower client, then the lower value), so the clients' pools stay
    balanced; with fewer values than clients, client ``k`` holds the ``k % n``-th value present.
    """
    if not group:
        return [np.asarray([k % n_values]) for k in range(n_clients)]
    counts = np.bincount(codes, minlength=n_values)
    present = np.flatnonzero(counts)
    if len(present) == 0:
        return [np.zeros(0, np.int64) for _ in range(n_clients)]
    if len(present) <= n_clients:
        return [present[k % len(present) : k % len(present) + 1] for k in range(n_clients)]
    load, held = np.zeros(n_clients, np.int64), [[] for _ in range(n_clients)]
    for value in sorted(present.tolist(), key=lambda v: (-counts[v], v)):
        k = int(np.argmin(load))
        held[k].append(value)
        load[k] += counts[value]
    return [np.asarray(sorted(v), np.int64) for v in held]


def flwr_partition(
    config: PartitionConfig, sizes: list[int], available: np.ndarray, labels: np.ndarray | None, seed: int
) -> tuple[str, list[np.ndarray]]:
    """Each client's pool (example indices) from a flwr-datasets partitioner run on a local
    ``datasets.Dataset`` of the task's available training examples (never ``FederatedDataset``: it downloads).

    The pool is shuffled with ``seed`` first (``IidPartitioner`` shards contiguously) and ``seed`` seeds the
    partitioner. Label partitioners split by the example's label (class, or most frequent normalised answer;
    ``pathological`` deals the first classes deterministically, so every class has a client);
    a task without labels (grounding) is split IID. ``inner_dirichlet`` draws the plans' ``sizes`` (so
    ``quantity_skew``), scaled down to fit the pool. Returns the partitioner's name and the pools.
    """
    from fedbench.config.protocol import ProtocolError

    try:
        from datasets import Dataset
        from flwr_datasets import partitioner as fp
    except ImportError:
        raise ProtocolError(
            f"protocol field 'data.partitioner' = {config.partitioner!r} needs flwr-datasets: "
            "pip install 'flwr-datasets>=0.6,<0.7'"
        ) from None
    name = config.partitioner if labels is not None else "iid"
    pool = np.random.default_rng(seed).permutation(np.flatnonzero(available))
    n = len(sizes)
    if name == "inner_dirichlet":
        total = sum(sizes)
        if total > len(pool):
            sizes = [max(1, s * len(pool) // total) for s in sizes]
        pool = pool[: sum(sizes)]
    columns: dict = {"index": pool}
    if labels is not None:  # as codes 0..K-1 of the labels present: InnerDirichletPartitioner needs those
        columns["label"] = np.unique(labels[pool].astype(str), return_inverse=True)[1].reshape(-1)
    alpha, least = config.dirichlet_alpha, min(min(sizes), len(pool) // (2 * n))
    make = {
        "iid": lambda: fp.IidPartitioner(n),
        "dirichlet": lambda: fp.DirichletPartitioner(n, "label", alpha, min_partition_size=least, seed=seed),
        "inner_dirichlet": lambda: fp.InnerDirichletPartitioner(sizes, "label", alpha, seed=seed),
        "pathological": lambda: fp.PathologicalPartitioner(
            n, "label", config.classes_per_client, class_assignment_mode="first-deterministic", seed=seed
        ),
    }
    partitioner = make[name]()
    partitioner.dataset = Dataset.from_dict(columns)
    try:
        parts = [np.asarray(partitioner.load_partition(k)["index"], np.int64) for k in range(n)]
    except ValueError as err:
        raise DataError(
            f"flwr-datasets' {type(partitioner).__name__} could not split {len(pool)} examples over {n} clients: "
            + " ".join(str(err).split())
        ) from None
    return name, parts


@register_suite(SUITE)
def build_real(plans: list[ClientPlan], config: PartitionConfig, tasks: list[str], seed: int) -> ExampleTable:
    """Rows of the real datasets for a partition plan (see the module docstring)."""
    from fedbench.tasks.families.vqa_soft import answer_scores, majority_answer

    unknown = [t for t in tasks if t not in ADAPTERS]
    if unknown:
        raise ValueError(f"task(s) {unknown} have no real-data adapter; adapters: {', '.join(sorted(ADAPTERS))}")
    parts: list[dict] = []
    vocabularies: dict[str, list[str]] = {}
    sources: dict[str, str] = {}
    n_images = 0
    requests: list[tuple[Path, Adapter, str, np.ndarray]] = []
    domain_names: dict[str, list[str]] = {}
    partitioning: dict[str, str] = {}  # task -> how its clients' examples were drawn, when not fedbench's default
    check_partition_options(config, tasks)
    for t_index, task in enumerate(tasks):
        adapter, family = ADAPTERS[task], FAMILIES.get(ADAPTERS[task].family)
        root = resolve_source(source_of(config, task), adapter)
        sources[task] = str(root)
        rng = np.random.default_rng([seed, 7, t_index])
        train_ex = read_examples(root, adapter, adapter.train_split)
        if adapter.test_split is None:
            held = _hold_out(train_ex, config.global_test_images, rng)
            test_ex, test_split, test_pool = train_ex, adapter.train_split, held
        else:
            test_ex, test_split = read_examples(root, adapter, adapter.test_split), adapter.test_split
            held, test_pool = np.zeros(len(train_ex), bool), np.ones(len(test_ex), bool)
        natural = natural_split(config, adapter)
        names, train_dom, test_dom = train_ex.domain_names, train_ex.domain, test_ex.domain
        if natural is not None:
            names, train_dom, test_dom = _natural_codes(train_ex, test_ex, natural)
        domain_names[task] = list(names)
        global_idx = _pick(rng, test_pool.astype(float), config.global_test_images)
        # the training labels: class names, or the most frequent normalised human answer
        if family.has_answers:
            label_of = _obj([a[0] if train_ex.classes else majority_answer(a) for a in train_ex.answers])
        available = ~held
        blocks = []  # (client, split, examples, indices)
        holders = [p for p in plans if task in p.tasks]
        groups = flwr = None
        if natural is not None:
            groups = natural_groups(train_dom[available], len(names), len(holders), adapter.group_natural)
            partitioning[task] = f"natural:{natural}"
        elif config.partitioner:
            labels = label_of if family.has_answers else None
            seed_k = int(np.random.SeedSequence([seed, 11, t_index]).generate_state(1)[0])
            name, flwr = flwr_partition(config, [p.n_train + p.n_test for p in holders], available, labels, seed_k)
            partitioning[task] = f"flwr:{name}"
        for k, plan in enumerate(holders):
            weights = available.astype(float)
            if flwr is not None:  # the flwr-datasets partition replaces fedbench's label skew
                weights *= np.isin(np.arange(len(weights)), flwr[k])
            elif family.label_skew and plan.class_weights is not None and train_ex.classes:
                cw = np.asarray(plan.class_weights)
                classes = np.asarray([train_ex.classes.index(str(v)) for v in label_of])
                weights *= cw[classes % len(cw)]
            if groups is not None:
                weights *= np.isin(train_dom, groups[k])
            chosen = _pick(rng, weights, plan.n_train + plan.n_test)
            chosen = rng.permutation(chosen)
            available[chosen] = False
            n_train = round(len(chosen) * plan.n_train / (plan.n_train + plan.n_test))
            blocks.append((plan.client, TRAIN, plan.has_ocr, np.sort(chosen[:n_train])))
            blocks.append((plan.client, TEST, plan.has_ocr, np.sort(chosen[n_train:])))
        if family.has_answers:
            if train_ex.classes:
                vocab = train_ex.classes
            else:
                train_labels = [label_of[i] for c, s, _, idx in blocks if s == TRAIN for i in idx]
                vocab = _vocabulary(train_labels, adapter.max_answers)
            vocabularies[task] = list(vocab)
            index = {a: i for i, a in enumerate(vocab)}
        for client, split, has_ocr, idx in [*blocks, (GLOBAL_CLIENT, GLOBAL_TEST, True, global_idx)]:
            ex, ex_split = (test_ex, test_split) if split == GLOBAL_TEST else (train_ex, adapter.train_split)
            domain = test_dom if split == GLOBAL_TEST else train_dom
            if family.has_answers:
                labels = (
                    np.asarray([index.get(str(label_of[i]), -1) for i in idx], np.int64)
                    if ex is train_ex
                    else np.asarray(
                        [
                            index.get(ex.answers[i][0] if ex.classes else majority_answer(ex.answers[i]), -1)
                            for i in idx
                        ],
                        np.int64,
                    )
                )
                if split == TRAIN:  # a training example must have an answer the head can give
                    idx, labels = idx[labels >= 0], labels[labels >= 0]
            else:
                labels = np.full(len(idx), -1, np.int64)
            if len(idx) == 0:
                continue
            # one image per distinct image (examples asking several questions of one image share it)
            _, first, image_pos = np.unique(ex.image_key[idx].astype(str), return_index=True, return_inverse=True)
            image_rows = ex.row[idx][first]
            requests.append((root, adapter, ex_split, image_rows))
            box_xywh = None if family.has_answers else ex.box_xywh[idx]  # normalised once sizes are known
            soft = None
            if adapter.family == "vqa_soft":
                soft = np.full((len(idx), 10), -1, np.int64), np.zeros((len(idx), 10), np.float32)
                for j, i in enumerate(idx):
                    scored = [(index[a], s) for a, s in answer_scores(ex.answers[i]).items() if a in index]
                    for m, (a, s) in enumerate(scored[:10]):
                        soft[0][j, m], soft[1][j, m] = a, s
            parts.append(
                {
                    "image_index": n_images + image_pos,
                    "task": [task] * len(idx),
                    "question": ex.question[idx].tolist(),
                    "ocr": [str(o) if has_ocr else "" for o in ex.ocr[idx]],
                    "label": labels,
                    "box_xywh": box_xywh,
                    "client": np.full(len(idx), client, np.int64),
                    "split": np.full(len(idx), split, np.int8),
                    "domain": domain[idx],
                    "soft": soft,
                }
            )
            n_images += len(image_rows)
    size = config.image_size
    pixels, sizes = decode_images(requests, size) if requests else (torch.zeros((0, 3, size, size), torch.uint8), None)
    for p in parts:
        n_rows = len(p["task"])
        p["box"] = (
            _nan_boxes(n_rows) if p["box_xywh"] is None else xywh_to_unit_xyxy(p["box_xywh"], sizes[p["image_index"]])
        )
    n = sum(len(p["task"]) for p in parts)
    any_soft = any(p["soft"] is not None for p in parts)
    answer_ids = answer_scores_ = None
    if any_soft:
        answer_ids = np.concatenate([p["soft"][0] if p["soft"] else np.full((len(p["task"]), 10), -1) for p in parts])
        answer_scores_ = np.concatenate(
            [p["soft"][1] if p["soft"] else np.zeros((len(p["task"]), 10), np.float32) for p in parts]
        ).astype(np.float32)
    cat = lambda k, dt: np.concatenate([np.asarray(p[k], dt) for p in parts]) if parts else np.zeros(0, dt)  # noqa: E731
    return ExampleTable(
        images=pixels,
        image_index=cat("image_index", np.int64),
        task=_obj([t for p in parts for t in p["task"]]),
        question=_obj([q for p in parts for q in p["question"]]),
        ocr_text=_obj([o for p in parts for o in p["ocr"]]),
        label=cat("label", np.int64),
        box=np.concatenate([p["box"] for p in parts]).astype(np.float32) if parts else _nan_boxes(0),
        client=cat("client", np.int64),
        split=cat("split", np.int8),
        domain=cat("domain", np.int64),
        synthetic=False,
        meta={
            "suite": SUITE,
            "sources": sources,
            "answers": vocabularies,
            "domains": domain_names,
            **({"partitioning": partitioning} if partitioning else {}),
            "n_domains": max((len(v) for v in domain_names.values()), default=1),
            "image_size": size,
            "global_test_ocr": True,
            "plans": [plan.as_record() for plan in plans],
            "rows": n,
        },
        answer_ids=answer_ids,
        answer_scores=answer_scores_,
    )


build_real.n_domains = 1  # the partitioner's domain weights are unused: natural domains come from the data
build_real.label_space = label_space


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
            vocab = _vocabulary(labels, 10**9)
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
