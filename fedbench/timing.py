"""Compute time of client work: CUDA events on a GPU, process CPU time on a CPU (and say which)."""

from __future__ import annotations

import time
from types import TracebackType

import torch


def device_label(device: torch.device, amp: torch.dtype | None = None) -> str:
    """What the leaderboard's device column shows: the GPU's name or the CPU's threads, and the
    autocast dtype of forward passes when there is one."""
    label = (
        f"cuda:{torch.cuda.get_device_name(device)}"
        if device.type == "cuda"
        else f"cpu:{torch.get_num_threads()}threads"
    )
    return label if amp is None else f"{label}+autocast-{str(amp).removeprefix('torch.')}"


class ComputeTimer:
    """Context manager; ``seconds`` after exit, ``kind`` is ``cuda_events`` or ``process_cpu``.

    Process CPU time sums all threads of this process, so on a multi-core CPU it can exceed
    wall time; it is immune to other processes' load, which makes rows comparable.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.kind = "cuda_events" if self.cuda else "process_cpu"
        self.seconds = 0.0

    def __enter__(self) -> ComputeTimer:
        if self.cuda:
            self._start, self._end = (
                torch.cuda.Event(enable_timing=True),
                torch.cuda.Event(enable_timing=True),
            )
            self._start.record()
        else:
            self._t0 = time.process_time()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.cuda:
            self._end.record()
            torch.cuda.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1000.0
        else:
            self.seconds = time.process_time() - self._t0
