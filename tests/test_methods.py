"""Contract tests parametrized over the registry: a method is tested the moment it registers."""

import inspect
import math

import pytest
import torch
from conftest import TINY

from fedbench.api.data import GLOBAL_CLIENT
from fedbench.api.method import count_params, create_method
from fedbench.api.payload import META, check_upload, serialize
from fedbench.api.registry import METHODS
from fedbench.backends.inprocess import in_process
from fedbench.config.protocol import MethodEntry
from fedbench.runtime.client import trainable_state
from fedbench.runtime.server import Run
from fedbench.utils.seeding import sample_clients

BYTES = ("up_bytes", "down_bytes", "up_bytes_analytic", "down_bytes_analytic")


@pytest.fixture(params=METHODS.names())
def built(request, tiny_prep, tmp_path):
    run = Run(tiny_prep, MethodEntry(request.param), tmp_path, backend=in_process)
    model = run.build()
    return run, model


def test_upload_holds_exactly_the_shared_tensors(built, tiny_prep):
    run, model = built
    tags = run.method.tags(model)
    assert tags, "a method must train something"
    shared = {n for n, t in tags.items() if t == "shared"}
    local = {n for n, t in tags.items() if t == "local"}
    info = tiny_prep.infos[0]
    up = run.method.upload(model, info)
    check_upload(up, shared, local, run.method.name)
    assert {k for k in up if not k.startswith(META)} <= shared and not set(up) & local
    down = run.method.download(run.method.init_server_state(model), info)
    assert set(down) <= shared, "the server only ever holds shared tensors"


def test_local_training_changes_only_trainable_tensors(built, tiny_prep, train_client):
    run, model = built
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = trainable_state(model)
    train_client(run, model, tiny_prep.infos[0], 0)
    after = trainable_state(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.equal(frozen_before[n], p) for n, p in model.named_parameters() if not p.requires_grad)


def test_fedavg_family_bytes_follow_what_is_shared(tiny_prep, tmp_path):
    sizes = {}
    for name in ("fedavg-lora", "ffa-lora", "fedsa-lora"):
        run = Run(tiny_prep, MethodEntry(name), tmp_path, backend=in_process)
        model = run.build()
        up = run.method.upload(model, tiny_prep.infos[0])
        sizes[name] = {k for k in up}, len(serialize(up))
    lora_a = {k for k in sizes["fedavg-lora"][0] if ".lora_A." in k}
    lora_b = {k for k in sizes["fedavg-lora"][0] if ".lora_B." in k}
    assert lora_a and lora_b
    assert sizes["ffa-lora"][0] == sizes["fedavg-lora"][0] - lora_a  # A frozen, never sent
    assert sizes["fedsa-lora"][0] == lora_a  # only A travels
    assert sizes["fedsa-lora"][1] < sizes["ffa-lora"][1] < sizes["fedavg-lora"][1]


def test_ffa_lora_a_is_identical_on_every_client(tiny_prep, tmp_path):
    run_a = Run(tiny_prep, MethodEntry("ffa-lora"), tmp_path, backend=in_process).build()
    run_b = Run(tiny_prep, MethodEntry("ffa-lora"), tmp_path / "b", backend=in_process).build()
    a = {n: p for n, p in run_a.named_parameters() if ".lora_A." in n}
    b = {n: p for n, p in run_b.named_parameters() if ".lora_A." in n}
    assert a and all(torch.equal(a[n], b[n]) and not a[n].requires_grad for n in a)


def test_bad_option_is_named():
    with pytest.raises(ValueError, match=r"unknown option 'rnk' for method 'fedavg-lora'\. Valid options: rank"):
        create_method("fedavg-lora", {"rnk": 4})
    with pytest.raises(ValueError, match="rank = 0 must be an integer >= 1"):
        create_method("fedavg-lora", {"rank": "0"})


def test_clients_exchange_only_the_heads_of_their_tasks(tiny_prep, tmp_path):
    run = Run(tiny_prep, MethodEntry("fedavg-lora"), tmp_path, backend=in_process)
    model = run.build()
    info = tiny_prep.infos[0]
    up = run.method.upload(model, info)
    heads = {k.split(".")[1] for k in up if k.startswith("heads.")}
    assert heads == set(info.tasks)
    down = run.method.download(run.method.init_server_state(model), info)
    assert {k.split(".")[1] for k in down if k.startswith("heads.")} == set(info.tasks)


@pytest.mark.parametrize("name", METHODS.names())
def test_description_states_paper_and_simplifications(name):
    """`fedbench describe` prints the class docstring: it must cite the paper and say where we simplify."""
    doc = inspect.getdoc(METHODS.get(name)) or ""
    assert "arxiv" in doc.lower(), f"{name}: docstring names no paper"
    assert "simplif" in doc.lower(), f"{name}: docstring states no simplification / harness choice"


@pytest.mark.parametrize("name", METHODS.names())
def test_every_registered_method_runs_two_rounds_end_to_end(name, tiny_run, tiny_prep):
    """Every method in the registry (a new one the moment it registers), default options, TINY's two
    rounds with an evaluation after each: complete records, one train record per sampled client and
    round, real message bytes exactly when something is shared, nothing local on the wire, scores in
    [0, 1], and expert-usage records exactly for a model that routes (``model.expert_names``)."""
    done = tiny_run(name)
    method, model = done.run.method, done.run.build()
    tags = method.tags(model)
    shared = {n for n, t in tags.items() if t == "shared"}
    local = {n for n, t in tags.items() if t == "local"}
    assert all(r["method"] == name and r["protocol_hash"] == TINY.hash and r["seed"] == 0 for r in done.records)

    (run,) = done.of("run")
    assert run["completed"] and run["rounds"] == 2 and run["federated"] == method.federated
    assert {k: run[k] for k in ("params_trainable", "params_shared", "params_local")} == count_params(model, tags)
    assert run["params_trainable"] > 0

    infos, train = tiny_prep.infos, done.of("train")
    if method.federated:
        fraction = TINY.clients.sample_fraction
        expected = [(r, c) for r in range(2) for c in sample_clients(0, r, len(infos), fraction)]
    else:  # one pooled trainer per round
        expected = [(r, GLOBAL_CLIENT) for r in range(2)]
    assert [(r["round"], r["client"]) for r in train] == expected
    assert all(r["n_examples"] > 0 and r["compute_s"] > 0 and not r.get("dropped") for r in train)
    if method.federated and shared:  # serialized messages: the tensors plus a safetensors header
        assert all(r["up_bytes"] > r["up_bytes_analytic"] > 0 for r in train)
        assert all(r["down_bytes"] > r["down_bytes_analytic"] > 0 for r in train)
    else:  # nothing shared, or not federated: nothing crosses the network
        assert all(r[k] == 0 for r in train for k in BYTES)

    runtime = done.runtime
    assert len(runtime.received) == (len(train) if method.federated else 0)
    for names in runtime.received:  # what came down: shared parameters (and message tensors) only
        assert all(n in shared or n.startswith(META) for n in names)
    for names in runtime.sent:
        assert not names & local, f"{name} sent local tensor(s) {sorted(names & local)[:3]}"
        assert all(n in shared or n.startswith(META) for n in names)

    evals = done.of("eval")
    assert {r["round"] for r in evals} == {0, 1}  # TINY evaluates after every round
    for rnd in (0, 1):
        at = [r for r in evals if r["round"] == rnd]
        own = {(r["client"], r["task"]) for r in at if r["scope"] == "client"}
        assert own == {(i.client, t) for i in infos for t in i.tasks}
        on_global = {(r["client"], r["task"]) for r in at if r["scope"] == "client_global"}
        assert on_global == {(i.client, t) for i in infos for t in TINY.tasks}
        assert {r["task"] for r in at if r["scope"] == "global"} == {t for i in infos for t in i.tasks}
    assert all(r["n"] > 0 and 0.0 <= r["value"] <= 1.0 for r in evals)
    assert all(0.0 <= v <= 1.0 for r in evals if r["scope"] == "global" for v in r["per_example"])
    assert sorted(r["task"] for r in done.of("majority")) == sorted(TINY.tasks)
    assert all(0.0 <= r["value"] <= 1.0 for r in done.of("majority"))

    usage, routing = done.of("usage"), done.of("routing")
    if not model.expert_names:
        assert not usage and not routing, f"{name} records usage without expert_names"
        return
    assert {r["round"] for r in usage} >= {1}, f"{name} has experts but its last round recorded no routing"
    for rnd, task in {(r["round"], r["task"]) for r in usage}:
        row = [r for r in usage if (r["round"], r["task"]) == (rnd, task)]
        assert [r["expert"] for r in row] == model.expert_names
        # weights per row sum to 1 (FedDPA's [α, 1 - α] may leave [0, 1]: α is a scaled cosine)
        assert sum(r["value"] for r in row) == pytest.approx(1.0, abs=1e-4)
    assert routing and {r["round"] for r in routing} == {r["round"] for r in usage}
    assert all(r["entropy"] <= math.log(len(model.expert_names)) + 1e-6 for r in routing)
    assert all(math.isfinite(r["entropy"]) and math.isfinite(r["mutual_info"]) for r in routing)
