"""Image decoding for real datasets: one row's image cell opened with PIL, the selected rows' images
resized into a checked on-disk ``.npy`` cache under ``$FEDBENCH_CACHE`` (memory-mapped, never a decoded
copy of the dataset in memory), and pixel boxes turned into unit boxes."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fedbench.api.data import DataError
from fedbench.staging.feature_cache import cache_root
from fedbench.tasks.real.adapters import Adapter
from fedbench.tasks.real.sources import files_key, load_split
from fedbench.utils.integrity import IntegrityError, sha256_file, write_atomic


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

    spec = [[a.repo, a.config, split, files_key(root, a, split, True), r.tolist()] for root, a, split, r in requests]
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
