"""pFedMoE (methods/pfedmoe.py): tags, gate inputs, local widths, upload/download, aggregation, smoke run."""

import pytest
import torch

from fedbench.api.method import ClientInfo, Reply, create_method
from fedbench.api.payload import check_upload
from fedbench.backends.inprocess import in_process
from fedbench.config.protocol import MethodEntry
from fedbench.runtime.client import trainable_state
from fedbench.runtime.server import Run
from fedbench.runtime.training import client_context
from fedbench.utils.records import read_jsonl


def test_only_the_global_expert_is_shared_and_travels(tiny_prep, tmp_path, train_client):
    run = Run(tiny_prep, MethodEntry("pfedmoe"), tmp_path, backend=in_process)
    model = run.build()
    tags = run.method.tags(model)
    shared = {n for n, t in tags.items() if t == "shared"}
    local = {n for n, t in tags.items() if t == "local"}
    assert shared and all(n.startswith("global_expert.") for n in shared)
    assert {n.split(".")[0] for n in local} == {"local_expert", "gate", "heads", "trunk"}
    info = tiny_prep.infos[1]
    train_client(run, model, info, 0)
    up = run.method.upload(model, info)
    check_upload(up, shared, local, "pfedmoe")
    params = dict(model.named_parameters())
    assert set(up) == shared and all(torch.equal(up[n], params[n]) for n in up)
    assert set(run.method.download(run.method.init_server_state(model), info)) == shared
    assert model.global_expert.down.out_features == 16 and model.local_expert.down.out_features == 32
    assert model.gate[1].out_features == 64 and model.gate[0].normalized_shape == (3 * 16 * 16,)


def test_aggregation_is_the_example_weighted_mean_of_the_global_expert():
    method = create_method("pfedmoe")
    t = torch.tensor
    payloads = [
        {"global_expert.up.bias": t([1.0, 0.0]), "global_expert.down.weight": t([[2.0]])},
        {"global_expert.up.bias": t([3.0, 6.0]), "global_expert.down.weight": t([[0.0]])},
        {"global_expert.up.bias": t([-1.0, 3.0]), "global_expert.down.weight": t([[4.0]])},
    ]
    examples = (10, 30, 60)
    replies = [
        Reply(ClientInfo(c, ("vqa",), False, n), p, n) for c, (n, p) in enumerate(zip(examples, payloads, strict=True))
    ]
    new = method.aggregate({"global_expert.up.bias": t([9.0, 9.0]), "global_expert.down.weight": t([[9.0]])}, replies)
    assert torch.allclose(new["global_expert.up.bias"], t([(10 * 1 + 30 * 3 - 60 * 1) / 100, (30 * 6 + 60 * 3) / 100]))
    assert torch.allclose(new["global_expert.down.weight"], t([[(10 * 2 + 60 * 4) / 100]]))


def test_representation_is_the_gated_sum_and_pixels_come_from_the_store(tiny_prep, tmp_path):
    run = Run(tiny_prep, MethodEntry("pfedmoe"), tmp_path, backend=in_process)
    model = run.build()
    with torch.no_grad():
        model.global_expert.up.weight.normal_(0, 0.1)
        model.local_expert.up.weight.normal_(0, 0.1)
    ctx = client_context(run.prep, tiny_prep.infos[0], 0)
    batch, cached = ctx.inputs(model, ctx.train_rows[:6])
    assert cached is not None  # frozen backbone: cached features; the batch still carries the pixels
    model.set_client(tiny_prep.infos[0])
    with torch.no_grad():
        f = model.encode(batch, cached)
        pixels = tiny_prep.store.images[batch.image_index].float() / 255
        expected = torch.nn.functional.avg_pool2d(pixels, pixels.shape[-1] // 16).flatten(1)
        assert torch.allclose(f.gate_input, expected, atol=1e-6)
        out = model.adapt(f)
        a = model.gate(f.gate_input).softmax(-1)
        g, loc = model.global_expert(f.tokens), model.local_expert(f.tokens)
        mixed = a[:, 0, None, None] * (f.tokens + g) + a[:, 1, None, None] * (f.tokens + loc)
    assert torch.allclose(model.routing, a) and torch.allclose(a.sum(-1), torch.ones(6))
    assert torch.allclose(out.tokens, mixed, atol=1e-5)
    assert torch.equal(out.image, f.image)


def test_local_width_masks_the_units_past_the_clients_width(tiny_prep, tmp_path, train_client):
    run = Run(
        tiny_prep,
        MethodEntry("pfedmoe", {"local_widths": "4+8", "gate_input": "features"}),
        tmp_path,
        backend=in_process,
    )
    model = run.build()
    assert model.local_expert.down.out_features == 8
    with torch.no_grad():
        model.local_expert.up.weight.normal_(0, 0.1)
    x = torch.randn(2, 5, model.local_expert.norm.normalized_shape[0])
    model.set_client(tiny_prep.infos[2])  # client 2 -> widths[2 % 2] = 4
    with torch.no_grad():
        before = model.local_delta(x)
        model.local_expert.down.weight[4:].normal_()
        assert torch.allclose(model.local_delta(x), before)
        model.set_client(tiny_prep.infos[1])  # width 8: every unit counts
        assert not torch.allclose(model.local_delta(x), before)
    # training client 0 (width 4): the masked units get no gradient (AdamW only decays them)
    info = tiny_prep.infos[0]
    before_state = trainable_state(model)
    train_client(run, model, info, 0)
    assert model.local_width == 4
    decay = (1 - tiny_prep.protocol.local.lr * tiny_prep.protocol.local.weight_decay) ** tiny_prep.protocol.local.steps
    after = model.local_expert
    assert torch.allclose(after.down.weight[4:], before_state["local_expert.down.weight"][4:] * decay)
    assert torch.allclose(after.up.weight[:, 4:], before_state["local_expert.up.weight"][:, 4:] * decay)
    assert not torch.allclose(after.down.weight[:4], before_state["local_expert.down.weight"][:4] * decay)
    assert not torch.equal(before_state["gate.1.weight"], model.gate[1].weight)
    assert model.gate[0].normalized_shape == (2 * tiny_prep.backbone.embed_dim,)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="local_widths"):
        create_method("pfedmoe", {"local_widths": "0+8"})
    with pytest.raises(ValueError, match="gate_input"):
        create_method("pfedmoe", {"gate_input": "text"})


def test_heterogeneous_local_widths_still_send_the_same_global_expert(tiny_prep, tmp_path):
    run = Run(tiny_prep, MethodEntry("pfedmoe", {"local_widths": "8+16+32"}), tmp_path, backend=in_process)
    records = read_jsonl(tmp_path / "runs" / run.execute() / "records.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert len({r["client"] for r in train}) > 1
    assert len({r["up_bytes"] for r in train}) == 1 and len({r["down_bytes"] for r in train}) == 1  # G alone
