"""Compute time of client work: CUDA events on a GPU, process CPU time on a CPU (and say which)."""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

import torch

_CLOCK: contextvars.ContextVar[ComputeTimer | None] = contextvars.ContextVar("fedbench_compute_clock", default=None)


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
    wall time; it is immune to other processes' load, which makes rows comparable. Work inside
    :func:`off_the_clock` (the FLOP counter's measuring passes) is left out.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.kind = "cuda_events" if self.cuda else "process_cpu"
        self.seconds = 0.0
        self._paused_s = 0.0  # CPU: process time spent off the clock
        self._paused_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave what runs inside out of ``seconds``."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._paused_events.append((start, end))
        else:
            t0 = time.process_time()
            try:
                yield
            finally:
                self._paused_s += time.process_time() - t0

    def __enter__(self) -> ComputeTimer:
        self._token = _CLOCK.set(self)
        self._paused_s, self._paused_events = 0.0, []
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
        _CLOCK.reset(self._token)
        if self.cuda:
            self._end.record()
            torch.cuda.synchronize()
            paused = sum(a.elapsed_time(b) for a, b in self._paused_events) / 1000.0
            self.seconds = self._start.elapsed_time(self._end) / 1000.0 - paused
        else:
            self.seconds = time.process_time() - self._t0 - self._paused_s


@contextmanager
def off_the_clock() -> Iterator[None]:
    """Pause the :class:`ComputeTimer` running now, if any (measurement work is not the method's)."""
    clock = _CLOCK.get()
    if clock is None:
        yield
    else:
        with clock.paused():
            yield
