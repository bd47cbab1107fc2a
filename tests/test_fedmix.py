"""FedMix (methods/fedmix.py): mixture output, top-m selection, upload/download, aggregation, smoke run."""

from dataclasses import replace

import pytest
import torch

from fedbench.data import GLOBAL_TEST
from fedbench.method import ClientInfo, Reply, create_method
from fedbench.payload import check_upload
from fedbench.protocol import MethodEntry
from fedbench.records import read_jsonl
from fedbench.simulation import Run, trainable_state


def expert_of(name):
    return int(name.split(".")[1]) if name.startswith("experts.") else None


def test_every_trainable_tensor_is_a_gate_or_expert_tensor(tiny_prep, tmp_path):
    run = Run(tiny_prep, MethodEntry("fedmix"), tmp_path)
    model = run.build()
    tags = run.method.tags(model)
    assert set(tags.values()) == {"shared"}
    assert all(n.startswith(("gate.", "experts.")) for n in tags)  # model.heads frozen, unused
    assert {expert_of(n) for n in tags} == {None, 0, 1, 2, 3}
    assert model.expert_names == ["expert0", "expert1", "expert2", "expert3"]


def test_output_is_the_gate_weighted_mixture(tiny_prep, tmp_path):
    run = Run(tiny_prep, MethodEntry("fedmix", {"num_experts": 3}), tmp_path)
    model = run.build()
    with torch.no_grad():  # make experts differ (up projections start at zero)
        for e in model.experts:
            e.adapter.up.weight.normal_(0, 0.1)
    ctx = run.context(tiny_prep.infos[0], 0)
    rows = tiny_prep.table.rows(split=GLOBAL_TEST)
    batch, cached = ctx.inputs(model, rows)
    with torch.no_grad():
        outputs = model.forward(batch, cached)
        f = model.encode(batch, cached)
        g = model.gate_probs(f)
    assert torch.allclose(model.routing, g) and torch.allclose(g.sum(-1), torch.ones(len(rows)))
    for name, (idx, out) in outputs.items():
        sub = f.select(idx)
        per_expert = []
        with torch.no_grad():
            for e in model.experts:
                tokens = sub.tokens + e.adapter(sub.tokens)
                per_expert.append(e.heads[name](replace(sub, tokens=tokens)))
        if model.is_box[name]:
            expected = sum(g[idx, k, None] * o for k, o in enumerate(per_expert))
            assert torch.allclose(out, expected, atol=1e-6)
        else:
            expected = sum(g[idx, k, None] * o.softmax(-1) for k, o in enumerate(per_expert)).log()
            assert torch.allclose(out, expected, atol=1e-5)
            assert torch.allclose(out.exp().sum(-1), torch.ones(len(idx)), atol=1e-5)


def test_local_update_trains_and_uploads_only_the_top_m_experts(tiny_prep, tmp_path, train_client):
    run = Run(tiny_prep, MethodEntry("fedmix"), tmp_path)
    model = run.build()
    info = tiny_prep.infos[0]
    before = trainable_state(model)
    train_client(run, model, info, 0)
    after = trainable_state(model)
    assert set(after) == set(before), "requires_grad restored after the update"
    selection = model.selection.tolist()
    assert len(selection) == 2 and model.gate_mass.shape == (4,)
    assert torch.allclose(model.gate_mass.sum(), torch.tensor(1.0))
    assert set(selection) == set(torch.topk(model.gate_mass, 2).indices.tolist())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert {expert_of(n) for n in changed} == {None, *selection}  # gate + chosen experts only
    for n in changed:  # heads of tasks the client does not hold are not trained
        if ".heads." in n:
            assert n.split(".")[3] in info.tasks

    up = run.method.upload(model, info)
    tags = run.method.tags(model)
    check_upload(up, {n for n, t in tags.items() if t == "shared"}, set(), "fedmix")
    params = dict(model.named_parameters())
    expected = {
        n for n in tags if expert_of(n) in (None, *selection) and (".heads." not in n or n.split(".")[3] in info.tasks)
    }
    assert set(up) == expected | {"meta.selection", "meta.gate_mass"}
    assert all(torch.equal(up[n], params[n]) for n in expected)
    assert up["meta.selection"].dtype == torch.int64 and up["meta.selection"].tolist() == sorted(selection)
    assert torch.equal(up["meta.gate_mass"], model.gate_mass)


def reply(client, n, tasks, payload):
    return Reply(ClientInfo(client, tasks, False, n), payload, n)


def test_aggregation_matches_a_hand_computation():
    method = create_method("fedmix", {"num_experts": 3, "experts_per_client": 2})
    t = torch.tensor
    a = {  # client 1: 10 examples, trained experts 0 and 1
        "gate.weight": t([1.0, 2.0]),
        "experts.0.adapter.up.bias": t([4.0]),
        "experts.1.adapter.up.bias": t([1.0]),
        "experts.1.heads.vqa.mlp.3.bias": t([2.0]),
        "meta.selection": t([0, 1]),
        "meta.gate_mass": t([0.5, 0.3, 0.2]),
    }
    b = {  # client 2: 30 examples, trained experts 1 and 2 (holds no vqa: no vqa head)
        "gate.weight": t([3.0, 0.0]),
        "experts.1.adapter.up.bias": t([5.0]),
        "experts.2.adapter.up.bias": t([7.0]),
        "meta.selection": t([1, 2]),
        "meta.gate_mass": t([0.1, 0.2, 0.7]),
    }
    c = {  # client 3: 20 examples, trained experts 1 and 2
        "gate.weight": t([0.0, 4.0]),
        "experts.1.adapter.up.bias": t([-1.0]),
        "experts.1.heads.vqa.mlp.3.bias": t([8.0]),
        "experts.2.adapter.up.bias": t([1.0]),
        "meta.selection": t([1, 2]),
        "meta.gate_mass": t([0.2, 0.4, 0.4]),
    }
    old = {
        "gate.weight": t([9.0, 9.0]),
        "experts.0.adapter.up.bias": t([9.0]),
        "experts.1.adapter.up.bias": t([9.0]),
        "experts.1.heads.vqa.mlp.3.bias": t([9.0]),
        "experts.2.adapter.up.bias": t([9.0]),
        "selection/7": t([0, 2]),
        "selection/1": t([1, 2]),
    }
    replies = [reply(1, 10, ("vqa",), a), reply(2, 30, ("grounding",), b), reply(3, 20, ("vqa",), c)]
    new = method.aggregate(old, replies)
    # gate: examples only, over every client
    assert torch.allclose(new["gate.weight"], (10 * t([1.0, 2.0]) + 30 * t([3.0, 0.0]) + 20 * t([0.0, 4.0])) / 60)
    # expert 0: trained by client 1 alone -> its tensor
    assert torch.allclose(new["experts.0.adapter.up.bias"], t([4.0]))
    # expert 1: weights examples x gate mass on expert 1 = 3, 6, 8
    assert torch.allclose(new["experts.1.adapter.up.bias"], t([(3 * 1.0 + 6 * 5.0 + 8 * -1.0) / 17]))
    # its vqa head: only the clients that carry it (1 and 3), weights 3 and 8
    assert torch.allclose(new["experts.1.heads.vqa.mlp.3.bias"], t([(3 * 2.0 + 8 * 8.0) / 11]))
    # expert 2: weights 30 x 0.7 = 21 and 20 x 0.4 = 8
    assert torch.allclose(new["experts.2.adapter.up.bias"], t([(21 * 7.0 + 8 * 1.0) / 29]))
    # selections: the replies' replace old entries; clients not sampled keep theirs
    assert new["selection/1"].tolist() == [0, 1]
    assert new["selection/2"].tolist() == [1, 2] and new["selection/3"].tolist() == [1, 2]
    assert new["selection/7"].tolist() == [0, 2]
    assert not any(k.startswith("meta.") for k in new)


def test_download_sends_the_gate_and_the_last_selected_experts():
    method = create_method("fedmix", {"num_experts": 3})
    t = torch.tensor
    state = {
        "gate.weight": t([1.0]),
        "experts.0.adapter.up.bias": t([0.0]),
        "experts.1.adapter.up.bias": t([1.0]),
        "experts.1.heads.vqa.mlp.3.bias": t([1.0]),
        "experts.1.heads.grounding.mlp.3.bias": t([1.0]),
        "experts.2.adapter.up.bias": t([2.0]),
        "selection/4": t([1, 2]),
    }
    seen = method.download(state, ClientInfo(4, ("vqa",), False, 5))
    assert set(seen) == {
        "gate.weight",
        "experts.1.adapter.up.bias",
        "experts.1.heads.vqa.mlp.3.bias",
        "experts.2.adapter.up.bias",
    }
    new = method.download(state, ClientInfo(5, ("vqa", "grounding"), False, 5))  # never seen: all experts
    assert set(new) == {k for k in state if not k.startswith("selection/")}


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="experts_per_client = 5"):
        create_method("fedmix", {"num_experts": 4, "experts_per_client": 5})
    with pytest.raises(ValueError, match="sparsity_weight"):
        create_method("fedmix", {"sparsity_weight": -1})


def test_smoke_run_records_expert_usage(tiny_prep, tmp_path):
    run = Run(tiny_prep, MethodEntry("fedmix"), tmp_path)
    records = read_jsonl(tmp_path / "runs" / run.execute() / "records.jsonl")
    usage = [r for r in records if r["kind"] == "usage"]
    assert usage and {r["expert"] for r in usage} == {"expert0", "expert1", "expert2", "expert3"}
    for task in {r["task"] for r in usage}:
        total = sum(r["value"] for r in usage if r["task"] == task and r["round"] == 1)
        assert total == pytest.approx(1.0, abs=1e-4)
    train = [r for r in records if r["kind"] == "train"]
    assert train and all(r["up_bytes"] < r["down_bytes"] for r in train if r["round"] == 0)  # m < K experts up
    assert any(r["kind"] == "run" and r["completed"] for r in records)
