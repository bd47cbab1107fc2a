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

Modules: :mod:`.adapters` (schemas -> examples; registers the tasks), :mod:`.sources` (snapshots, parquet
splits), :mod:`.images` (decoding and its cache), :mod:`.partition` (dealing examples to clients),
:mod:`.suite` (:func:`build_real`, registered as :class:`RealSuite`), :mod:`.datacheck` (``data check``).
Importing this package registers the tasks and the suite (plug-in discovery imports it).
"""

from __future__ import annotations

from fedbench.tasks.real.adapters import (
    ADAPTERS,
    CLASSIFICATION_QUESTION,
    GQA_TYPES,
    SUITE,
    Adapter,
    Examples,
    adapter_table,
    register_adapter,
)
from fedbench.tasks.real.datacheck import check
from fedbench.tasks.real.images import decode_images, open_image, xywh_to_unit_xyxy
from fedbench.tasks.real.partition import (
    PARTITIONERS,
    check_partition_options,
    flwr_partition,
    natural_groups,
    natural_split,
)
from fedbench.tasks.real.sources import OFFLINE_VARS, load_split, read_examples, resolve_source, source_of, split_files
from fedbench.tasks.real.suite import REAL_SUITE, RealSuite, build_real, label_space

__all__ = [
    "ADAPTERS",
    "CLASSIFICATION_QUESTION",
    "GQA_TYPES",
    "OFFLINE_VARS",
    "PARTITIONERS",
    "REAL_SUITE",
    "SUITE",
    "Adapter",
    "Examples",
    "RealSuite",
    "adapter_table",
    "build_real",
    "check",
    "check_partition_options",
    "decode_images",
    "flwr_partition",
    "label_space",
    "load_split",
    "natural_groups",
    "natural_split",
    "open_image",
    "read_examples",
    "register_adapter",
    "resolve_source",
    "source_of",
    "split_files",
    "xywh_to_unit_xyxy",
]
