"""FedMix (methods/fedmix.py): mixture output, top-m selection, upload/download, aggregation, smoke run."""

import math
from dataclasses import replace

import pytest
import torch

from fedbench.api.data import GLOBAL_TEST
from fedbench.api.method import ClientInfo, Reply, create_method
from fedbench.api.payload import check_upload, serialize
from fedbench.backends.inprocess import in_process
from fedbench.config.protocol import ClientsConfig, MethodEntry
from fedbench.runtime import client as client_step
from fedbench.runtime.client import trainable_state
from fedbench.runtime.server import Federation, Run
from fedbench.runtime.training import TrainingContext, client_context


def expert_of(name):
    return int(name.split(".")[1]) if name.startswith("experts.") else None


def test_every_trainable_tensor_is_a_gate_or_expert_tensor(tiny_prep, tmp_path):
    run = Run(tiny_prep, MethodEntry("fedmix"), tmp_path, backend=in_process)
    model = run.build()
    tags = run.method.tags(model)
    assert set(tags.values()) == {"shared"}
    assert all(n.startswith(("gate.", "experts.", "trunk.")) for n in tags)  # model.heads frozen, unused
    assert any(n.startswith("trunk.") for n in tags)  # one answer trunk, shared by every expert
    assert {expert_of(n) for n in tags} == {None, 0, 1, 2, 3}
    assert model.expert_names == ["expert0", "expert1", "expert2", "expert3"]


def test_output_is_the_gate_weighted_mixture(tiny_prep, tmp_path):
    run = Run(tiny_prep, MethodEntry("fedmix", {"num_experts": 3}), tmp_path, backend=in_process)
    model = run.build()
    with torch.no_grad():  # make experts differ (up projections start at zero)
        for e in model.experts:
            e.adapter.up.weight.normal_(0, 0.1)
    ctx = client_context(run.prep, tiny_prep.infos[0], 0)
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
                per_expert.append(e.heads[name](model.trunk(replace(sub, tokens=tokens))))
        if model.is_box[name]:
            expected = sum(g[idx, k, None] * o for k, o in enumerate(per_expert))
            assert torch.allclose(out, expected, atol=1e-6)
        else:
            expected = sum(g[idx, k, None] * o.softmax(-1) for k, o in enumerate(per_expert)).log()
            assert torch.allclose(out, expected, atol=1e-5)
            assert torch.allclose(out.exp().sum(-1), torch.ones(len(idx)), atol=1e-5)


def test_local_update_trains_and_uploads_only_the_top_m_experts(tiny_prep, tmp_path, train_client):
    run = Run(tiny_prep, MethodEntry("fedmix"), tmp_path, backend=in_process)
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
    assert set(up) == expected | {"meta.gate_mass"}  # the selection went up in the request
    assert all(torch.equal(up[n], params[n]) for n in expected)
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
        "meta.gate_mass": t([0.5, 0.3, 0.2]),
    }
    b = {  # client 2: 30 examples, trained experts 1 and 2 (holds no vqa: no vqa head)
        "gate.weight": t([3.0, 0.0]),
        "experts.1.adapter.up.bias": t([5.0]),
        "experts.2.adapter.up.bias": t([7.0]),
        "meta.gate_mass": t([0.1, 0.2, 0.7]),
    }
    c = {  # client 3: 20 examples, trained experts 1 and 2
        "gate.weight": t([0.0, 4.0]),
        "experts.1.adapter.up.bias": t([-1.0]),
        "experts.1.heads.vqa.mlp.3.bias": t([8.0]),
        "experts.2.adapter.up.bias": t([1.0]),
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
    # selections (the experts each reply carries) replace old entries; clients not sampled keep theirs
    assert new["selection/1"].tolist() == [0, 1]
    assert new["selection/2"].tolist() == [1, 2] and new["selection/3"].tolist() == [1, 2]
    assert new["selection/7"].tolist() == [0, 2]
    assert not any(k.startswith("meta.") for k in new)


def test_download_is_the_gate_then_the_requested_experts():
    """Replaces a test of the old single download (the gate + the experts of the client's previous
    selection, all K for a new client), which encoded the bug."""
    method = create_method("fedmix", {"num_experts": 3})
    t = torch.tensor
    state = {
        "gate.weight": t([1.0]),
        "trunk.mlp.0.bias": t([3.0]),
        "experts.0.adapter.up.bias": t([0.0]),
        "experts.1.adapter.up.bias": t([1.0]),
        "experts.1.heads.vqa.mlp.3.bias": t([1.0]),
        "experts.1.heads.grounding.mlp.3.bias": t([1.0]),
        "experts.2.adapter.up.bias": t([2.0]),
        "selection/4": t([0, 1]),  # the previous round's selection plays no part
    }
    client = ClientInfo(4, ("vqa",), False, 5)
    assert set(method.download(state, client)) == {"gate.weight", "trunk.mlp.0.bias"}  # first: no expert
    got = method.answer(state, client, {"meta.selection": t([1, 2])})
    assert set(got) == {"experts.1.adapter.up.bias", "experts.1.heads.vqa.mlp.3.bias", "experts.2.adapter.up.bias"}
    assert all(torch.equal(got[n], state[n]) for n in got)  # the server's current copies
    everyone = ClientInfo(4, ("vqa", "grounding"), False, 5)  # evaluation asks for every task's heads
    assert set(method.answer(state, everyone, {"meta.selection": t([0, 1])})) == {
        "experts.0.adapter.up.bias",
        "experts.1.adapter.up.bias",
        "experts.1.heads.vqa.mlp.3.bias",
        "experts.1.heads.grounding.mlp.3.bias",
    }
    for bad in ({}, {"meta.selection": t([1])}, {"meta.selection": t([1, 1])}, {"meta.selection": t([1, 3])}):
        with pytest.raises(ValueError, match=r"a request names 2 distinct experts of 0\.\.2"):
            method.answer(state, client, bad)


def crafted_federation(run, model):
    """Server: random experts and a gate that ignores its input, so every row's gate mass is
    softmax([0, 0, ln 3, ln 6]) = [1, 1, 3, 6] / 11 (top-2: experts 2 and 3), while the previous
    round's selection says 0 and 1. Every client's stored state: stale copies (server + 1) and a
    gate that would pick 0 and 1."""
    gen = torch.Generator().manual_seed(0)
    server = {n: t + 0.1 * torch.randn(t.shape, generator=gen) for n, t in run.method.init_server_state(model).items()}
    server["gate.weight"] = torch.zeros_like(server["gate.weight"])
    server["gate.bias"] = torch.tensor([0.0, 0.0, math.log(3), math.log(6)])
    stale = {n: t + 1.0 for n, t in server.items()}
    stale["gate.bias"] = torch.tensor([math.log(6), math.log(3), 0.0, 0.0])
    infos = run.prep.infos
    shared = set(server)
    server.update({f"selection/{i.client}": torch.tensor([0, 1]) for i in infos})
    run.backend.restore({i.client: dict(stale) for i in infos})
    return Federation(server, trainable_state(model), infos, shared, set())


def held(info, name):
    return ".heads." not in name or name.split(".")[3] in info.tasks


def test_a_round_selects_with_the_current_gate_then_trains_the_servers_copies(tiny_prep, tmp_path, monkeypatch):
    prep = replace(tiny_prep, protocol=tiny_prep.protocol.replace(clients=ClientsConfig(sample_fraction=1.0)))
    run = Run(prep, MethodEntry("fedmix"), tmp_path, backend=in_process)
    model = run.build()
    fed = crafted_federation(run, model)
    states = run.backend.runtime.states
    server, stale = dict(fed.server), dict(states[0])
    at_start = {}
    train = TrainingContext.train

    def spy(ctx, model, params, phase="train"):  # the model as local training starts
        names = {id(p): n for n, p in model.named_parameters()}
        state = {n: p.detach().clone() for n, p in model.named_parameters() if n in stale}
        at_start[ctx.info.client] = state, {names[id(p)] for p in params}
        return train(ctx, model, params, phase)

    monkeypatch.setattr(TrainingContext, "train", spy)
    rows = run._round(0, model, fed)
    assert [r["client"] for r in rows] == [0, 1, 2]
    first = {n: t for n, t in server.items() if expert_of(n) is None and n in stale}  # the gate (+ the trunk)
    assert {"gate.weight", "gate.bias"} <= set(first)
    request = {"meta.selection": torch.tensor([2, 3])}
    for row, info in zip(rows, prep.infos, strict=True):
        c = info.client
        second = {n: t for n, t in server.items() if expert_of(n) in (2, 3) and held(info, n)}
        assert row["request"] == {"meta.selection": [2, 3]}  # from the current gate, not the stored one
        assert row["down_bytes"] == len(serialize(first)) + len(serialize(second))
        state, trained = at_start[c]
        assert all(torch.equal(state[n], server[n]) for n in (*first, *second))  # not the stale copies
        assert all(torch.equal(state[n], stale[n]) for n in state if expert_of(n) in (0, 1))  # not sent
        assert trained == {n for n in stale if expert_of(n) in (None, 2, 3)}
        sent_up = {n for n in stale if expert_of(n) in (None, 2, 3) and held(info, n)}
        assert all(not torch.equal(states[c][n], server[n]) for n in sent_up if n.endswith("adapter.up.weight"))
        upload = {**{n: states[c][n] for n in sent_up}, "meta.gate_mass": torch.zeros(4)}
        assert row["up_bytes"] == len(serialize(request)) + len(serialize(upload))
        assert fed.server[f"selection/{c}"].tolist() == [2, 3]
    # the server: gate (and trunk) by examples over all; expert k by examples x gate mass on k over
    # the clients that trained it (mass 3/11 on expert 2, 6/11 on 3 for every client here)
    mass = {None: 1.0, 2: 3 / 11, 3: 6 / 11}
    for name in stale:
        k = expert_of(name)
        if k in (0, 1):  # trained by nobody: the server's copy, no stale copy averaged in
            assert torch.equal(fed.server[name], server[name])
            continue
        trainers = [i for i in prep.infos if held(i, name)]
        w = [i.num_examples * mass[k] for i in trainers]
        expected = sum(wi * states[i.client][name] for wi, i in zip(w, trainers, strict=True)) / sum(w)
        assert torch.allclose(fed.server[name], expected, atol=1e-6), name


def test_evaluation_runs_the_same_exchange(tiny_prep, tmp_path, monkeypatch):
    """A client is evaluated with the final gate, the experts it selects with it (the server's copies,
    every task's heads) and its own stored copies of the others."""
    run = Run(tiny_prep, MethodEntry("fedmix"), tmp_path, backend=in_process)
    model = run.build()
    fed = crafted_federation(run, model)
    server, stale = dict(fed.server), dict(run.backend.runtime.states[0])
    seen = {}
    evaluate_rows = client_step.evaluate_rows

    def spy(model, method, ctx, rows, batch_size):
        seen.setdefault(ctx.info.client, {n: p.detach().clone() for n, p in model.named_parameters() if n in stale})
        assert model.selection.tolist() == [2, 3]
        return evaluate_rows(model, method, ctx, rows, batch_size)

    monkeypatch.setattr(client_step, "evaluate_rows", spy)
    run._evaluate(0, model, fed)
    assert sorted(seen) == [i.client for i in tiny_prep.infos]
    for state in seen.values():
        for n, t in state.items():
            assert torch.equal(t, stale[n] if expert_of(n) in (0, 1) else server[n]), n


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="experts_per_client = 5"):
        create_method("fedmix", {"num_experts": 4, "experts_per_client": 5})
    with pytest.raises(ValueError, match="sparsity_weight"):
        create_method("fedmix", {"sparsity_weight": -1})


def test_a_client_sends_up_what_came_down_plus_its_request_and_gate_mass(tiny_run):
    """The rounds of the shared TINY run (checked like every method's in test_methods): what came down
    (the gate, then the m selected experts) goes back up, plus the request (m int64) and the gate mass
    (K float32); this replaces "up < down in round 0", which encoded the bug."""
    done = tiny_run("fedmix")
    train = done.of("train")
    assert train and all(r["up_bytes_analytic"] == r["down_bytes_analytic"] + 2 * 8 + 4 * 4 for r in train)
    assert all(len(set(r["request"]["meta.selection"])) == 2 for r in train)  # each round's selection
    assert {r["expert"] for r in done.of("usage")} == {"expert0", "expert1", "expert2", "expert3"}
