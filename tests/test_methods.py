"""Contract tests parametrized over the registry: a method is tested the moment it registers."""

import inspect

import pytest
import torch

from fedbench.client import trainable_state
from fedbench.method import create_method
from fedbench.payload import META, check_upload, serialize
from fedbench.protocol import MethodEntry
from fedbench.registry import METHODS
from fedbench.server import Run


@pytest.fixture(params=METHODS.names())
def built(request, tiny_prep, tmp_path):
    run = Run(tiny_prep, MethodEntry(request.param), tmp_path)
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
        run = Run(tiny_prep, MethodEntry(name), tmp_path)
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
    run_a = Run(tiny_prep, MethodEntry("ffa-lora"), tmp_path).build()
    run_b = Run(tiny_prep, MethodEntry("ffa-lora"), tmp_path / "b").build()
    a = {n: p for n, p in run_a.named_parameters() if ".lora_A." in n}
    b = {n: p for n, p in run_b.named_parameters() if ".lora_A." in n}
    assert a and all(torch.equal(a[n], b[n]) and not a[n].requires_grad for n in a)


def test_bad_option_is_named():
    with pytest.raises(ValueError, match=r"unknown option 'rnk' for method 'fedavg-lora'\. Valid options: rank"):
        create_method("fedavg-lora", {"rnk": 4})
    with pytest.raises(ValueError, match="rank = 0 must be >= 1"):
        create_method("fedavg-lora", {"rank": "0"})


def test_clients_exchange_only_the_heads_of_their_tasks(tiny_prep, tmp_path):
    run = Run(tiny_prep, MethodEntry("fedavg-lora"), tmp_path)
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
