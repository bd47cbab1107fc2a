"""pilot-ctmoa (methods/pilot_ctmoa.py, fedbench/adapters/task_experts.py): tags, payloads, task-wise and
distance-weighted aggregation, per-client stages, reference routing, local training, end-to-end smoke run."""

import dataclasses

import numpy as np
import pytest
import torch

from fedbench.adapters.moa import load_balance_loss, mixture, route
from fedbench.adapters.task_experts import STAGE1, STAGE2, client_key, stage_of
from fedbench.api.method import ClientInfo, Reply, create_method
from fedbench.api.options import OptionError
from fedbench.api.payload import check_upload, serialize
from fedbench.backends.inprocess import in_process
from fedbench.config.protocol import MethodEntry
from fedbench.runtime.client import trainable_state
from fedbench.runtime.server import Run
from fedbench.runtime.training import client_context
from fedbench.utils.records import read_jsonl

t = torch.tensor
ALL = ("classification", "vqa", "grounding", "ocr_vqa")


def _split(run, model):
    tags = run.method.tags(model)
    return {n for n, g in tags.items() if g == "shared"}, {n for n, g in tags.items() if g == "local"}


def _features(run, model, info, n=6):
    """``n`` training rows of ``info``, half from each end (so both of its tasks appear)."""
    ctx = client_context(run.prep, info, 0)
    rows = np.concatenate([ctx.train_rows[: n // 2], ctx.train_rows[-(n - n // 2) :]])
    batch, cached = ctx.inputs(model, rows)
    assert len(set(batch.task.tolist())) == 2
    return model.encode(batch, cached)


def _perturb(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("up.weight"):
                p.normal_(0, 0.1)


def test_tags_and_upload_hold_exactly_the_clients_shared_tensors(tiny_prep, tmp_path, train_client):
    run = Run(tiny_prep, MethodEntry("pilot-ctmoa"), tmp_path, backend=in_process)
    model = run.build()
    shared, local = _split(run, model)
    assert {n.split(".")[0] for n in shared} == {"task_adapters", "heads", "trunk"}
    assert {n.split(".")[0] for n in local} == {"client_adapter", "router", "aoa"}
    assert model.router.image.bias is None and model.router.image.out_features == len(ALL)
    info = tiny_prep.infos[0]
    train_client(run, model, info, 0)
    up = run.method.upload(model, info)
    check_upload(up, shared, local, "pilot-ctmoa")
    # own tasks' adapters and outputs, and the answer trunk every task uses
    expected = {n for n in shared if n.startswith("trunk.") or n.split(".")[1] in info.tasks}
    assert set(up) == expected
    params = dict(model.named_parameters())
    assert all(torch.equal(up[n], params[n]) for n in up)


def test_share_router_uploads_router_and_the_trained_adapters_on_adapters(tiny_prep, tmp_path):
    run = Run(tiny_prep, MethodEntry("pilot-ctmoa", {"share_router": True}), tmp_path, backend=in_process)
    model = run.build()
    shared, local = _split(run, model)
    assert {n.split(".")[0] for n in local} == {"client_adapter"}
    info = tiny_prep.infos[1]
    model.bind(STAGE1, info.tasks, False)  # stage 1 trains neither: nothing of them goes up
    assert not any(n.startswith(("router.", "aoa.")) for n in run.method.upload(model, info))
    model.bind(STAGE2, info.tasks, False)
    up = run.method.upload(model, info)
    check_upload(up, shared, local, "pilot-ctmoa")
    assert {n for n in up if n.startswith("router.")} == {"router.image.weight"}
    assert {n.split(".")[1] for n in up if n.startswith("aoa.")} == set(ALL) - set(info.tasks)
    down = run.method.download(run.method.init_server_state(model), info)
    assert {n.split(".")[1] for n in down if n.startswith("aoa.")} == set(ALL)


def test_download_carries_all_task_adapters_and_counts_their_bytes(tiny_prep, tmp_path):
    run = Run(tiny_prep, MethodEntry("pilot-ctmoa"), tmp_path, backend=in_process)
    model = run.build()
    shared, _ = _split(run, model)
    state = run.method.init_server_state(model)
    info = tiny_prep.infos[0]
    down = run.method.download(state, info)
    adapters = {n for n in shared if n.startswith("task_adapters.")}
    assert {n.split(".")[1] for n in adapters} == set(ALL)
    assert adapters <= set(down)  # download ⊇ all T task adapters
    assert {n.split(".")[1] for n in down if n.startswith("heads.")} == set(info.tasks)
    assert set(down) <= shared
    foreign = {n: down[n] for n in adapters if n.split(".")[1] not in info.tasks}
    assert foreign
    without = {n: v for n, v in down.items() if n not in foreign}
    assert len(serialize(down)) - len(serialize(without)) >= sum(v.numel() * 4 for v in foreign.values())


def test_task_adapters_are_averaged_within_their_task():
    method = create_method("pilot-ctmoa")
    a, b, c = "task_adapters.classification.up.bias", "task_adapters.vqa.up.bias", "task_adapters.grounding.up.bias"
    replies = [
        Reply(ClientInfo(0, ("classification", "vqa"), False, 1), {a: t([2.0, 4.0]), b: t([1.0])}, 1),
        Reply(ClientInfo(1, ("vqa", "grounding"), True, 3), {b: t([5.0]), c: t([-1.0, 7.0])}, 3),
    ]
    state = {a: t([9.0, 9.0]), b: t([9.0]), c: t([9.0, 9.0]), "task_adapters.ocr_vqa.up.bias": t([8.0])}
    new = method.aggregate(state, replies)
    assert torch.allclose(new[b], t([(1 * 1.0 + 3 * 5.0) / 4]))  # both clients hold vqa
    assert torch.equal(new[a], t([2.0, 4.0]))  # only the first holds classification
    assert torch.equal(new[c], t([-1.0, 7.0]))
    assert torch.equal(new["task_adapters.ocr_vqa.up.bias"], t([8.0]))  # nobody held it: kept


@pytest.mark.parametrize(
    ("nearest", "expected"),
    [
        # values 0, 1, 3 (examples 1, 1, 2): d01 = 1, d02 = 3, d12 = 2
        # nearest 1: c0 <- c1: (1·0 + 1·1)/2; c1 <- c0: (1·1 + 1·0)/2; c2 <- c1: (2·3 + 1·1)/3
        (1, (0.5, 0.5, 7 / 3)),
        # nearest 2: c0: neighbours (1·1 + 1/3·3)/(4/3) = 1.5, n = 3 -> (0 + 3·1.5)/4
        #            c1: (1·0 + 1/2·3)/(3/2) = 1.0 -> (1 + 3·1)/4; c2: (1/2·1 + 1/3·0)/(5/6) = 0.6 -> (2·3 + 2·0.6)/4
        (2, (1.125, 1.0, 1.8)),
    ],
)
def test_heads_get_per_client_distance_weighted_aggregates(nearest, expected):
    method = create_method("pilot-ctmoa", {"nearest": nearest})
    h, other = "heads.vqa.mlp.3.bias", "heads.grounding.mlp.3.bias"
    values, examples = (0.0, 1.0, 3.0), (1, 1, 2)
    replies = [
        Reply(ClientInfo(c, ("vqa", "grounding"), False, n), {h: t([v, 0.0]), other: t([float(c)])}, n)
        for c, (v, n) in enumerate(zip(values, examples, strict=True))
    ]
    state = {h: t([9.0, 9.0]), other: t([9.0])}
    new = method.aggregate(state, replies)
    for c, e in enumerate(expected):
        assert torch.allclose(new[client_key(c, h)], t([e, 0.0]), atol=1e-6)
    assert torch.allclose(new[h], t([(0 + 1 + 6) / 4, 0.0]))  # plain example-weighted mean
    # the download gives each client its own aggregate, the plain mean to a client never seen
    assert torch.allclose(method.download(new, replies[2].client)[h], t([expected[2], 0.0]), atol=1e-6)
    stranger = ClientInfo(7, ("vqa",), False, 5)
    assert torch.equal(method.download(new, stranger)[h], new[h])
    assert not any("/" in n for n in method.download(new, stranger))
    # at evaluation (all tasks asked): own aggregate for held heads, plain mean for the others
    asking_all = ClientInfo(0, ALL, False, 1)
    state_with_cls = {**new, "heads.classification.mlp.3.bias": t([3.0])}
    down = method.download(state_with_cls, asking_all)
    assert torch.allclose(down[h], t([expected[0], 0.0]), atol=1e-6)
    assert torch.equal(down["heads.classification.mlp.3.bias"], t([3.0]))


def test_trunk_gets_per_client_distance_weighted_aggregates_across_all_clients():
    """With the shared answer trunk, Pilot's rule runs on the trunk over every replying client
    (whatever its tasks), and the thin task outputs get only the plain mean over their holders."""
    method = create_method("pilot-ctmoa", {"nearest": 1})
    tr, out = "trunk.mlp.1.bias", "heads.vqa.logits.bias"
    # trunk values 0, 1, 3 (examples 1, 1, 2); clients hold disjoint tasks except vqa on 0 and 2
    replies = [
        Reply(ClientInfo(0, ("vqa",), False, 1), {tr: t([0.0]), out: t([2.0])}, 1),
        Reply(ClientInfo(1, ("grounding",), False, 1), {tr: t([1.0])}, 1),
        Reply(ClientInfo(2, ("vqa",), False, 2), {tr: t([3.0]), out: t([4.0])}, 2),
    ]
    new = method.aggregate({}, replies)
    # nearest 1: c0 <- c1 (d=1): (1·0 + 1·1)/2; c1 <- c0 (d=1 < 2): (1·1 + 1·0)/2; c2 <- c1 (d=2): (2·3 + 1·1)/3
    for c, e in enumerate((0.5, 0.5, 7 / 3)):
        assert torch.allclose(new[client_key(c, tr)], t([e]), atol=1e-6)
    assert torch.allclose(new[tr], t([(0 + 1 + 6) / 4]))
    assert torch.allclose(new[out], t([(2.0 + 2 * 4.0) / 3]))  # plain mean over the vqa holders
    assert not any(k.startswith("client") and "heads." in k for k in new)
    assert torch.allclose(method.download(new, replies[1].client)[tr], t([0.5]), atol=1e-6)


def test_distance_weighted_groups_clients_by_task():
    """With per-task heads (no trunk), a client's head of task t is mixed only with the other holders of t."""
    method = create_method("pilot-ctmoa", {"nearest": 3})
    h = "heads.vqa.mlp.3.bias"
    replies = [
        Reply(ClientInfo(0, ("vqa",), False, 1), {h: t([0.0])}, 1),
        Reply(ClientInfo(1, ("grounding",), False, 1), {"heads.grounding.mlp.3.bias": t([5.0])}, 1),
        Reply(ClientInfo(2, ("vqa",), False, 1), {h: t([2.0])}, 1),
    ]
    new = method.aggregate({}, replies)
    assert torch.allclose(new[client_key(0, h)], t([1.0])) and torch.allclose(new[client_key(2, h)], t([1.0]))
    assert torch.equal(new[client_key(1, "heads.grounding.mlp.3.bias")], t([5.0]))  # alone: its own
    assert client_key(1, h) not in new


def test_stage_is_per_client_from_its_participations(tiny_prep, tmp_path):
    assert [stage_of(p, 1) for p in range(3)] == [STAGE1, STAGE2, STAGE2]
    assert [stage_of(p, 2) for p in range(3)] == [STAGE1, STAGE1, STAGE2]
    assert stage_of(0, 0) == STAGE2  # no stage 1 at all
    # TINY samples clients [0, 1] in rounds 0 and 1, [0, 2] in round 2 (seed 0, 3 clients, fraction 0.5)
    run = Run(tiny_prep, MethodEntry("pilot-ctmoa"), tmp_path, backend=in_process)
    c0, _, c2 = tiny_prep.infos
    assert [client_context(run.prep, c0, r).participations for r in range(4)] == [0, 1, 2, 3]
    assert [client_context(run.prep, c2, r).participations for r in range(4)] == [0, 0, 0, 1]
    # at evaluation after round r, the state holds round r's update too
    assert [client_context(run.prep, c0, r, evaluating=True).participations for r in range(3)] == [1, 2, 3]
    assert [client_context(run.prep, c2, r, evaluating=True).participations for r in range(3)] == [0, 0, 1]
    assert [run.method.stage(client_context(run.prep, c2, r)) for r in range(4)] == [STAGE1, STAGE1, STAGE1, STAGE2]
    assert run.method.stage(client_context(run.prep, c0, 0, evaluating=True)) == STAGE2  # evaluated as it trains next
    assert run.method.stage(client_context(run.prep, c2, 1, evaluating=True)) == STAGE1  # never trained: stage 1
    with pytest.raises(ValueError, match="stage1_participations"):
        create_method("pilot-ctmoa", {"stage1_participations": -1})
    with pytest.raises(ValueError, match="stage1_rounds"):  # the old round-fraction schedule is gone
        create_method("pilot-ctmoa", {"stage1_rounds": 1})
    with pytest.raises(ValueError, match="nearest"):
        create_method("pilot-ctmoa", {"nearest": 0})
    with pytest.raises(ValueError, match="routing"):
        create_method("pilot-ctmoa", {"routing": "random"})


def test_train_records_carry_each_clients_stage(tiny_prep, tmp_path):
    """Client 2 is first sampled in round 2: it runs stage 1 there while client 0 runs stage 2."""
    prep = dataclasses.replace(tiny_prep, protocol=tiny_prep.protocol.replace(rounds=3))
    run = Run(prep, MethodEntry("pilot-ctmoa"), tmp_path, backend=in_process)
    run.execute()
    records = read_jsonl(tmp_path / "runs" / run.run_id / "records.jsonl")
    stages = {(r["round"], r["client"]): r["stage"] for r in records if r["kind"] == "train"}
    assert stages == {(0, 0): 1, (0, 1): 1, (1, 0): 2, (1, 1): 2, (2, 0): 2, (2, 2): 1}
    two = Run(prep, MethodEntry("pilot-ctmoa", {"stage1_participations": 2}), tmp_path / "two", backend=in_process)
    two.execute()
    records = read_jsonl(tmp_path / "two" / "runs" / two.run_id / "records.jsonl")
    stages = {(r["round"], r["client"]): r["stage"] for r in records if r["kind"] == "train"}
    assert stages == {(0, 0): 1, (0, 1): 1, (1, 0): 1, (1, 1): 1, (2, 0): 2, (2, 2): 1}


def _bound(prep, tmp_path, stage):
    """A perturbed pilot-ctmoa model bound to client 0 in ``stage``, with that client's features."""
    run = Run(prep, MethodEntry("pilot-ctmoa"), tmp_path, backend=in_process)
    model = run.build()
    _perturb(model)
    info = prep.infos[0]
    f = _features(run, model, info)
    model.bind(stage, info.tasks, True)
    return model, info, f


def test_stage1_is_task_plus_client_adapter_with_orthogonality(tiny_prep, tmp_path):
    model, _, f = _bound(tiny_prep, tmp_path, STAGE1)
    with torch.no_grad():
        out = model.adapt(f)
        task = torch.stack(
            [model.task_adapters[model.task_names[i]](x) for i, x in zip(f.task_id, f.tokens, strict=True)]
        )
        client = model.client_adapter(f.tokens)
        orth = (
            (torch.nn.functional.normalize(task, dim=-1) * torch.nn.functional.normalize(client, dim=-1))
            .sum(-1)
            .pow(2)
            .mean()
        )
    assert model.routing is None
    assert torch.allclose(out.tokens, f.tokens + task + client, atol=1e-5)
    assert torch.allclose(model.extra_loss(), 0.1 * orth)


def test_stage2_routes_tokens_over_the_task_experts(tiny_prep, tmp_path):
    model, info, f = _bound(tiny_prep, tmp_path, STAGE2)
    with torch.no_grad():
        out = model.adapt(f)
        x = f.tokens
        w = model.router.image(x).softmax(-1)  # [B, L, T]
        mix = 0
        for i, name in enumerate(model.task_names):
            e = model.task_adapters[name](x)
            if name not in info.tasks:
                e = e + model.aoa[name](e)
            mix = mix + w[..., i, None] * e
    assert torch.allclose(out.tokens, x + mix + model.client_adapter(x), atol=1e-5)
    assert model.routing.shape == (6, len(ALL)) and torch.allclose(model.routing, w.mean(1))
    assert model.expert_names == list(ALL)
    top = create_method("pilot-ctmoa", {"top_k": 2})
    assert top.options.top_k == 2


@pytest.mark.parametrize("name", ["pilot-ctmoa", "mmrouter-moa"])
def test_top_1_routing_is_refused_because_the_router_would_learn_nothing(name):
    """With one expert kept its renormalised weight is the constant 1: no gradient reaches the router
    from the mixture nor the load balance (``fedbench.adapters.moa``), so ``top_k = 1`` (shared by both
    task-expert methods) is refused when the options are built, naming the value and the valid range."""
    logits = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    experts = [torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for k in (1, 2):
        w = route(logits, k)
        (grad,) = torch.autograd.grad(mixture(experts, w).pow(2).sum() + load_balance_loss(w), logits)
        assert (grad.abs().max() < 1e-4) == (k == 1), k
    with pytest.raises(OptionError) as info:
        create_method(name, {"top_k": "1"})
    assert str(info.value) == (
        f"method '{name}': top_k = 1 is invalid: expected 0 (dense routing) or an integer >= 2 "
        "(top-1 renormalises the one kept weight to 1: the router would get no gradient from the loss)"
    )
    assert [create_method(name, {"top_k": k}).options.top_k for k in (0, 2, 3)] == [0, 2, 3]


def test_stage2_trains_own_experts_aoas_router_and_freezes_the_rest(tiny_prep, tmp_path, train_client):
    run = Run(tiny_prep, MethodEntry("pilot-ctmoa"), tmp_path, backend=in_process)
    model = run.build()
    _perturb(model)
    info = tiny_prep.infos[0]
    before = trainable_state(model)
    train_client(run, model, info, 1)  # client 0's second participation: stage 2
    after = trainable_state(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    for name in before:
        parts = name.split(".")
        if parts[0] in ("client_adapter",) or (parts[0] in ("task_adapters", "heads") and parts[1] not in info.tasks):
            assert name not in changed, name
        if parts[0] == "aoa" and parts[1] in info.tasks:
            assert name not in changed, name
    assert "router.image.weight" in changed
    assert any(n.startswith(f"aoa.{t}.") for t in set(ALL) - set(info.tasks) for n in changed)
    assert any(n.startswith(f"task_adapters.{t}.") for t in info.tasks for n in changed)
    assert all(p.requires_grad for n, p in model.named_parameters() if n in before)  # restored
    # stage 1 (its first participation) trains the client adapter and not the router
    before = trainable_state(model)
    train_client(run, model, info, 0)
    changed = {n for n in before if not torch.equal(before[n], trainable_state(model)[n])}
    assert any(n.startswith("client_adapter.") for n in changed)
    assert not any(n.startswith(("router.", "aoa.")) for n in changed)


def test_stage2_clients_route_and_receive_every_task_adapter(tiny_run):
    """The shared TINY run (checked like every method's in test_methods)."""
    done = tiny_run("pilot-ctmoa")
    usage = done.of("usage")
    # clients 0 and 1 train in rounds 0 (stage 1) and 1 (stage 2) and are evaluated in stage 2 after
    # either; client 2 is never sampled, so it is evaluated in stage 1 and routes nowhere
    assert usage and {r["round"] for r in usage} == {0, 1}
    assert {r["client"] for r in done.of("routing")} == {0, 1}
    assert {r["expert"] for r in usage} == set(ALL)
    train = done.of("train")
    assert train and all(r["down_bytes"] > r["up_bytes"] for r in train)  # foreign adapters come down
    (run_row,) = done.of("run")
    assert run_row["params_local"] > 0 and run_row["params_shared"] > 0
    assert run_row["options"]["stage1_participations"] == 1
    assert {(r["round"], r["stage"]) for r in train} == {(0, 1), (1, 2)}
