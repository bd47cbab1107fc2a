"""FedDPA-T (methods/feddpa.py): tags and upload, uniform/example aggregation, the two-pass
client schedule, exact per-instance α mixing at inference, and the usage records of a run."""

import numpy as np
import pytest
import torch

from fedbench.api.method import ClientInfo, Reply, create_method
from fedbench.api.payload import check_upload
from fedbench.backends.inprocess import in_process
from fedbench.config.protocol import MethodEntry
from fedbench.methods.feddpa import (
    REFERENCE_STREAM,
    FedDPAModel,
    adapter_of,
    instance_alphas,
    local_embeddings,
)
from fedbench.runtime.client import trainable_state
from fedbench.runtime.server import Run
from fedbench.runtime.training import client_context


def _build(tiny_prep, tmp_path, **options):
    run = Run(tiny_prep, MethodEntry("feddpa", options), tmp_path, backend=in_process)
    return run, run.build()


def _names(model, adapter):
    return {n for n, p in model.named_parameters() if adapter_of(n) == adapter}


def _perturb(model, seed=0):
    """Non-zero B for both adapters, so global and local features differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if adapter_of(n) is not None and ".lora_B." in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("heads", ["shared", "local"])
def test_upload_holds_the_global_adapter_and_nothing_local(tiny_prep, tmp_path, heads):
    run, model = _build(tiny_prep, tmp_path, heads=heads)
    tags = run.method.tags(model)
    glob, loc = _names(model, "global"), _names(model, "local")
    assert glob and loc and len(glob) == len(loc)
    assert all(tags[n] == "shared" for n in glob) and all(tags[n] == "local" for n in loc)
    info = tiny_prep.infos[0]
    up = run.method.upload(model, info)
    shared = {n for n, t in tags.items() if t == "shared"}
    check_upload(up, shared, {n for n, t in tags.items() if t == "local"}, "feddpa")
    trunk = {n for n in tags if n.startswith("trunk.")}
    held_heads = {n for n in tags if n.split(".")[0] == "heads" and n.split(".")[1] in info.tasks}
    assert trunk, "the shared answer trunk is part of the answer side"
    assert set(up) == glob | (trunk | held_heads if heads == "shared" else set())
    params = dict(model.named_parameters())
    assert all(torch.equal(up[n], params[n]) for n in up)


def _reply(client, payload, n):
    return Reply(ClientInfo(client, ("classification",), False, n), payload, n)


def test_aggregation_uniform_by_default_and_by_examples():
    replies = [
        _reply(0, {"g": torch.tensor([1.0, 2.0]), "h": torch.tensor([4.0])}, 10),
        _reply(1, {"g": torch.tensor([3.0, 6.0]), "h": torch.tensor([8.0])}, 30),
        _reply(2, {"g": torch.tensor([5.0, 1.0])}, 60),
    ]
    state = {"g": torch.zeros(2), "h": torch.zeros(1), "kept": torch.tensor([7.0])}
    uniform = create_method("feddpa").aggregate(state, replies)
    assert torch.allclose(uniform["g"], torch.tensor([(1 + 3 + 5) / 3, (2 + 6 + 1) / 3]))
    assert torch.allclose(uniform["h"], torch.tensor([(4 + 8) / 2]))  # over the replies that carry it
    assert torch.equal(uniform["kept"], torch.tensor([7.0]))
    by_examples = create_method("feddpa", {"weighting": "examples"}).aggregate(state, replies)
    assert torch.allclose(by_examples["g"], torch.tensor([0.1 * 1 + 0.3 * 3 + 0.6 * 5, 0.1 * 2 + 0.3 * 6 + 0.6 * 1]))
    assert torch.allclose(by_examples["h"], torch.tensor([(10 * 4 + 30 * 8) / 40]))
    with pytest.raises(ValueError, match="weighting"):
        create_method("feddpa", {"weighting": "median"})
    with pytest.raises(ValueError, match="num_reference"):
        create_method("feddpa", {"num_reference": 0})


def _spy(ctx, model):
    """Record each ctx.train call: phase, LoRA mix, detached set, which parameters are optimised and
    which require grad while it trains (seen by a zero extra loss); and the state right after it."""
    calls = []
    original = ctx.train
    names = {id(p): n for n, p in model.named_parameters()}

    def train(m, params, phase="train", **kwargs):
        params = list(params)
        delta = m.deltas()[0]
        call = {
            "phase": phase,
            "mix": dict(delta.mix),
            "detached": set(delta.detached),
            "params": {names[id(p)] for p in params},
        }

        def probe(model):
            call["grad"] = {n for n, p in model.named_parameters() if p.requires_grad}
            return 0.0

        original(m, params, phase=phase, extra_loss=probe, **kwargs)
        call["after"] = {n: p.detach().clone() for n, p in m.named_parameters()}
        calls.append(call)

    ctx.train = train
    return calls


@pytest.mark.parametrize("heads", ["shared", "local"])
def test_round0_trains_global_only_later_rounds_local_then_global(tiny_prep, tmp_path, heads):
    run, model = _build(tiny_prep, tmp_path, heads=heads)
    info = tiny_prep.infos[0]
    glob, loc = _names(model, "global"), _names(model, "local")
    head_names = {n for n in run.method.tags(model) if n.startswith(("heads.", "trunk."))}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    ctx0 = client_context(run.prep, info, 0)
    calls = _spy(ctx0, model)
    before = trainable_state(model)
    run.method.local_update(model, ctx0)
    after0 = trainable_state(model)
    assert [c["phase"] for c in calls] == ["feddpa-global"]
    assert calls[0]["mix"] == {"global": 1.0} and calls[0]["params"] == glob | head_names
    assert calls[0]["grad"] == glob | head_names
    assert all(torch.equal(before[n], after0[n]) for n in loc), "round 0 leaves the local adapter alone"
    assert any(not torch.equal(before[n], after0[n]) for n in glob)

    ctx1 = client_context(run.prep, info, 1)
    calls = _spy(ctx1, model)
    run.method.local_update(model, ctx1)
    after1 = trainable_state(model)
    local_pass, global_pass = calls
    assert [c["phase"] for c in calls] == ["feddpa-local", "feddpa-global"]
    assert local_pass["mix"] == {"local": 0.5, "global": 0.5} and local_pass["detached"] == {"global"}
    expected = loc | (head_names if heads == "local" else set())
    assert local_pass["params"] == expected and local_pass["grad"] == expected
    mid = local_pass["after"]
    assert all(torch.equal(after0[n], mid[n]) for n in glob), "pass (1) keeps the received global"
    if heads == "shared":
        assert all(torch.equal(after0[n], mid[n]) for n in head_names), "shared heads frozen in pass (1)"
    assert global_pass["mix"] == {"global": 1.0} and global_pass["detached"] == set()
    assert global_pass["params"] == glob | head_names
    assert all(torch.equal(mid[n], after1[n]) for n in loc), "pass (2) keeps the local adapter"
    assert any(not torch.equal(after0[n], after1[n]) for n in loc)
    assert any(not torch.equal(after0[n], after1[n]) for n in glob)
    # flags and mixes restored
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(d.mix == {"global": 1.0} and not d.detached for d in model.deltas())


def test_alpha_and_features_are_per_instance_and_exact(tiny_prep, tmp_path):
    run, model = _build(tiny_prep, tmp_path)
    assert isinstance(model, FedDPAModel)
    _perturb(model)
    info = tiny_prep.infos[1]
    ctx = client_context(run.prep, info, 1)
    store = tiny_prep.store
    ids = torch.as_tensor(np.unique(store.image_index.numpy())[:3])
    alphas = instance_alphas(model, ids, ctx)
    assert len(set(alphas.tolist())) == 3, "one α per image"

    # α by hand: 0.5 × mean cosine to the 5 references, all embedded with the local adapter alone
    rows = ctx.sample(5, REFERENCE_STREAM)
    model.eval()
    with torch.no_grad(), model.mixed({"local": 1.0}):
        refs = model.backbone.encode_image(store.images[store.image_index[rows]])[1]
        for k, i in enumerate(ids.tolist()):
            emb = model.backbone.encode_image(store.images[i : i + 1])[1]
            want = 0.5 * torch.nn.functional.cosine_similarity(emb, refs).mean()
            assert torch.allclose(alphas[k], want, atol=1e-6)
    assert torch.equal(local_embeddings(model, ids[:1], ctx), local_embeddings(model, ids[:1], ctx))
    with torch.no_grad(), model.mixed({"local": 1.0}):
        tok_refs = model.backbone.encode_image(store.images[store.image_index[rows]])[0].mean(1)
        tok = model.backbone.encode_image(store.images[ids])[0].mean(1)
    want = 0.5 * torch.nn.functional.cosine_similarity(tok[:, None], tok_refs[None], dim=-1).mean(1)
    assert torch.allclose(instance_alphas(model, ids, ctx, embedding="token_mean"), want, atol=1e-6)

    tokens, pooled = run.method.encode_images(model, ids, ctx)
    assert all(d.mix == {"global": 1.0} and not d.detached for d in model.deltas()), "mix restored"
    for k, i in enumerate(ids.tolist()):
        a = float(alphas[k])
        with torch.no_grad(), model.mixed({"global": a, "local": 1 - a}):
            t, p = model.backbone.encode_image(store.images[i : i + 1])
        assert torch.equal(tokens[k : k + 1], t) and torch.equal(pooled[k : k + 1], p)
        other = float(alphas[(k + 1) % 3])
        with torch.no_grad(), model.mixed({"global": other, "local": 1 - other}):
            _, p_other = model.backbone.encode_image(store.images[i : i + 1])
        assert not torch.allclose(pooled[k : k + 1], p_other), "another image's α gives other features"

    # routing: each row gets its own image's [α, 1 − α]
    rows = np.flatnonzero(np.isin(store.image_index.numpy(), ids.numpy()))
    batch = store.batch(rows)
    pos = torch.as_tensor([ids.tolist().index(i) for i in batch.image_index.tolist()])
    with torch.no_grad():
        model.forward(batch, cached=(tokens[pos], pooled[pos]))
    assert torch.allclose(model.routing, torch.stack([alphas[pos], 1 - alphas[pos]], -1))
    assert model.expert_names == ["global", "local"]


def test_usage_records_mix_global_and_local_by_alpha(tiny_run):
    """The two rounds of the shared TINY run (checked like every method's in test_methods): the usage
    rows are [α, 1 − α] over (global, local), with α = max_weight (0.5) × a mean cosine similarity."""
    usage = tiny_run("feddpa").of("usage")
    assert usage and {r["expert"] for r in usage} == {"global", "local"}
    for rnd, task in {(r["round"], r["task"]) for r in usage}:
        values = {r["expert"]: r["value"] for r in usage if (r["round"], r["task"]) == (rnd, task)}
        assert values["global"] + values["local"] == pytest.approx(1.0)
        assert -0.5 <= values["global"] <= 0.5
