"""mmrouter-moa (methods/mmrouter_moa.py): tags, selective OCR payloads, modality-aware aggregation,
router inputs, the image-only ⇔ Pilot equivalence, end-to-end smoke run."""

import pytest
import torch

from fedbench.method import ClientInfo, Reply, create_method
from fedbench.payload import check_upload
from fedbench.protocol import MethodEntry
from fedbench.records import read_jsonl
from fedbench.simulation import Run, trainable_state
from fedbench.task_experts import STAGE1, STAGE2

t = torch.tensor
ALL = ("classification", "vqa", "grounding", "ocr_vqa")
OCR_PARTS = ("ocr_expert.", "router.ocr.")


def _split(run, model):
    tags = run.method.tags(model)
    return {n for n, g in tags.items() if g == "shared"}, {n for n, g in tags.items() if g == "local"}


def _infos(prep):
    ocr = next(i for i in prep.infos if i.has_ocr)
    plain = next(i for i in prep.infos if not i.has_ocr)
    return ocr, plain


def _perturb(model, scale=0.1):
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("up.weight") or name.startswith("router."):
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _features(run, model, rows):
    ctx = run.context(run.prep.infos[0], 0)
    batch, cached = ctx.inputs(model, rows)
    return model.encode(batch, cached)


def test_tags_and_selective_ocr_payloads(tiny_prep, tmp_path):
    run = Run(tiny_prep, MethodEntry("mmrouter-moa"), tmp_path)
    model = run.build()
    shared, local = _split(run, model)
    assert {n.split(".")[0] for n in shared} == {"task_adapters", "heads", "router", "ocr_expert"}
    assert {n.split(".")[0] for n in local} == {"client_adapter", "aoa"}
    assert {n for n in shared if n.startswith("router.")} == {
        "router.image.weight",
        "router.text.weight",
        "router.task.weight",
        "router.ocr.weight",
        "router.null",
    }
    assert model.expert_names == [*ALL, "ocr"]
    ocr, plain = _infos(tiny_prep)
    state = run.method.init_server_state(model)
    for info in (ocr, plain):
        up = run.method.upload(model, info)
        check_upload(up, shared, local, "mmrouter-moa")
        own = {n for n in shared if n.startswith(("task_adapters.", "heads.")) and n.split(".")[1] in info.tasks}
        router = {n for n in shared if n.startswith("router.") and not n.startswith("router.ocr.")}
        ocr_parts = {n for n in shared if n.startswith(OCR_PARTS)} if info.has_ocr else set()
        assert set(up) == own | router | ocr_parts
        down = run.method.download(state, info)
        assert {n for n in shared if n.startswith("task_adapters.")} <= set(down)
        assert any(n.startswith(OCR_PARTS) for n in down) == info.has_ocr
    frozen = create_method("mmrouter-moa", {"ocr_frozen_on_non_ocr": True})
    down = frozen.download(state, plain)
    assert {n for n in shared if n.startswith(OCR_PARTS)} <= set(down)
    assert not any(n.startswith(OCR_PARTS) for n in frozen.upload(model, plain))


def test_ocr_tensors_are_averaged_over_ocr_clients_only_and_router_branches_over_all():
    method = create_method("mmrouter-moa")
    replies = [
        Reply(
            ClientInfo(0, ("vqa", "ocr_vqa"), True, 2),
            {
                "ocr_expert.up.bias": t([1.0, 2.0]),
                "router.ocr.weight": t([[4.0]]),
                "router.image.weight": t([[1.0]]),
                "router.null": t([0.0, 3.0]),
                "task_adapters.vqa.up.bias": t([1.0]),
            },
            2,
        ),
        Reply(
            ClientInfo(1, ("vqa", "classification"), False, 1),
            {
                "router.image.weight": t([[4.0]]),
                "router.null": t([6.0, 0.0]),
                "task_adapters.vqa.up.bias": t([4.0]),
            },
            1,
        ),
        Reply(
            ClientInfo(2, ("ocr_vqa", "grounding"), True, 1),
            {
                "ocr_expert.up.bias": t([5.0, -2.0]),
                "router.ocr.weight": t([[0.0]]),
                "router.image.weight": t([[-2.0]]),
                "router.null": t([3.0, 3.0]),
            },
            1,
        ),
    ]
    groups = {method.group_of(n) for r in replies for n in r.payload}
    assert groups == {"ocr", "router:image", "router:null", "task:vqa"}
    new = method.aggregate({"ocr_expert.up.bias": t([9.0, 9.0]), "router.ocr.weight": t([[9.0]])}, replies)
    assert torch.allclose(new["ocr_expert.up.bias"], t([(2 * 1 + 5) / 3, (2 * 2 - 2) / 3]))  # clients 0, 2
    assert torch.allclose(new["router.ocr.weight"], t([[(2 * 4 + 0) / 3]]))
    assert torch.allclose(new["router.image.weight"], t([[(2 * 1 + 4 - 2) / 4]]))  # all three
    assert torch.allclose(new["router.null"], t([(0 + 6 + 3) / 4, (6 + 0 + 3) / 4]))
    assert torch.allclose(new["task_adapters.vqa.up.bias"], t([(2 * 1 + 4) / 3]))


def test_image_only_router_reduces_exactly_to_pilot(tiny_prep, tmp_path):
    pilot_run = Run(tiny_prep, MethodEntry("pilot-ctmoa"), tmp_path / "p")
    mm_run = Run(
        tiny_prep, MethodEntry("mmrouter-moa", {"router_inputs": "image", "ocr_expert": False}), tmp_path / "m"
    )
    pilot, mm = pilot_run.build(), mm_run.build()
    _perturb(pilot)
    assert set(dict(pilot.named_parameters())) == set(dict(mm.named_parameters()))
    mm.load_state_dict(pilot.state_dict())  # Pilot's router (and experts) copied into mmrouter
    info = tiny_prep.infos[0]
    f = _features(pilot_run, pilot, pilot_run.context(info, 0).train_rows[:7])
    for model in (pilot, mm):
        model.bind(STAGE2, info.tasks, info.has_ocr)
    with torch.no_grad():
        out_p, out_m = pilot.adapt(f), mm.adapt(f)
    assert torch.equal(pilot.routing, mm.routing)
    assert torch.equal(out_p.tokens, out_m.tokens)
    assert mm.expert_names == pilot.expert_names == list(ALL)


def test_router_branches_and_ocr_null(tiny_prep, tmp_path):
    run = Run(tiny_prep, MethodEntry("mmrouter-moa"), tmp_path)
    model = run.build()
    _perturb(model)
    table = tiny_prep.table
    rows = torch.arange(len(table.task)).numpy()
    with_ocr = rows[tiny_prep.store.ocr_mask[rows].any(1).numpy()][:3]
    without = rows[~tiny_prep.store.ocr_mask[rows].any(1).numpy()][:3]
    f = _features(run, model, list(with_ocr) + list(without))
    r = model.router
    with torch.no_grad():
        logits = r(f, True)
        mask = f.ocr_mask.unsqueeze(-1).float()
        pooled = (f.ocr * mask).sum(1) / mask.sum(1).clamp_min(1)
        has = f.ocr_mask.any(1, keepdim=True)
        row = r.text(f.question) + r.task.weight[f.task_id] + torch.where(has, r.ocr(pooled), r.null)
        assert torch.allclose(logits, r.image(f.tokens) + row[:, None], atol=1e-5)
        assert has[:3].all() and not has[3:].any()
        # a client without the OCR branch uses the null logits on every row
        no_ocr = r(f, False)
        assert torch.allclose(
            no_ocr, r.image(f.tokens) + (r.text(f.question) + r.task.weight[f.task_id] + r.null)[:, None]
        )
    text_only = Run(tiny_prep, MethodEntry("mmrouter-moa", {"router_inputs": "text+task"}), tmp_path / "b").build()
    assert not hasattr(text_only.router, "image") and not hasattr(text_only.router, "ocr")
    _perturb(text_only)
    text_only.bind(STAGE2, ALL, True)
    with torch.no_grad():
        lg = text_only.router(f, True)
        assert lg.shape == (6, 1, 5)
        text_only.adapt(f)
    assert text_only.routing.shape == (6, 5)


def test_client_without_ocr_routes_over_task_experts_only(tiny_prep, tmp_path):
    run = Run(tiny_prep, MethodEntry("mmrouter-moa"), tmp_path)
    model = run.build()
    _perturb(model)
    f = _features(run, model, run.context(tiny_prep.infos[0], 0).train_rows[:5])
    with torch.no_grad():
        model.bind(STAGE2, ("vqa", "classification"), False)
        model.adapt(f)
        assert torch.all(model.routing[:, -1] == 0) and torch.allclose(model.routing.sum(-1), torch.ones(5))
        model.bind(STAGE2, ("vqa", "classification"), True)
        model.adapt(f)
        assert torch.all(model.routing[:, -1] > 0)
        model.bind(STAGE1, ("vqa", "classification"), True)
        model.adapt(f)
        assert model.routing is None


@pytest.mark.parametrize("frozen", [False, True])
def test_non_ocr_client_never_trains_ocr_parts(tiny_prep, tmp_path, frozen, train_client):
    run = Run(tiny_prep, MethodEntry("mmrouter-moa", {"ocr_frozen_on_non_ocr": frozen}), tmp_path)
    model = run.build()
    _perturb(model)
    ocr, plain = _infos(tiny_prep)
    for r in (0, 1):  # stage 1, stage 2
        before = trainable_state(model)
        train_client(run, model, plain, r)
        after = trainable_state(model)
        assert all(torch.equal(before[n], after[n]) for n in before if n.startswith(OCR_PARTS))
        assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("heads."))
    before = trainable_state(model)
    train_client(run, model, ocr, 1)
    after = trainable_state(model)
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith(OCR_PARTS))


def test_bad_router_inputs_are_named():
    with pytest.raises(ValueError, match="router_inputs"):
        create_method("mmrouter-moa", {"router_inputs": "image+pixels"})
    with pytest.raises(ValueError, match="router_inputs"):
        create_method("mmrouter-moa", {"router_inputs": ""})
    assert create_method("mmrouter-moa", {"router_inputs": "ocr+task"}).options.router_inputs == ("ocr", "task")


def test_smoke_run_records_usage_with_the_ocr_expert(tiny_prep, tmp_path):
    run = Run(tiny_prep, MethodEntry("mmrouter-moa"), tmp_path)
    run.execute()
    records = read_jsonl(tmp_path / "runs" / run.run_id / "records.jsonl")
    usage = [r for r in records if r["kind"] == "usage"]
    assert usage and {r["round"] for r in usage} == {1}
    assert {r["expert"] for r in usage} == {*ALL, "ocr"}
    for task in {r["task"] for r in usage}:
        assert sum(r["value"] for r in usage if r["task"] == task) == pytest.approx(1.0)
    train = [r for r in records if r["kind"] == "train"]
    assert train and all(r["down_bytes"] > 0 and r["up_bytes"] > 0 for r in train)
    assert any(r["kind"] == "run" and r["completed"] for r in records)


def test_stage2_update_trains_every_router_branch_from_its_zero_start(tiny_prep, tmp_path, train_client):
    """The text, task, OCR and null branches start at zero (the router starts as Pilot's); stage-2
    updates must move each of them, or the ablation would compare untrained inputs."""
    run = Run(tiny_prep, MethodEntry("mmrouter-moa"), tmp_path)
    model = run.build()
    with torch.no_grad():  # experts that differ, as after stage 1 (fresh adapters all output zero)
        gen = torch.Generator().manual_seed(5)
        for name, p in model.named_parameters():
            if name.endswith("up.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    params = dict(model.named_parameters())
    row_branches = ("router.text.weight", "router.task.weight", "router.ocr.weight")
    assert all(torch.count_nonzero(params[n]) == 0 for n in (*row_branches, "router.null"))
    ocr, plain = _infos(tiny_prep)
    train_client(run, model, ocr, 1)  # round 1 of the tiny protocol is stage 2
    assert all(torch.count_nonzero(params[n]) > 0 for n in row_branches), [
        n for n in row_branches if not params[n].any()
    ]
    assert torch.count_nonzero(params["router.null"]) == 0  # every row of an OCR client carries OCR text
    train_client(run, model, plain, 1)  # a client without OCR routes with the null logits
    assert torch.count_nonzero(params["router.null"]) > 0


def test_stage1_ocr_expert_acts_on_reading_rows_only(tiny_prep, tmp_path):
    """Every row of an OCR client carries OCR text; in stage 1 the OCR expert still acts only on the rows
    of tasks whose head reads it (OCR-VQA), not on a VQA row that happens to carry the same words."""
    run = Run(tiny_prep, MethodEntry("mmrouter-moa"), tmp_path)
    model = run.build()
    _perturb(model)
    table, store = tiny_prep.table, tiny_prep.store
    has_text = store.ocr_mask.any(1).numpy()
    reading = torch.arange(len(table.task)).numpy()[(table.task == "ocr_vqa") & has_text][:3]
    other = torch.arange(len(table.task)).numpy()[(table.task != "ocr_vqa") & has_text][:3]
    assert len(reading) == 3 and len(other) == 3
    f = _features(run, model, list(reading) + list(other))
    model.bind(STAGE1, ALL, True)
    with torch.no_grad():
        with_ocr = model.adapt(f).tokens
        model.ocr_expert.up.weight.zero_()
        model.ocr_expert.up.bias.zero_()
        without = model.adapt(f).tokens
    assert not torch.allclose(with_ocr[:3], without[:3]) and torch.equal(with_ocr[3:], without[3:])
