"""Frozen-tower features on disk, reused across rounds, rows, seeds and later runs (DESIGN §4).

Methods whose trainable parts sit after the frozen towers read the towers' output, never their
weights, so those features are computed once per **key** and kept under
``cache_root()/features/<key>/`` (``$FEDBENCH_CACHE``, default ``~/.cache/fedbench``). The text
tower's embeddings of the questions and OCR words, which every method reads, are kept the same way
under ``cache_root()/text/<key>/`` (:func:`text_key_parts`: the backbone, the exact strings, the batch
size, device type and torch version). The image key is the SHA-256 of:

- the backbone: every weight and buffer of its towers (name, dtype, shape, bytes), its class, and
  its output widths;
- the images: the exact bytes, dtype and shape of the table's uint8 pixel tensor, for every suite
  (the generated suite's drawn scenes, the real suite's memory-mapped image cache, itself keyed by the
  dataset files, split, rows and size), so any change of dataset, revision, rows or seed that changes
  a pixel is a new entry, and seeds that draw the same images share one;
- the preprocessing: the tower's input size, normalisation mean and std;
- how they were computed: the batch size, the autocast dtype (``resources.amp``), the device type and
  the torch version (any of them could change the last bit of a float, and loaded features must equal
  recomputed ones exactly).

An image entry is two ``.npy`` files (``tokens``, ``pooled``; a text entry one, ``embeddings``), in
the dtype the tower produced, so the round trip is bit-exact, and ``entry.json`` with their SHA-256
and the key's parts (readable, for a human asking what an entry is). Files are written under
temporary names and renamed; ``entry.json`` comes last, so an entry without it was never finished
and is recomputed. On read every file is checked against its recorded SHA-256. **A damaged or
half-written entry is recomputed and rewritten**, with one warning naming the file: the cache holds
only derived data, so a damaged entry costs time, never a result (unlike checkpoints and records, which
stop the run, see :mod:`fedbench.utils.integrity`).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import _disable_current_modes

from fedbench.api.backbone import Backbone, backbone_family
from fedbench.staging.prompt_view import PromptViews
from fedbench.utils.integrity import sha256_file

FORMAT = 1  # bump when the entry layout or the key's meaning changes: old entries are then never read
FILES = ("tokens", "pooled")
TEXT_FILES = ("embeddings",)
ENTRY = "entry.json"
TEXT_BATCH = 256  # strings per text-tower pass (Backbone.encode_text's default), part of the text key


def cache_root() -> Path:
    """Where fedbench keeps derived data between runs: ``$FEDBENCH_CACHE``, else ``~/.cache/fedbench``."""
    return Path(os.environ.get("FEDBENCH_CACHE") or Path.home() / ".cache" / "fedbench")


def features_dir() -> Path:
    """The image-feature cache's directory under :func:`cache_root`."""
    return cache_root() / "features"


def text_dir() -> Path:
    """The text-embedding cache's directory under :func:`cache_root`."""
    return cache_root() / "text"


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of ``t`` (any dtype, bfloat16 included), on the CPU."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def backbone_digest(backbone: Backbone) -> str:
    """SHA-256 of the towers' weights and buffers and of the shapes they produce: other weights,
    another architecture or another library give another digest."""
    if backbone_family(backbone) == "vlm":  # a VLM's cached features: its vision tower's, at its layer
        cfg = backbone.model.config
        head = (
            f"vlm|{type(backbone.vision_tower).__qualname__}|{cfg.vision_feature_layer}|"
            f"{cfg.vision_feature_select_strategy}|{backbone.mean.flatten().tolist()}|{backbone.std.flatten().tolist()}"
        )
        state = backbone.vision_tower.state_dict()
    else:
        head, state = (
            f"{type(backbone.towers).__qualname__}|{backbone.token_dim}|{backbone.embed_dim}",
            backbone.state_dict(),
        )
    digest = hashlib.sha256(head.encode())
    for name, tensor in sorted(state.items()):
        digest.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def images_digest(images: torch.Tensor) -> str:
    """SHA-256 of the exact pixel bytes (read in chunks: the images may be a memory-mapped file)."""
    digest = hashlib.sha256(f"{images.dtype}|{tuple(images.shape)}|".encode())
    for i in range(0, len(images), 4096):
        digest.update(_tensor_bytes(images[i : i + 4096]))
    return digest.hexdigest()


def key_parts(
    backbone: Backbone,
    images: torch.Tensor,
    batch_size: int,
    amp: torch.dtype | None = None,
    digest: str | None = None,
) -> dict:
    """Everything the features depend on (see the module docstring); ``digest``: the backbone's
    :func:`backbone_digest` when the caller already has it (hashing a large backbone takes seconds)."""
    return {
        "format": FORMAT,
        "backbone": digest or backbone_digest(backbone),
        "images": images_digest(images),
        "preprocess": {
            "image_size": backbone.image_size,
            "mean": backbone.mean.flatten().tolist(),
            "std": backbone.std.flatten().tolist(),
        },
        "batch_size": batch_size,
        "autocast": None if amp is None else str(amp),
        "device": backbone.mean.device.type,
        "torch": torch.__version__,
    }


def strings_digest(texts: list[str]) -> str:
    """SHA-256 of the strings, in order (each one length-prefixed, so no two lists collide)."""
    digest = hashlib.sha256(f"{len(texts)}|".encode())
    for text in texts:
        raw = text.encode()
        digest.update(f"{len(raw)}:".encode() + raw)
    return digest.hexdigest()


def text_key_parts(backbone: Backbone, texts: list[str], digest: str | None = None) -> dict:
    """Everything the text tower's embeddings of ``texts`` depend on: the backbone's weights and name
    (the name fixes its tokenizer), the strings, the batching, the device type and torch version."""
    return {
        "format": FORMAT,
        "kind": "text",
        "backbone": digest or backbone_digest(backbone),
        "backbone_name": backbone.name,
        "texts": strings_digest(texts),
        "batch_size": TEXT_BATCH,
        "device": backbone.mean.device.type,
        "torch": torch.__version__,
    }


def entry_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().to("cpu").contiguous()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()  # npy has no bfloat16


def _from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == str(torch.bfloat16) else t


@dataclass
class DiskEntry:
    """One key's directory; :meth:`load` gives the arrays or None, :meth:`save` writes them.
    ``files`` names them: (tokens, pooled) for image features, (embeddings,) for text."""

    directory: Path
    parts: dict
    files: tuple[str, ...] = FILES

    @classmethod
    def for_key(cls, root: Path, parts: dict, files: tuple[str, ...] = FILES) -> DiskEntry:
        return cls(Path(root) / entry_key(parts), parts, files)

    def load(self, device: torch.device) -> tuple[torch.Tensor, ...] | None:
        """The stored arrays (in ``files`` order) on ``device``, or None when the entry is absent; a
        damaged or unfinished entry warns (naming the file) and gives None, so the caller recomputes it."""
        meta_path = self.directory / ENTRY
        if not meta_path.is_file():
            if self.directory.is_dir() and any(self.directory.iterdir()):
                self._damaged(meta_path, "is missing (the entry was never finished)")
            return None
        try:
            meta = json.loads(meta_path.read_text())
            sums, dtypes = meta["sha256"], meta["dtype"]
        except (OSError, ValueError, KeyError, TypeError):
            self._damaged(meta_path, "is unreadable")
            return None
        if meta.get("parts") != self.parts:  # a hash collision or a hand-edited entry: never trust it
            self._damaged(meta_path, "records another key")
            return None
        out = []
        for name in self.files:
            path = self.directory / f"{name}.npy"
            if not path.is_file() or sha256_file(path) != sums.get(name):
                self._damaged(path, "is missing or damaged (its sha256 differs from the one recorded)")
                return None
            array = np.load(path, mmap_mode="c")  # copy-on-write map: rows are paged in as they are indexed
            tensor = _from_numpy(array, dtypes[name])
            out.append(tensor if device.type == "cpu" else tensor.to(device))
        return tuple(out)

    def save(self, *tensors: torch.Tensor) -> None:
        """Write the entry: each file under a temporary name, renamed, then ``entry.json`` last."""
        self.directory.mkdir(parents=True, exist_ok=True)
        sums, dtypes = {}, {}
        for name, tensor in zip(self.files, tensors, strict=True):
            path = self.directory / f"{name}.npy"
            tmp = path.with_name(f"{name}.{os.getpid()}.tmp.npy")
            with open(tmp, "wb") as f:
                np.save(f, _to_numpy(tensor))
                f.flush()
                os.fsync(f.fileno())
            sums[name], dtypes[name] = sha256_file(tmp), str(tensor.dtype)
            os.replace(tmp, path)
        meta = {"parts": self.parts, "sha256": sums, "dtype": dtypes}
        tmp = self.directory / f"{ENTRY}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.replace(tmp, self.directory / ENTRY)

    def _damaged(self, path: Path, why: str) -> None:
        warnings.warn(f"feature cache '{path}' {why}; recomputing the entry", RuntimeWarning, stacklevel=3)


class FeatureCache:
    """Frozen-backbone image features of every image, computed once and shared by all methods whose
    trainable parts sit after the towers. Filled lazily, on the first :meth:`get` (only such methods
    call it). With ``disk`` (a directory, see :mod:`fedbench.staging.feature_cache`) they are read from the
    entry of their key when there is one, else computed and written there, so later seeds and runs on
    the same images and backbone skip the towers; without it they live in memory for this seed only.
    ``origin`` says which happened: None (not filled yet), ``memory``, ``disk`` or ``computed``
    (computed and written to disk); ``entry`` is the on-disk directory, when there is one."""

    def __init__(
        self,
        backbone: Backbone,
        images: torch.Tensor,
        batch_size: int = 256,
        prompts: PromptViews | None = None,
        disk: Path | None = None,
        amp: torch.dtype | None = None,
        digest: str | None = None,
    ) -> None:
        self.backbone, self.images, self.batch_size = backbone, images, batch_size
        self.digest = digest  # the backbone's digest (part of the disk key) when the caller has it
        self.amp = amp  # the towers' autocast dtype (resources.amp), whichever context the first get runs in
        self.prompts = prompts  # per-row prompt views (text drawn around the image), for routers that read them
        self.disk = disk
        self.origin: str | None = None
        self.entry: Path | None = None
        self._tokens: torch.Tensor | None = None
        self._pooled: torch.Tensor | None = None

    @torch.no_grad()
    def _compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The towers over every image. Staging shared by all rows, not a client's local update, so it
        runs outside any FLOP count (``compute_flops``) that is open when the first ``get`` fills it:
        otherwise whichever client came first would carry the whole table's tower pass, and only when
        the features were not already on disk. Its precision is the run's (``amp``), set here, never
        the autocast of whichever training or evaluation pass happens to call ``get`` first."""
        tokens, pooled = [], []
        device = self.backbone.mean.device.type
        with (
            _disable_current_modes(),  # suspends torch dispatch modes, FlopCounterMode among them
            torch.autocast(device, dtype=self.amp or torch.float32, enabled=self.amp is not None),
        ):
            for i in range(0, len(self.images), self.batch_size):
                t, p = self.backbone.encode_image(self.images[i : i + self.batch_size])
                tokens.append(t)
                pooled.append(p)
        return torch.cat(tokens), torch.cat(pooled)

    def _fill(self) -> None:
        if self.disk is None:
            (self._tokens, self._pooled), self.origin = self._compute(), "memory"
            return
        parts = key_parts(self.backbone, self.images, self.batch_size, self.amp, self.digest)
        entry = DiskEntry.for_key(self.disk, parts)
        self.entry = entry.directory
        loaded = entry.load(self.backbone.mean.device)
        if loaded is not None:
            (self._tokens, self._pooled), self.origin = loaded, "disk"
            return
        self._tokens, self._pooled = self._compute()
        entry.save(self._tokens, self._pooled)
        self.origin = "computed"

    def get(self, image_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tokens is None:
            self._fill()
        idx = image_index.to(self._tokens.device)
        return self._tokens[idx], self._pooled[idx]
