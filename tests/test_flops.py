"""FLOPs of local updates: predicted steps equal counted ones, for every registered method."""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import pytest
import torch
from conftest import TINY
from torch.utils.flop_counter import FlopCounterMode

from fedbench.api.method import create_method
from fedbench.api.registry import METHODS
from fedbench.backends.inprocess import in_process
from fedbench.config.protocol import LocalConfig, MethodEntry
from fedbench.runtime.client import ClientRuntime, trainable_state
from fedbench.runtime.server import Run
from fedbench.runtime.training import client_context
from fedbench.staging.prepare import prepare
from fedbench.utils import timing
from fedbench.utils.flops import CONFIRM, FlopMeter, LinearFit, composition, counter

STEPS = 16  # enough steps per update for fits to confirm and predict


@pytest.fixture(scope="module")
def many_steps_prep(backbone):
    proto = TINY.replace(local=LocalConfig(steps=STEPS, batch_size=6))
    return prepare(proto, 0, backbone=backbone, device=torch.device("cpu"))


def _updates(run: Run, model, meter: FlopMeter) -> list[tuple[int, int]]:
    """(FLOPs, counted steps) of each client's update over two rounds, one model and meter throughout."""
    out = []
    for r in range(2):
        for info in run.prep.infos[:2]:
            ctx = client_context(run.prep, info, r)
            run.method.prepare_client(model, ctx)
            with meter:
                run.method.local_update(model, ctx)
            out.append((meter.total, meter.counted))
    return out


@pytest.mark.parametrize("name", METHODS.names())
def test_predicted_flops_equal_counting_every_step(name, many_steps_prep, tmp_path):
    run = Run(many_steps_prep, MethodEntry(name), tmp_path, backend=in_process)
    model = run.build()
    twin = copy.deepcopy(model)
    torch.manual_seed(0)
    predicted = _updates(run, model, FlopMeter())
    torch.manual_seed(0)
    every = _updates(run, twin, FlopMeter(every_step=True))
    assert [f for f, _ in predicted] == [f for f, _ in every]
    assert all(f > 0 for f, _ in every), "a local update does matrix products"
    assert all(c == 0 or c >= 1 for _, c in every)


@pytest.fixture(scope="module")
def seed_one_prep(backbone):
    proto = TINY.replace(local=LocalConfig(steps=STEPS, batch_size=6))
    return prepare(proto, 1, backbone=backbone, device=torch.device("cpu"))


@pytest.mark.parametrize("name", METHODS.names())
def test_a_later_seed_reuses_the_fits_of_its_model_and_stays_exact(name, many_steps_prep, seed_one_prep, tmp_path):
    """The client runtimes of two seeds of one row share their fits (one model structure), so the
    second seed's FLOPs are predicted from the first's fits, and still equal counting every step."""
    first = ClientRuntime(many_steps_prep, create_method(name))
    second = ClientRuntime(seed_one_prep, create_method(name))
    assert second.flops.fits is first.flops.fits
    first.flops.fits.clear()  # what earlier tests of this process left there
    _updates(Run(many_steps_prep, MethodEntry(name), tmp_path / "0", backend=in_process), first.model, first.flops)
    run = Run(seed_one_prep, MethodEntry(name), tmp_path / "1", backend=in_process)
    twin = copy.deepcopy(second.model)
    torch.manual_seed(0)
    shared = _updates(run, second.model, second.flops)
    torch.manual_seed(0)
    every = _updates(run, twin, FlopMeter(every_step=True))
    assert [f for f, _ in shared] == [f for f, _ in every]


def test_fits_are_shared_only_by_models_of_one_row_and_protocol(many_steps_prep):
    pilot = ClientRuntime(many_steps_prep, create_method("pilot-ctmoa")).flops.fits
    assert ClientRuntime(many_steps_prep, create_method("pilot-ctmoa")).flops.fits is pilot
    assert ClientRuntime(many_steps_prep, create_method("pilot-ctmoa", {"top_k": 2})).flops.fits is not pilot
    assert ClientRuntime(many_steps_prep, create_method("fedavg-lora")).flops.fits is not pilot
    other = dataclasses.replace(many_steps_prep, protocol=many_steps_prep.protocol.replace(rounds=3))
    assert ClientRuntime(other, create_method("pilot-ctmoa")).flops.fits is not pilot


def test_predictions_save_counting_on_a_tower_row(many_steps_prep, tmp_path):
    run = Run(many_steps_prep, MethodEntry("fedavg-lora"), tmp_path, backend=in_process)
    updates = _updates(run, run.build(), FlopMeter())
    steps = STEPS * len(updates)
    counted = sum(c for _, c in updates)
    assert counted < steps / 2, f"{counted} of {steps} steps counted"


def test_every_step_meter_counts_what_flop_counter_mode_counts(many_steps_prep, tmp_path):
    run = Run(many_steps_prep, MethodEntry("pilot-ctmoa"), tmp_path, backend=in_process)
    model = run.build()
    twin = copy.deepcopy(model)
    info = many_steps_prep.infos[0]
    torch.manual_seed(0)
    with FlopMeter(every_step=True) as meter:
        run.method.local_update(model, client_context(many_steps_prep, info, 0))
    torch.manual_seed(0)
    with counter() as mode:
        run.method.local_update(twin, client_context(many_steps_prep, info, 0))
    assert meter.total == mode.get_total_flops() > 0


def test_attention_counts_on_the_cpu_as_its_cuda_formula():
    """FlopCounterMode alone counts the CPU's attention kernel as zero; fedbench's counter uses the
    flash-attention formula: 4·b·h·s·s·d forward (QK^T and PV), 2.5 times that backward."""
    b, h, s, d = 2, 4, 16, 8
    q = torch.randn(b, h, s, d, requires_grad=True)

    def attend() -> None:
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()

    with FlopCounterMode(display=False) as plain:
        attend()
    with counter() as ours:
        attend()
    assert plain.get_total_flops() == 0
    forward = 4 * b * h * s * s * d
    assert ours.get_total_flops() == forward + 5 * forward // 2


def test_a_linear_cost_is_predicted_after_confirmation():
    fit = LinearFit()
    cost = lambda x: 7 + 3 * x[1] + 11 * x[2] + 5 * x[4]  # noqa: E731
    xs = [composition(8, i % 5 + 1, [i % 3, 8 - i % 3], 0) for i in range(12)]
    for x in xs:
        if fit.known(x) is None:
            fit.add(x, cost(x))
    assert fit.confirmed >= CONFIRM
    x = composition(8, 4, [2, 6], 0)
    assert fit.known(x) == cost(x)


def test_a_nonlinear_cost_is_never_predicted():
    fit = LinearFit()
    cost = lambda x: x[2] ** 2  # noqa: E731  (pairwise work between images)
    for i in range(30):
        x = composition(8, i % 7 + 1, [4, 4], 0)
        assert fit.known(x) is None
        fit.add(x, cost(x))


def test_a_composition_outside_the_counted_span_is_counted():
    fit = LinearFit()
    cost = lambda x: 2 * x[1] + 9 * x[4]  # noqa: E731
    for i in range(10):  # task 1 always present
        x = composition(8, i % 4 + 1, [8 - i % 3, i % 3 + 1], 0)
        fit.add(x, cost(x))
    assert fit.confirmed >= CONFIRM
    assert fit.known(composition(8, 3, [8, 0], 0)) is None  # task 1 absent: its weight is not determined


@pytest.mark.parametrize("name", METHODS.names())
def test_counting_a_step_changes_nothing_the_step_computes(name, many_steps_prep, tmp_path):
    """A counted step is measured on a dry run of its forward and backward (RNG restored) before it
    runs: a local update with every step counted ends in the very state of one with no meter."""
    run = Run(many_steps_prep, MethodEntry(name), tmp_path, backend=in_process)
    model = run.build()
    twin = copy.deepcopy(model)
    info = many_steps_prep.infos[0]
    for r in range(2):  # round 1 too: FedDPA's local pass, Pilot's later stages
        for m, meter in ((model, FlopMeter(every_step=True)), (twin, None)):
            ctx = client_context(many_steps_prep, info, r)
            run.method.prepare_client(m, ctx)
            torch.manual_seed(r)
            with meter if meter is not None else contextlib.nullcontext():
                run.method.local_update(m, ctx)
    counted, plain = trainable_state(model), trainable_state(twin)
    assert counted.keys() == plain.keys()
    assert all(torch.equal(counted[n], plain[n]) for n in counted), name


def test_the_compute_clock_leaves_out_what_runs_off_it(monkeypatch):
    """ComputeTimer subtracts the time spent in :func:`off_the_clock` (the FLOP counter's dry runs)."""
    ticks = iter([10.0, 11.0, 15.0, 16.5])  # enter, pause, resume, exit
    monkeypatch.setattr(timing.time, "process_time", lambda: next(ticks))
    with timing.ComputeTimer(torch.device("cpu")) as timer:
        with timing.off_the_clock():
            pass
    assert timer.seconds == 6.5 - 4.0
    with timing.off_the_clock():  # no clock running: nothing to pause
        pass
