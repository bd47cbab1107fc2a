"""The task-expert MoA methods (pilot-ctmoa, mmrouter-moa) on a generative VLM: a random LLaVA saved to
disk and loaded by path. The connector becomes the mixture (docs/methods.md §7): every expert a connector
initialised from the pretrained one, the router on the vision tokens (and the LM's input embeddings of
the text), the LM's LoRA aggregated per client by Pilot's distance rule."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from vlm_fixtures import save_tiny_llava

from fedbench.adapters.expert_models import STAGE1, STAGE2, TaskExpertVLMModel
from fedbench.adapters.task_experts import client_key
from fedbench.api.data import TRAIN
from fedbench.api.model import is_answer_side
from fedbench.api.registry import METHODS
from fedbench.api.vlm_model import is_connector
from fedbench.backends.inprocess import in_process
from fedbench.config.protocol import MethodEntry
from fedbench.config.sections import BackboneConfig
from fedbench.runtime.server import Run
from fedbench.runtime.training import client_context
from fedbench.staging.prepare import prepare
from fedbench.utils.records import read_jsonl


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    from conftest import TINY

    path = save_tiny_llava(tmp_path_factory.mktemp("llama"), "llama")
    proto = dataclasses.replace(TINY, rounds=2, backbone=BackboneConfig(name=f"llava:{path}"))
    return prepare(proto, 0, device=torch.device("cpu"))


ENTRIES = [
    MethodEntry("pilot-ctmoa"),
    MethodEntry("mmrouter-moa"),
    MethodEntry("mmrouter-moa", {"router_inputs": ["image"], "router_scope": "local", "router_view": "prompt"}),
    MethodEntry("mmrouter-moa", {"routing": "oracle"}),
    MethodEntry("mmrouter-moa", {"routing": "uniform"}),
    MethodEntry("pfedmoe"),
    MethodEntry("pfedmoe", {"gate_input": "features"}),
    MethodEntry("feddpa"),
    MethodEntry("fedmix", {"num_experts": 2, "experts_per_client": 1}),
]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.label)
def test_task_expert_rows_run_two_rounds_on_a_saved_llava(prep, tmp_path, entry):
    """Stage 1 then stage 2 (TINY's clients 0 and 1 take part twice), generation scored, routing usage
    recorded for stage-2 evaluations, the LM's LoRA and the task connectors on the wire."""
    run = Run(prep, entry, tmp_path, backend=in_process)
    run.execute()
    rows = read_jsonl(run.records_path)
    assert rows[-1]["kind"] == "run" and rows[-1]["completed"]
    train = [r for r in rows if r["kind"] == "train"]
    assert entry.name in ("pfedmoe", "feddpa", "fedmix") or {r["stage"] for r in train} == {STAGE1, STAGE2}
    assert all(r["up_bytes"] > 0 and r["compute_flops"] > 0 for r in train)
    glob = [r for r in rows if r["kind"] == "eval" and r["scope"] == "global"]
    assert glob and all(0.0 <= r["value"] <= 1.0 and 0.0 <= r["parse_fail"] <= 1.0 for r in glob)
    usage = [r for r in rows if r["kind"] == "usage"]
    assert usage and {r["expert"] for r in usage} <= set(run.build().expert_names)


def test_the_connector_experts_start_as_the_pretrained_connector(prep):
    """Every expert is a trainable copy of the pretrained connector (which stays frozen), so the averaged
    stage-1 output equals the pretrained connector's output at initialisation; LoRA sits on the LM."""
    run = Run(prep, MethodEntry("mmrouter-moa"), "/unused", backend=in_process)
    model = run.build()
    assert isinstance(model, TaskExpertVLMModel)
    pretrained = dict(prep.backbone.connector.named_parameters())
    for expert in [*model.task_adapters.values(), model.client_adapter, model.ocr_expert]:
        own = dict(expert.named_parameters())
        assert own.keys() == pretrained.keys() and all(p.requires_grad for p in own.values())
        assert all(torch.equal(own[k], pretrained[k]) and own[k].data_ptr() != pretrained[k].data_ptr() for k in own)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any(is_connector(n) for n in trainable)  # the pretrained connector: frozen, unused
    lora = [n for n in trainable if ".lora_" in n]
    assert lora and all(".language_model." in n and is_answer_side(n) for n in lora)
    rows = prep.table.rows(split=TRAIN)[:6]
    ctx = client_context(prep, prep.infos[0], 0)
    batch, cached = ctx.inputs(model, rows)
    vision = model.vision(batch, cached)
    for stage in (STAGE1, STAGE2):
        model.bind(stage, prep.infos[0].tasks, True)
        with torch.no_grad():
            torch.testing.assert_close(model.connect(vision, batch), model.backbone.connector(vision))


def test_the_router_reads_the_lms_input_embeddings_of_the_question_and_the_ocr_text(prep):
    vlm, store, table = prep.backbone, prep.store, prep.table
    weight = vlm.input_embeddings.weight
    ocr_row = next(r for r in range(len(table)) if table.ocr_text[r])
    plain_row = next(r for r in range(len(table)) if not table.ocr_text[r])
    for row in (ocr_row, plain_row):
        ids = vlm.text_ids(str(table.question[row]))
        torch.testing.assert_close(store.question[row], weight[ids].mean(0))
    ids = vlm.text_ids(str(table.ocr_text[ocr_row]))[: store.ocr.shape[1]]
    assert int(store.ocr_mask[ocr_row].sum()) == len(ids) > 0 and not store.ocr_mask[plain_row].any()
    torch.testing.assert_close(store.ocr[ocr_row, : len(ids)], weight[ids])
    run = Run(prep, MethodEntry("mmrouter-moa"), "/unused", backend=in_process)
    model = run.build()
    assert model.router.image.weight.shape[1] == vlm.vision_dim
    assert model.router.text.weight.shape[1] == model.router.ocr.weight.shape[1] == vlm.lm_dim


def test_the_lms_lora_is_aggregated_per_client_by_the_distance_rule(prep):
    """The server keeps each replying client's own distance-weighted aggregate of the LM's LoRA and sends
    it back to that client; task connectors are averaged within their task."""
    from fedbench.api.method import Reply

    run = Run(prep, MethodEntry("pilot-ctmoa"), "/unused", backend=in_process)
    method, model = run.method, run.build()
    state = method.init_server_state(model)
    replies = []
    for k, info in enumerate(prep.infos[:3]):
        model.bind(STAGE1, info.tasks, info.has_ocr)
        up = method.upload(model, info)
        up = {n: t + 0.01 * (k + 1) for n, t in up.items()}  # three different clients
        replies.append(Reply(info, up, 10 * (k + 1)))
    lm = [n for n in replies[0].payload if ".language_model." in n]
    assert lm and all(any(n.startswith(f"task_adapters.{t}.") for n in replies[0].payload) for t in prep.infos[0].tasks)
    new = method.aggregate(state, replies)
    for info in prep.infos[:3]:
        assert all(client_key(info.client, n) in new for n in lm)
        down = method.download(new, info)
        assert all(torch.equal(down[n], new[client_key(info.client, n)]) for n in lm)
    assert not torch.equal(new[client_key(prep.infos[0].client, lm[0])], new[client_key(prep.infos[1].client, lm[0])])


def test_with_the_lm_frozen_the_task_expert_rows_train_connectors_only_and_lm_adapter_rows_are_refused(prep, tmp_path):
    """``model.answer_side = "frozen_trunk"`` on the vlm family, the analogue of the clip family's frozen
    trunk: the task-expert rows keep their connector experts and router, with no LoRA on the LM, so nothing
    of the LM trains or travels; a row whose adapters are all on the LM is refused in one line."""
    from fedbench.config.sections import ModelConfig
    from fedbench.runtime.client import build_model

    frozen = dataclasses.replace(prep, protocol=prep.protocol.replace(model=ModelConfig(answer_side="frozen_trunk")))
    run = Run(frozen, MethodEntry("mmrouter-moa"), tmp_path, backend=in_process)
    model = run.build()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(".language_model." in n or ".lora_" in n for n in trainable)
    assert any(n.startswith("task_adapters.") for n in trainable) and any(n.startswith("router.") for n in trainable)
    run.execute()
    rows = read_jsonl(run.records_path)
    assert rows[-1]["completed"] and all(r["up_bytes"] > 0 for r in rows if r["kind"] == "train")
    shared = Run(prep, MethodEntry("mmrouter-moa"), "/unused", backend=in_process).build()
    lora = [n for n, p in shared.named_parameters() if p.requires_grad and ".lora_" in n]
    assert lora and len(trainable) == sum(p.requires_grad for p in shared.parameters()) - len(lora)
    for name in ("fedavg-lora", "feddpa", "fedmix"):
        with pytest.raises(ValueError, match=f"method '{name}' has no form with the vlm family's LM frozen") as err:
            build_model(frozen, METHODS.get(name)())
        assert "\n" not in str(err.value)


def test_pfedmoe_mixes_two_connectors_by_its_local_gate_and_sends_only_the_global_one(prep):
    run = Run(prep, MethodEntry("pfedmoe", {"gate_input": "features"}), "/unused", backend=in_process)
    model, method = run.build(), run.method
    tags = method.tags(model)
    assert {n for n, t in tags.items() if t == "shared"} == {n for n in tags if n.startswith("global_expert.")}
    assert not any(".lora_" in n for n in tags)  # the LM stays frozen
    rows = prep.table.rows(split=TRAIN)[:6]
    batch, cached = client_context(prep, prep.infos[0], 0).inputs(model, rows)
    vision = model.vision(batch, cached)
    with torch.no_grad():  # two copies of the pretrained connector, weights summing to 1
        torch.testing.assert_close(model.connect(vision, batch), model.backbone.connector(vision))
    assert model.routing.shape == (6, 2) and torch.allclose(model.routing.sum(-1), torch.ones(6))
    with pytest.raises(ValueError, match="local_widths"):
        Run(prep, MethodEntry("pfedmoe", {"local_widths": [16, 32]}), "/unused", backend=in_process).build()


def test_feddpa_puts_both_adapters_on_the_lm_and_mixes_them_per_row(prep):
    """Global and local LoRA on the LM (only the global one and the connector shared); at evaluation each
    row gets its own α from its prompt's LM state, and a row's answer does not depend on the rows beside it."""
    run = Run(prep, MethodEntry("feddpa"), "/unused", backend=in_process)
    model, method = run.build(), run.method
    tags = method.tags(model)
    local = {n for n, t in tags.items() if t == "local"}
    assert local and all(".language_model." in n and ".lora_" in n and ".local" in n for n in local)
    assert {n for n, t in tags.items() if t == "shared"} == {n for n in tags if n not in local}
    with torch.no_grad():  # adapters that do something, so the mix matters
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.2)
    ctx = client_context(prep, prep.infos[0], 1, evaluating=True)
    rows = prep.table.rows(client=prep.infos[0].client)[:3]
    batch, cached = ctx.inputs(model, rows)
    texts, cut = method.generate(model, batch, cached, 4, ctx)
    alphas = model.routing[:, 0]
    assert len(texts) == 3 and cut.shape == (3,) and torch.allclose(model.routing.sum(-1), torch.ones(3))
    assert alphas.abs().max() <= method.options.max_weight and len(set(alphas.tolist())) > 1
    for i in range(3):
        one, one_cached = ctx.inputs(model, rows[i : i + 1])
        assert method.generate(model, one, one_cached, 4, ctx)[0] == [texts[i]]
        assert torch.allclose(model.routing[0, 0], alphas[i], atol=1e-5)
    with pytest.raises(ValueError, match="heads"):
        Run(prep, MethodEntry("feddpa", {"heads": "local"}), "/unused", backend=in_process).build()


def test_fedmix_with_one_expert_generates_as_transformers_does(prep):
    """The mixture's own greedy loop (K KV caches) with K = 1 is plain greedy decoding: it writes what
    transformers' generate writes for the same adapter, row for row."""
    from fedbench.api.vlm_model import VLMClientModel

    run = Run(prep, MethodEntry("fedmix", {"num_experts": 1, "experts_per_client": 1}), "/unused", backend=in_process)
    model = run.build()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.2)
    model.eval()
    rows = prep.table.rows(client=prep.infos[0].client)[:4]
    batch, cached = client_context(prep, prep.infos[0], 0).inputs(model, rows)
    mixed = model.generate(batch, cached, 6)
    plain = VLMClientModel.generate(model, batch, cached, 6)
    assert mixed[0] == plain[0] and (mixed[1] == plain[1]).all()
    assert torch.allclose(model.routing, torch.ones(4, 1))


def test_fedmix_trains_the_mixture_of_its_lm_experts(prep):
    run = Run(prep, MethodEntry("fedmix"), "/unused", backend=in_process)
    model = run.build()
    lora = [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n]
    assert all(".language_model." in n for n in lora)
    assert {n.split(".lora_")[1].split(".")[1] for n in lora} == {"expert0", "expert1", "expert2", "expert3"}
    rows = prep.table.rows(split=TRAIN)[:5]
    batch, cached = client_context(prep, prep.infos[0], 0).inputs(model, rows)
    model.train()
    loss = model.loss(batch, cached)
    loss.backward()
    assert torch.isfinite(loss) and model.gate.weight.grad.abs().sum() > 0
    assert model.routing.shape == (5, 4)
