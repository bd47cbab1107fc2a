"""FLOPs of a client's local update: exact, and the same on every machine (unlike its time).

Counted with :class:`torch.utils.flop_counter.FlopCounterMode` (its rules: matrix products,
convolutions and attention; element-wise work counts zero), plus the CPU's attention kernels, which it
has no formula for (:data:`RULES`). Counting costs time: a dispatch mode
runs Python on every operator, 1.5× a tower-LoRA step and 2.5× a post-tower one on a 2-core CPU. So
the training steps, which are most of a local update, are counted until their cost is known:

A step's FLOPs depend only on the shapes its operators see, and those follow from the batch's
composition: its rows, its distinct images (the tower runs once per image), its rows per task (each
task's head sees its own rows) and its rows with OCR text, given the phase and which parameters
train. Within one key (phase, trainable parameters, the client's tasks and OCR), every operator's
count is linear in the size
of one of those groups, or present only when the group is non-empty. So a step's FLOPs are
``w · x`` for ``x = [1, rows, images, then per task and for OCR: count, count > 0]``, with ``w``
exact integers. Steps are counted until a least-squares fit of ``w`` on the counted steps predicts
:data:`CONFIRM` further counted steps exactly; from then on the key's steps whose composition lies
in the span of the counted ones are predicted, not counted (others are counted). A method whose
costs do not fit never passes the check and is counted on every step.

The fits are kept per model, not per run: every meter of one model in a process shares them
(:func:`shared_fits`), keyed by what fixes a step's cost besides its key and composition (the
method and its options, the protocol's hash and resources, the model's parameter names, shapes and
dtypes). So the seeds and resumed runs of a row confirm its fits once, and later seeds count only
steps of a key or span not seen before. A step's FLOPs are exact either way, so records hold them
and not whether they were counted, which depends on what the process ran before.
``tests/test_flops.py`` runs every registered method both ways and finds equal totals. A step that
must be counted is counted on a dry run of its forward and backward, off the compute clock, before
it runs uncounted, so ``compute_s`` carries no counting overhead for the steps. Everything in the
local update outside the steps (a selection pass, say) is counted directly, under the clock.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from fedbench.utils.timing import off_the_clock

CONFIRM = 3  # counted steps a fit must predict exactly before its key's steps are predicted


def _cpu_attention_rules() -> dict:
    """FlopCounterMode has formulas for the CUDA attention kernels only: on a CPU, scaled-dot-product
    attention runs ``_scaled_dot_product_flash_attention_for_cpu`` (and its backward), which it would
    count as zero. Same arguments in front (query, key, value; grad_out first in the backward), so the
    CUDA flash formulas apply: a row then counts the same FLOPs on a CPU as on a GPU."""
    aten = torch.ops.aten
    pairs = [
        (f"_scaled_dot_product_flash_attention_for_cpu{s}", f"_scaled_dot_product_flash_attention{s}")
        for s in ("", "_backward")
    ]
    return {getattr(aten, cpu): _as_is(flop_registry[getattr(aten, gpu)]) for cpu, gpu in pairs if hasattr(aten, cpu)}


def _as_is(formula: Callable) -> Callable:
    """A registered formula (it already takes tensors), marked so FlopCounterMode does not wrap it again."""

    def rule(*args: object, **kwargs: object) -> int:
        return formula(*args, **kwargs)

    rule._get_raw = True  # type: ignore[attr-defined]
    return rule


RULES = _cpu_attention_rules()


def counter() -> FlopCounterMode:
    """A FlopCounterMode with :data:`RULES` added (what every count in fedbench uses)."""
    return FlopCounterMode(display=False, custom_mapping=RULES)


_METER: contextvars.ContextVar[FlopMeter | None] = contextvars.ContextVar("fedbench_flop_meter", default=None)


def composition(
    rows: int, images: int, per_task: Sequence[int], ocr_rows: int, width: int | None = None, answer_tokens: int = 0
) -> tuple[int, ...]:
    """The features a step's FLOPs are linear in (see the module docstring). ``width``: the padded
    token length of a generative VLM's batch (its LM's products grow with rows × width and its
    attention with rows × width²), None for the CLIP family; ``answer_tokens``: the batch's answer
    tokens, where that LM's head projects onto its vocabulary."""
    x = [1, rows, images]
    for n in (*per_task, ocr_rows):
        x += [n, int(n > 0)]
    if width is not None:
        x += [rows * width, rows * width * width, answer_tokens]
    return tuple(x)


@dataclass
class LinearFit:
    """Counted steps of one key and the least-squares weights that reproduce them. A composition is
    predicted only inside the span of the counted ones (elsewhere the weights are not determined)."""

    xs: list[tuple[int, ...]] = field(default_factory=list)
    ys: list[int] = field(default_factory=list)
    confirmed: int = 0
    weights: np.ndarray | None = None
    rank: int = 0

    def predict(self, x: tuple[int, ...]) -> int | None:
        """The fit's FLOPs for ``x``, or None where the counted steps do not determine them."""
        if self.weights is None or np.linalg.matrix_rank(np.asarray([*self.xs, x], dtype=np.float64)) > self.rank:
            return None
        return round(float(np.dot(self.weights, x)))

    def add(self, x: tuple[int, ...], flops: int) -> None:
        guess = self.predict(x)
        if guess is not None:  # a prediction the count can refute
            self.confirmed = self.confirmed + 1 if guess == flops else 0
        self.xs.append(x)
        self.ys.append(flops)
        a, b = np.asarray(self.xs, dtype=np.float64), np.asarray(self.ys, dtype=np.float64)
        self.weights = np.linalg.lstsq(a, b, rcond=None)[0]
        self.rank = int(np.linalg.matrix_rank(a))
        if not np.array_equal(np.rint(a @ self.weights), b):  # what was counted is not linear in x
            self.confirmed = 0

    def known(self, x: tuple[int, ...]) -> int | None:
        """The predicted FLOPs of ``x`` once the fit is confirmed, else None (count the step)."""
        return self.predict(x) if self.confirmed >= CONFIRM else None


class FlopMeter:
    """FLOPs of the work done while it is entered (one client's local update). ``fits`` persist for
    the meter's owner (a client runtime, across rounds and clients), or for every meter of one model
    in the process when given :func:`shared_fits`; ``total`` and the step counters restart at each
    ``with``."""

    def __init__(self, every_step: bool = False, fits: dict[tuple, LinearFit] | None = None) -> None:
        self.every_step = every_step  # count every step (what the tests compare predictions with)
        self.fits: dict[tuple, LinearFit] = {} if fits is None else fits  # key -> fit (shared: shared_fits)
        self.total = self.counted = self.predicted = 0
        self._mode: FlopCounterMode | None = None
        self._token: contextvars.Token | None = None

    def __enter__(self) -> FlopMeter:
        self.total = self.counted = self.predicted = 0
        self._token = _METER.set(self)
        self._open()
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()
        _METER.reset(self._token)

    def _open(self) -> None:
        self._mode = counter()
        self._mode.__enter__()

    def _close(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self.total += self._mode.get_total_flops()
            self._mode = None

    @contextmanager
    def step(self, key: tuple, x: tuple[int, ...], dry_run: Callable[[], object]) -> Iterator[None]:
        """One training step with batch composition ``x``, which runs inside, uncounted. Its FLOPs
        are the key's fit's prediction once the fit is confirmed; otherwise ``dry_run`` (the step's
        forward and backward, no optimiser update) runs first under the counter, off the compute
        clock (:func:`~fedbench.utils.timing.off_the_clock`) and with the RNG state restored after it, and
        its count refines the fit. The step itself then runs, and is timed, as an uncounted one:
        ``compute_s`` holds no counting overhead for the steps."""
        self._close()
        fit = self.fits.setdefault(key, LinearFit())
        known = None if self.every_step else fit.known(x)
        try:
            if known is None:
                cuda = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
                with off_the_clock(), torch.random.fork_rng(devices=cuda), counter() as mode:
                    dry_run()
                known = mode.get_total_flops()
                fit.add(x, known)
                self.counted += 1
            else:
                self.predicted += 1
            self.total += known
            yield
        finally:
            self._open()


_SHARED_FITS: dict[tuple, dict[tuple, LinearFit]] = {}


def shared_fits(identity: tuple) -> dict[tuple, LinearFit]:
    """The step fits of every meter in this process whose model has ``identity``: what fixes a
    step's FLOPs besides its key (phase, trained parameters, the client's tasks and OCR) and its
    batch composition, e.g. :func:`model_identity`."""
    return _SHARED_FITS.setdefault(identity, {})


def model_identity(model: torch.nn.Module, *setting: Hashable) -> tuple:
    """``setting`` (the method, its options, the protocol: what selects the forward's code path and
    the data's shapes) and the model's structure: every parameter's and buffer's name, shape, dtype."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return (*setting, tuple((name, tuple(t.shape), str(t.dtype)) for name, t in tensors))


def active_meter() -> FlopMeter | None:
    """The meter of the local update running now, if any (training outside a meter is not counted)."""
    return _METER.get()
