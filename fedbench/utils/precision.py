"""Where a client's arithmetic runs: mixed precision on CUDA, and host-to-device index copies that
do not wait for the GPU (``resources.amp``, ``resources.device``)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch


def amp_dtype(device: torch.device, mode: str = "auto") -> torch.dtype | None:
    """The autocast dtype of ``resources.amp`` on ``device``: bfloat16 on a CUDA device that has it
    (``auto``, ``bf16``), else None (float32). ``bf16`` where it cannot run is refused in one line."""
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if mode == "bf16" and not supported:
        raise ValueError(f"resources.amp = 'bf16' needs a CUDA device with bfloat16; this run is on {device}")
    return torch.bfloat16 if supported and mode in ("auto", "bf16") else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """Forward passes under autocast to ``dtype`` (matrix products in it, reductions and losses in
    float32, as torch's autocast lists decide); nothing when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def device_index(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """Row positions as a long tensor on ``device``. On CUDA the copy goes through pinned memory and
    does not block: the host goes on queueing work instead of waiting for the GPU to drain."""
    index = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
    if device.type != "cuda":
        return index if device.type == "cpu" else index.to(device)
    return index.pin_memory().to(device, non_blocking=True)
