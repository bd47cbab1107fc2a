"""The LoRA rows and reference rows on a generative VLM: a random LLaVA-format checkpoint saved to disk
(Llama and Qwen2 LMs), loaded by path through the protocol, trained teacher-forced and scored on what
it generates; what cannot apply to the family is refused with one line."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from vlm_fixtures import save_tiny_llava

from fedbench.api.data import TRAIN
from fedbench.api.vlm_model import IGNORE, is_connector
from fedbench.backends.inprocess import in_process
from fedbench.config.protocol import MethodEntry
from fedbench.config.sections import BackboneConfig, ModelConfig, VLMConfig
from fedbench.runtime.client import build_model
from fedbench.runtime.evaluation import CUT, UNPARSED, score_generated
from fedbench.runtime.server import Run
from fedbench.runtime.training import client_context
from fedbench.staging.prepare import prepare
from fedbench.utils.records import read_jsonl


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def vlm_prep(request, tmp_path_factory):
    from conftest import TINY

    path = save_tiny_llava(tmp_path_factory.mktemp(request.param), request.param)
    proto = dataclasses.replace(TINY, rounds=1, backbone=BackboneConfig(name=f"llava:{path}"))
    return prepare(proto, 0, device=torch.device("cpu"))


def _records(run: Run) -> list[dict]:
    return read_jsonl(run.records_path)


def test_a_saved_llava_loads_by_path_and_runs_a_round_of_fedavg_lora(vlm_prep, tmp_path):
    run = Run(vlm_prep, MethodEntry("fedavg-lora"), tmp_path, backend=in_process)
    run.execute()
    rows = _records(run)
    assert rows[-1]["kind"] == "run" and rows[-1]["completed"]
    train = [r for r in rows if r["kind"] == "train"]
    assert train and all(r["up_bytes"] > 0 and r["compute_flops"] > 0 for r in train)
    glob = [r for r in rows if r["kind"] == "eval" and r["scope"] == "global"]
    assert {r["task"] for r in glob} == set(vlm_prep.protocol.tasks)
    for r in glob:  # scored from generated text: a score, a parse-failure share and a cut share each
        assert 0.0 <= r["value"] <= 1.0 and 0.0 <= r["parse_fail"] <= 1.0 and 0.0 <= r["cut"] <= 1.0
    assert rows[-1]["backbone"] == vlm_prep.protocol.backbone.name


def test_lora_sits_on_the_lm_and_the_connector_trains_only_when_shared(vlm_prep):
    model = build_model(vlm_prep, Run(vlm_prep, MethodEntry("fedavg-lora"), "/unused", backend=in_process).method)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if ".lora_" in n]
    assert lora and all(".language_model." in n and (".q_proj." in n or ".v_proj." in n) for n in lora)
    assert any(is_connector(n) for n in trainable)
    assert set(trainable) == set(lora) | {n for n in trainable if is_connector(n)}
    frozen = dataclasses.replace(vlm_prep, protocol=vlm_prep.protocol.replace(vlm=VLMConfig(connector="frozen")))
    frozen.backbone.train_connector = False
    try:
        model = build_model(frozen, Run(frozen, MethodEntry("fedavg-lora"), "/unused", backend=in_process).method)
        assert not any(is_connector(n) for n, p in model.named_parameters() if p.requires_grad)
    finally:
        vlm_prep.backbone.train_connector = True


def test_fedsa_keeps_b_local_and_shares_a_and_the_connector(vlm_prep):
    run = Run(vlm_prep, MethodEntry("fedsa-lora"), "/unused", backend=in_process)
    tags = run.method.tags(run.build())
    assert {n for n, t in tags.items() if t == "local"} == {n for n in tags if ".lora_B." in n}
    assert any(is_connector(n) and t == "shared" for n, t in tags.items())


def test_teacher_forcing_learns_the_answer_tokens_only(vlm_prep):
    model = build_model(vlm_prep, Run(vlm_prep, MethodEntry("fedavg-lora"), "/unused", backend=in_process).method)
    rows = vlm_prep.table.rows(split=TRAIN)[:5]
    ctx = client_context(vlm_prep, vlm_prep.infos[0], 0)
    batch, cached = ctx.inputs(model, rows)
    _, mask, labels = model.embed(batch, cached, answers=True)
    for i, (prompt, target) in enumerate(zip(batch.prompt_ids, batch.target_ids, strict=True)):
        learned = labels[i][labels[i] != IGNORE].tolist()
        assert learned == list(target) and target[-1] == vlm_prep.backbone.eos_token_id
        assert int(mask[i].sum()) == len(prompt) + len(target)
    assert labels.shape[1] == vlm_prep.store.width  # one padded width per seed: one cost per step
    loss = model.loss(batch, cached)
    assert torch.isfinite(loss) and loss.requires_grad


def test_generation_is_cut_at_max_new_tokens_and_counted(vlm_prep):
    """A random LM rarely writes its end token: its answers run to the family's max_new_tokens, are
    cut there, scored as parsed (or not) and counted."""
    model = build_model(vlm_prep, Run(vlm_prep, MethodEntry("fedavg-lora"), "/unused", backend=in_process).method)
    ctx = client_context(vlm_prep, vlm_prep.infos[0], 0, evaluating=True)
    rows = np.arange(len(vlm_prep.table))[:12]
    method = Run(vlm_prep, MethodEntry("fedavg-lora"), "/unused", backend=in_process).method
    scores, routing, status = score_generated(model, method, ctx, rows, batch_size=5)
    assert routing is None  # the LoRA row's connector is no mixture
    assert scores.shape == status.shape == (12,) and set(np.unique(status)) <= {0, UNPARSED, CUT, UNPARSED | CUT}
    batch, cached = ctx.inputs(model, rows[:3])
    texts, cut = model.generate(batch, cached, max_new_tokens=2)
    assert len(texts) == 3 and cut.dtype == bool


def test_the_generation_budget_covers_the_longest_answer_in_the_lms_own_tokens(vlm_prep):
    """A word-level tokenizer writes a box in 9 tokens (+ end): the family's 12 suffice; one token per
    character (a stand-in for sub-word tokenizers that split digits) needs the box's 24 characters + end + 2."""
    from fedbench.api.family import family_of

    spec = next(s for s in vlm_prep.specs if s.name == "grounding")
    family = family_of(spec)
    store = vlm_prep.store
    assert store.generation_budget["grounding"] == family.max_new_tokens == 12
    assert family.generation_budget(spec, lambda text: len(text) + 1) == len("[1000, 1000, 1000, 1000]") + 3
    for answer_spec in (s for s in vlm_prep.specs if s.name != "grounding"):
        longest = max(len(vlm_prep.backbone.answer_ids(a)) for a in answer_spec.answers)
        assert store.generation_budget[answer_spec.name] == max(8, longest + 2)


def test_models_share_the_weights_no_method_trains_and_copy_the_rest(vlm_prep):
    """Two models of one run hold one LM and one tower (the same storage), each its own connector and
    LoRA: training one leaves the other as it was."""
    method = Run(vlm_prep, MethodEntry("fedavg-lora"), "/unused", backend=in_process).method
    a, b = build_model(vlm_prep, method), build_model(vlm_prep, method)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    frozen = [n for n, p in pa.items() if not p.requires_grad]
    trained = [n for n, p in pa.items() if p.requires_grad]
    assert frozen and trained and any(is_connector(n) for n in trained)
    assert all(pa[n].data_ptr() == pb[n].data_ptr() for n in frozen)
    assert all(pa[n].data_ptr() != pb[n].data_ptr() for n in trained)
    before = {n: p.detach().clone() for n, p in pb.items()}
    with torch.no_grad():
        for n in trained:
            pa[n].add_(1.0)
    assert all(torch.equal(pb[n], before[n]) for n in pb)


def test_a_prompt_too_long_is_truncated_and_one_that_cannot_fit_is_refused(vlm_prep, tmp_path):
    vlm = vlm_prep.backbone
    long_question = " ".join(["circle"] * 400)
    from fedbench.staging.token_rows import TokenRowStore

    store = TokenRowStore.__new__(TokenRowStore)
    store.truncated = 0
    ids = store._fitting(vlm, long_question + "\nAnswer.", vlm.context_length - 8)
    assert len(ids) <= vlm.context_length - 8 and store.truncated > 0
    with pytest.raises(ValueError, match=r"context of \d+ tokens") as err:
        store._fitting(vlm, "a question", vlm.image_seq_length // 2)
    assert "\n" not in str(err.value)


def test_what_does_not_apply_to_a_family_is_refused_in_one_line(vlm_prep, backbone):
    from conftest import TINY

    clip_with_vlm_options = TINY.replace(vlm=VLMConfig(connector="frozen"))
    with pytest.raises(ValueError, match=r"\[vlm\] options") as err:
        prepare(clip_with_vlm_options, 0, backbone=backbone, device=torch.device("cpu"))
    assert "\n" not in str(err.value)
    per_task = vlm_prep.protocol.replace(model=ModelConfig(answer_side="per_task"))
    with pytest.raises(ValueError, match="answer_side") as err:
        prepare(per_task, 0, backbone=vlm_prep.backbone, device=torch.device("cpu"))
    assert "\n" not in str(err.value)
    from fedbench.api.method import Method

    class ClipOnly(Method):  # a plug-in method with no vlm form (every registered method has one)
        name = "clip-only"

    with pytest.raises(ValueError, match="no form on the vlm backbone family") as err:
        build_model(vlm_prep, ClipOnly())
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method", ["local-only", "centralized"])
def test_the_reference_rows_run_on_the_vlm(vlm_prep, tmp_path, method):
    run = Run(vlm_prep, MethodEntry(method), tmp_path, backend=in_process)
    run.execute()
    rows = _records(run)
    assert rows[-1]["completed"]
    train = [r for r in rows if r["kind"] == "train"]
    assert all(r["up_bytes"] == 0 for r in train)
