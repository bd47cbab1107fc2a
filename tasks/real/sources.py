"""Where a real dataset is and how its splits are read: a local snapshot directory or the hub cache's
snapshot of a hub id, its parquet files (memory-mapped ``datasets.Dataset``, loaded once per process),
and an adapter's examples of one split (metadata only: no image is decoded here)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np

from fedbench.api.data import DataError, DatasetUnavailable, PartitionConfig
from fedbench.tasks.real.adapters import ADAPTERS, Adapter, Examples
from fedbench.utils.checks import is_local_path

OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def source_of(config: PartitionConfig, task: str) -> str:
    return config.sources.get(task, ADAPTERS[task].repo)


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


def files_key(root: Path, adapter: Adapter, split: str, images: bool = False) -> list:
    """A split's files (relative path, size): part of the image cache's key."""
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
