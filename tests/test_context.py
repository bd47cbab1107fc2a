"""``ClientContext.train``, the one training loop: exactly the given parameters train (everything else
frozen meanwhile, every flag restored, also on errors), and an extra loss needs no model subclass."""

import dataclasses

import pytest
import torch

from fedbench.backends.inprocess import in_process
from fedbench.config.protocol import MethodEntry
from fedbench.runtime.client import trainable_state
from fedbench.runtime.server import Run
from fedbench.runtime.training import client_context


def _setup(tiny_prep, tmp_path, steps=None):
    """A fedavg-lora model, client 0's context in round 0 (``steps`` local steps), and its head params."""
    model = Run(tiny_prep, MethodEntry("fedavg-lora"), tmp_path, backend=in_process).build()
    ctx = client_context(tiny_prep, tiny_prep.infos[0], 0)
    if steps is not None:
        local = dataclasses.replace(ctx.protocol.local, steps=steps)
        ctx = dataclasses.replace(ctx, protocol=ctx.protocol.replace(local=local))
    heads = {n: p for n, p in model.named_parameters() if n.startswith(("trunk.", "heads."))}
    return model, ctx, heads


def _flags(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


def test_only_params_train_and_every_flag_is_restored(tiny_prep, tmp_path):
    model, ctx, heads = _setup(tiny_prep, tmp_path)
    flags, before = _flags(model), trainable_state(model)
    assert any(flags[n] for n in flags if ".lora_" in n)  # LoRA is trainable, and frozen while heads train
    seen = []

    def probe(m):  # an extra loss of 0 that looks at the flags during training
        seen.append({n for n, p in m.named_parameters() if p.requires_grad})
        return torch.zeros(())

    ctx.train(model, list(heads.values()), "heads-only", None, probe)  # the positional call shape
    assert seen == [set(heads)] * ctx.protocol.local.steps
    assert _flags(model) == flags and not model.training
    after = trainable_state(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= set(heads)


def test_flags_are_restored_when_training_raises(tiny_prep, tmp_path):
    model, ctx, heads = _setup(tiny_prep, tmp_path)
    flags = _flags(model)

    def boom(m):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ctx.train(model, list(heads.values()), extra_loss=boom)
    assert _flags(model) == flags and not model.training


def test_frozen_or_foreign_parameters_are_refused_in_one_line(tiny_prep, tmp_path):
    model, ctx, heads = _setup(tiny_prep, tmp_path)
    name, frozen = next((n, p) for n, p in model.named_parameters() if not p.requires_grad)
    with pytest.raises(ValueError, match=rf"parameter '{name}' is frozen \(requires_grad False\)"):
        ctx.train(model, [*heads.values(), frozen])
    with pytest.raises(ValueError, match=r"params\[0\] is not a parameter of the model"):
        ctx.train(model, [torch.nn.Parameter(torch.zeros(1))])
    assert all(p.requires_grad for p in heads.values()) and not frozen.requires_grad


def test_extra_loss_is_a_proximal_term_without_a_model_subclass(tiny_prep, tmp_path):
    """FedProx: mu/2 · ‖w − w_received‖² as ``extra_loss`` keeps the weights nearer what was received;
    a zero extra loss changes nothing, bit for bit."""

    def train(extra_loss=None):
        model, ctx, heads = _setup(tiny_prep, tmp_path, steps=6)
        received = {n: p.detach().clone() for n, p in heads.items()}
        ctx.train(model, list(heads.values()), extra_loss=extra_loss and extra_loss(heads, received))
        return {n: p.detach() for n, p in heads.items()}, received

    def proximal(mu):
        def make(heads, received):
            return lambda m: mu / 2 * sum(((p - received[n]) ** 2).sum() for n, p in heads.items())

        return make

    def distance(state, received):
        return sum(((state[n] - received[n]) ** 2).sum() for n in state).sqrt().item()

    plain, received = train()
    zero, _ = train(lambda heads, received: lambda m: 0.0)
    assert all(torch.equal(plain[n], zero[n]) for n in plain)
    prox, _ = train(proximal(100.0))
    assert 0 < distance(prox, received) < 0.5 * distance(plain, received)
