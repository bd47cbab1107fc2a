"""The one-factor ablation ladder of mmrouter-moa (docs/methods.md §6) and the reference routings of both
task-expert methods: each row's options as a preset TOML carries them, (b) bit-identical to
``pilot-ctmoa`` end to end, and ``routing = oracle | uniform`` with hand-computed weights."""

import dataclasses
import itertools
import math

import pytest
import tomllib
import torch

from fedbench.adapters.task_experts import STAGE2
from fedbench.api.method import create_method
from fedbench.backends.inprocess import in_process
from fedbench.config.protocol import MethodEntry
from fedbench.config.toml_file import from_dict
from fedbench.runtime.server import Run
from fedbench.runtime.training import client_context
from fedbench.utils.records import read_jsonl

ALL = ("classification", "vqa", "grounding", "ocr_vqa")

# the ladder (a)-(g) and the two bounds, exactly as a preset lists them
LADDER_TOML = """
methods = [
    "pilot-ctmoa",
    { name = "mmrouter-moa", options = { router_inputs = ["image"], router_scope = "local", ocr_expert = false } },
    { name = "mmrouter-moa", options = { router_inputs = ["image"], ocr_expert = false } },
    { name = "mmrouter-moa", options = { router_inputs = ["image", "text"], ocr_expert = false } },
    { name = "mmrouter-moa", options = { router_inputs = ["image", "text", "task"], ocr_expert = false } },
    { name = "mmrouter-moa", options = { router_inputs = ["image", "text", "task", "ocr"], ocr_expert = false } },
    "mmrouter-moa",
    { name = "mmrouter-moa", options = { routing = "oracle" } },
    { name = "mmrouter-moa", options = { routing = "uniform" } },
]
"""
# what is compared between (a) and (b): everything but who the row is and how long it took
NOT_COMPARED = {"run_id", "method", "label", "options", "git_commit", "compute_s", "timer"}


def _ladder():
    return list(from_dict(tomllib.loads(LADDER_TOML)).methods)


def _records(prep, entry, path):
    run = Run(prep, entry, path, backend=in_process)
    run.execute()
    return read_jsonl(path / "runs" / run.run_id / "records.jsonl")


def _same(a, b):
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def test_each_ladder_row_changes_one_option_from_the_row_above():
    entries = _ladder()
    options = [dataclasses.asdict(create_method(e.name, e.options).options) for e in entries[1:7]]  # (b)-(g)
    steps = [{k for k in upper if upper[k] != lower[k]} for upper, lower in itertools.pairwise(options)]
    assert steps == [{"router_scope"}, {"router_inputs"}, {"router_inputs"}, {"router_inputs"}, {"ocr_expert"}]
    assert options[-1] == dataclasses.asdict(create_method("mmrouter-moa").options)  # (g): the full default
    for entry, routing in zip(entries[7:], ("oracle", "uniform"), strict=True):  # the bounds: (g) + routing
        bound = dataclasses.asdict(create_method(entry.name, entry.options).options)
        assert bound == {**options[-1], "routing": routing}
    assert [e.label for e in entries[:3]] == [
        "pilot-ctmoa",
        "mmrouter-moa[ocr_expert=false,router_inputs=image,router_scope=local]",
        "mmrouter-moa[ocr_expert=false,router_inputs=image]",
    ]


@pytest.mark.parametrize("rounds", [2, 3])  # 3: client 2 joins in round 2, in stage 1 beside a stage-2 client
def test_image_only_local_router_without_ocr_expert_is_bit_identical_to_pilot(tiny_prep, tmp_path, rounds):
    prep = dataclasses.replace(tiny_prep, protocol=tiny_prep.protocol.replace(rounds=rounds))
    pilot, local = _ladder()[:2]
    a = _records(prep, pilot, tmp_path / "a")
    b = _records(prep, local, tmp_path / "b")
    assert [r["kind"] for r in a] == [r["kind"] for r in b]
    assert {"train", "eval", "usage", "routing", "run"} <= {r["kind"] for r in a}
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for key in ra.keys() - NOT_COMPARED:
            assert _same(ra[key], rb[key]), (ra["kind"], key, ra[key], rb[key])
    assert a[-1]["options"] != b[-1]["options"] and a[-1]["method"] != b[-1]["method"]


def test_router_scope_global_shares_the_router_local_keeps_it(tiny_prep, tmp_path):
    _, local, global_ = _ladder()[:3]
    info = tiny_prep.infos[0]
    for entry, scope in ((local, "local"), (global_, "shared")):
        run = Run(tiny_prep, entry, tmp_path, backend=in_process)
        model = run.build()
        tags = run.method.tags(model)
        assert {n for n in tags if n.startswith("router.")} == {"router.image.weight"}
        assert tags["router.image.weight"] == scope
        model.bind(STAGE2, info.tasks, info.has_ocr)
        up = run.method.upload(model, info)
        down = run.method.download(run.method.init_server_state(model), info)
        assert ("router.image.weight" in up) == ("router.image.weight" in down) == (scope == "shared")


def _stage2(prep, tmp_path, entry, info, ocr):
    """A model of ``entry`` with distinct experts, bound to ``info`` in stage 2, and some of its rows' features."""
    run = Run(prep, entry, tmp_path, backend=in_process)
    model = run.build()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("up.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    ctx = client_context(run.prep, info, 0)
    rows = list(ctx.train_rows[:3]) + list(ctx.train_rows[-3:])
    f = model.encode(*ctx.inputs(model, rows))
    model.bind(STAGE2, info.tasks, ocr)
    return model, f


@pytest.mark.parametrize("method", ["pilot-ctmoa", "mmrouter-moa"])
def test_oracle_routes_each_row_to_its_own_task_expert(tiny_prep, tmp_path, method):
    info = tiny_prep.infos[1]  # vqa + grounding, with OCR
    model, f = _stage2(tiny_prep, tmp_path, MethodEntry(method, {"routing": "oracle"}), info, info.has_ocr)
    assert model.router is None and not any(n.startswith("router.") for n, _ in model.named_parameters())
    with torch.no_grad():
        out = model.adapt(f)
        own = torch.stack([model.task_adapters[ALL[i]](x) for i, x in zip(f.task_id, f.tokens, strict=True)])
        expected = f.tokens + own + model.client_adapter(f.tokens)
    assert torch.allclose(out.tokens, expected, atol=1e-6)
    one_hot = torch.zeros(6, len(model.expert_names))
    one_hot[torch.arange(6), f.task_id] = 1.0
    assert torch.equal(model.routing, one_hot)  # weight 1 on the row's task, none on the OCR expert
    assert model.extra_loss() == 0.0
    # a foreign task's row (at evaluation) goes through that expert and its adapter-on-adapter
    f.task_id[:] = ALL.index("classification")
    with torch.no_grad():
        e = model.task_adapters["classification"](f.tokens)
        expected = f.tokens + e + model.aoa["classification"](e) + model.client_adapter(f.tokens)
        assert torch.allclose(model.adapt(f).tokens, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("method", "ocr", "n"), [("pilot-ctmoa", True, 4), ("mmrouter-moa", True, 5), ("mmrouter-moa", False, 4)]
)
def test_uniform_weighs_the_clients_experts_equally(tiny_prep, tmp_path, method, ocr, n):
    info = tiny_prep.infos[1]
    model, f = _stage2(tiny_prep, tmp_path, MethodEntry(method, {"routing": "uniform"}), info, ocr)
    assert model.router is None
    with torch.no_grad():
        out = model.adapt(f)
        x = f.tokens
        experts = [model.task_adapters[t](x) for t in ALL]
        experts = [e if t in info.tasks else e + model.aoa[t](e) for t, e in zip(ALL, experts, strict=True)]
        if n == 5:
            experts.append(model.ocr_expert(x))
        expected = x + sum(experts) / n + model.client_adapter(x)
    assert torch.allclose(out.tokens, expected, atol=1e-6)
    weights = torch.zeros(6, len(model.expert_names))
    weights[:, :n] = 1.0 / n
    assert torch.allclose(model.routing, weights)
    assert model.extra_loss() == 0.0


@pytest.mark.parametrize("routing", ["oracle", "uniform"])
def test_reference_routing_has_no_router_to_train_or_send(tiny_prep, tmp_path, routing, train_client):
    run = Run(tiny_prep, MethodEntry("mmrouter-moa", {"routing": routing}), tmp_path, backend=in_process)
    model = run.build()
    assert not any(n.startswith("router.") for n in run.method.tags(model))
    info = tiny_prep.infos[1]
    state = run.method.init_server_state(model)
    assert not any(n.startswith("router.") for n in (*state, *run.method.upload(model, info)))
    train_client(run, model, info, 1)  # stage 2 trains without a router


def _usage(records, round_):
    return {(r["task"], r["expert"]): r["value"] for r in records if r["kind"] == "usage" and r["round"] == round_}


def test_usage_records_reflect_the_reference_weights(tiny_prep, tmp_path):
    """TINY: clients 0 (classification, vqa; no OCR) and 1 (vqa, grounding; OCR) trained in rounds 0
    and 1 and are evaluated in stage 2; client 2 (grounding, ocr_vqa) never trained: stage 1, no routing.
    A task's usage row is the mean over its holders that route."""
    oracle = _records(tiny_prep, MethodEntry("mmrouter-moa", {"routing": "oracle"}), tmp_path / "o")
    uniform = _records(tiny_prep, MethodEntry("mmrouter-moa", {"routing": "uniform"}), tmp_path / "u")
    experts = (*ALL, "ocr")
    for round_ in (0, 1):
        assert _usage(oracle, round_) == pytest.approx(
            {(t, e): float(t == e) for t in ("classification", "vqa", "grounding") for e in experts}
        )
        four, five = [0.25] * 4 + [0.0], [0.2] * 5  # client 0 routes over 4 experts, client 1 over 5
        expected = {
            "classification": four,  # client 0
            "vqa": [(a + b) / 2 for a, b in zip(four, five, strict=True)],  # clients 0 and 1
            "grounding": five,  # client 1 (client 2 does not route)
        }
        assert _usage(uniform, round_) == pytest.approx(
            {(t, e): w for t, ws in expected.items() for e, w in zip(experts, ws, strict=True)}
        )
