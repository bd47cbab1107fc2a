"""mmrouter-moa (methods/mmrouter_moa.py): tags, selective OCR payloads, modality-aware aggregation
(each router entry over the clients that train it), router inputs, the image-only ⇔ Pilot
equivalence, end-to-end smoke run. The ablation ladder and reference routing: test_task_expert_ladder.py."""

import pytest
import torch

from fedbench.adapters.task_experts import STAGE1, STAGE2
from fedbench.api.method import ClientInfo, Reply, create_method
from fedbench.api.payload import check_upload
from fedbench.backends.inprocess import in_process
from fedbench.config.protocol import MethodEntry
from fedbench.runtime.client import trainable_state
from fedbench.runtime.server import Run
from fedbench.runtime.training import client_context

t = torch.tensor
ALL = ("classification", "vqa", "grounding", "ocr_vqa")
OCR_PARTS = ("ocr_expert.", "router.ocr.")


def is_ocr_part(name):
    """The OCR expert, the router's OCR branch and every router term's OCR-expert column."""
    return name.startswith(OCR_PARTS) or (name.startswith("router.") and name.endswith(".to_ocr"))


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
    ctx = client_context(run.prep, run.prep.infos[0], 0)
    batch, cached = ctx.inputs(model, rows)
    return model.encode(batch, cached)


def test_tags_and_selective_ocr_payloads(tiny_prep, tmp_path):
    run = Run(tiny_prep, MethodEntry("mmrouter-moa"), tmp_path, backend=in_process)
    model = run.build()
    shared, local = _split(run, model)
    assert {n.split(".")[0] for n in shared} == {"task_adapters", "heads", "trunk", "router", "ocr_expert"}
    assert {n.split(".")[0] for n in local} == {"client_adapter", "aoa"}
    terms = ["image", "text", *(f"task.{t}" for t in ALL), "ocr", "null"]
    assert {n for n in shared if n.startswith("router.")} == {
        f"router.{term}.{part}" for term in terms for part in ("weight", "to_ocr")
    }
    assert model.expert_names == [*ALL, "ocr"]
    ocr, plain = _infos(tiny_prep)
    state = run.method.init_server_state(model)
    for info in (ocr, plain):
        model.bind(STAGE1, info.tasks, info.has_ocr)  # stage 1 trains no router entry: none goes up
        assert not any(n.startswith("router.") for n in run.method.upload(model, info))
        model.bind(STAGE2, info.tasks, info.has_ocr)
        up = run.method.upload(model, info)
        check_upload(up, shared, local, "mmrouter-moa")
        own = {n for n in shared if n.startswith(("task_adapters.", "heads.")) and n.split(".")[1] in info.tasks}
        own |= {n for n in shared if n.startswith("trunk.")}
        # router: the image, text and null logits of the task experts; its own tasks' rows
        router = {"router.image.weight", "router.text.weight", "router.null.weight"}
        router |= {f"router.task.{t}.weight" for t in info.tasks}
        # OCR clients: the OCR expert, the OCR branch and the OCR-expert columns (of its own tasks' rows)
        ocr_parts = {n for n in shared if n.startswith(OCR_PARTS)} | {
            f"router.{term}.to_ocr" for term in ("image", "text", "ocr", "null", *(f"task.{t}" for t in info.tasks))
        }
        assert set(up) == own | router | (ocr_parts if info.has_ocr else set())
        assert not any(is_ocr_part(n) for n in up) or info.has_ocr
        down = run.method.download(state, info)
        assert {n for n in shared if n.startswith("task_adapters.")} <= set(down)
        assert any(is_ocr_part(n) for n in down) == info.has_ocr
        # a task's router row goes down only to a client asking for that task (at evaluation: all)
        assert {n.split(".")[2] for n in down if n.startswith("router.task.")} == set(info.tasks)
        everything = run.method.download(state, ClientInfo(info.client, ALL, info.has_ocr, 1))
        assert {n.split(".")[2] for n in everything if n.startswith("router.task.")} == set(ALL)
    frozen = create_method("mmrouter-moa", {"ocr_frozen_on_non_ocr": True})
    down = frozen.download(state, plain)
    assert {n for n in shared if is_ocr_part(n) and not n.startswith("router.task.")} <= set(down)
    assert {n for n in down if n.startswith("router.task.") and n.endswith(".to_ocr")} == {
        f"router.task.{t}.to_ocr" for t in plain.tasks
    }
    model.bind(STAGE2, plain.tasks, True)  # frozen: it holds the OCR parts but sends none of them
    assert not any(is_ocr_part(n) for n in frozen.upload(model, plain))


def test_router_entries_are_averaged_over_the_clients_that_train_them():
    """Hand-computed: the image / text / null logits over all three clients; a task's row over its
    holders; every OCR-expert column and the OCR branch over the OCR clients (a task row's OCR entry
    over the OCR clients holding the task); nothing comes from a client that could not train it."""
    method = create_method("mmrouter-moa")
    c0 = ClientInfo(0, ("vqa", "ocr_vqa"), True, 2)
    c1 = ClientInfo(1, ("vqa", "classification"), False, 1)
    c2 = ClientInfo(2, ("ocr_vqa", "grounding"), True, 1)
    payloads = {
        c0: {
            "router.image.weight": [[1.0]],
            "router.image.to_ocr": [[4.0]],
            "router.task.vqa.weight": [2.0],
            "router.task.vqa.to_ocr": [6.0],
            "router.task.ocr_vqa.weight": [1.0],
            "router.task.ocr_vqa.to_ocr": [3.0],
            "router.null.weight": [0.0],
            "router.null.to_ocr": [5.0],
            "router.ocr.weight": [[4.0]],
            "ocr_expert.up.bias": [1.0, 2.0],
        },
        c1: {
            "router.image.weight": [[4.0]],
            "router.task.vqa.weight": [5.0],
            "router.task.classification.weight": [7.0],
            "router.null.weight": [6.0],
        },
        c2: {
            "router.image.weight": [[-2.0]],
            "router.image.to_ocr": [[1.0]],
            "router.task.ocr_vqa.weight": [4.0],
            "router.task.ocr_vqa.to_ocr": [0.0],
            "router.task.grounding.weight": [9.0],
            "router.task.grounding.to_ocr": [2.0],
            "router.null.weight": [3.0],
            "router.null.to_ocr": [2.0],
            "router.ocr.weight": [[0.0]],
            "ocr_expert.up.bias": [5.0, -2.0],
        },
    }
    names = {n for p in payloads.values() for n in p} | {"router.task.classification.to_ocr"}
    for info, payload in payloads.items():  # each payload is exactly what the upload rule lets through
        assert {n for n in names if method.uploads(n, info)} == set(payload), info
    replies = [Reply(i, {n: t(v) for n, v in p.items()}, i.num_examples) for i, p in payloads.items()]
    assert method.group_of("router.task.vqa.to_ocr") == "ocr+task:vqa"
    assert {method.group_of(n) for r in replies for n in r.payload} == {
        "router:image",
        "router:null",
        "ocr",
        "task:vqa",
        "task:ocr_vqa",
        "task:classification",
        "task:grounding",
        "ocr+task:vqa",
        "ocr+task:ocr_vqa",
        "ocr+task:grounding",
    }
    new = method.aggregate({"router.task.classification.to_ocr": t([9.0])}, replies)
    expected = {
        "router.image.weight": [[(2 * 1 + 4 - 2) / 4]],  # all three
        "router.image.to_ocr": [[(2 * 4 + 1) / 3]],  # OCR clients 0, 2
        "router.task.vqa.weight": [(2 * 2 + 5) / 3],  # vqa holders 0, 1
        "router.task.vqa.to_ocr": [6.0],  # the only OCR client holding vqa
        "router.task.ocr_vqa.weight": [(2 * 1 + 4) / 3],
        "router.task.ocr_vqa.to_ocr": [(2 * 3 + 0) / 3],
        "router.task.classification.weight": [7.0],
        "router.task.classification.to_ocr": [9.0],  # its only holder has no OCR: kept
        "router.task.grounding.weight": [9.0],
        "router.task.grounding.to_ocr": [2.0],
        "router.null.weight": [(0 + 6 + 3) / 4],
        "router.null.to_ocr": [(2 * 5 + 2) / 3],
        "router.ocr.weight": [[(2 * 4 + 0) / 3]],
        "ocr_expert.up.bias": [(2 * 1 + 5) / 3, (2 * 2 - 2) / 3],
    }
    for name, value in expected.items():
        assert torch.allclose(new[name], t(value)), name


def test_image_only_router_reduces_exactly_to_pilot(tiny_prep, tmp_path):
    pilot_run = Run(tiny_prep, MethodEntry("pilot-ctmoa"), tmp_path / "p", backend=in_process)
    mm_run = Run(
        tiny_prep,
        MethodEntry("mmrouter-moa", {"router_inputs": "image", "ocr_expert": False}),
        tmp_path / "m",
        backend=in_process,
    )
    pilot, mm = pilot_run.build(), mm_run.build()
    assert all(torch.equal(a, b) for a, b in zip(pilot.state_dict().values(), mm.state_dict().values(), strict=True))
    _perturb(pilot)
    assert set(dict(pilot.named_parameters())) == set(dict(mm.named_parameters()))
    mm.load_state_dict(pilot.state_dict())  # Pilot's router (and experts) copied into mmrouter
    info = tiny_prep.infos[0]
    f = _features(pilot_run, pilot, client_context(pilot_run.prep, info, 0).train_rows[:7])
    for model in (pilot, mm):
        model.bind(STAGE2, info.tasks, info.has_ocr)
    with torch.no_grad():
        out_p, out_m = pilot.adapt(f), mm.adapt(f)
    assert torch.equal(pilot.routing, mm.routing)
    assert torch.equal(out_p.tokens, out_m.tokens)
    assert mm.expert_names == pilot.expert_names == list(ALL)


def test_router_branches_and_ocr_null(tiny_prep, tmp_path):
    run = Run(tiny_prep, MethodEntry("mmrouter-moa"), tmp_path, backend=in_process)
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
        table = torch.stack([torch.cat([r.task[n].weight, r.task[n].to_ocr]) for n in ALL])  # [T, E]
        null = torch.cat([r.null.weight, r.null.to_ocr])
        text = f.question @ torch.cat([r.text.weight, r.text.to_ocr]).T
        image = f.tokens @ torch.cat([r.image.weight, r.image.to_ocr]).T
        ocr = pooled @ torch.cat([r.ocr.weight, r.ocr.to_ocr]).T
        row = text + table[f.task_id] + torch.where(has, ocr, null)
        assert torch.allclose(logits, image + row[:, None], atol=1e-5)
        assert has[:3].all() and not has[3:].any()
        # a client without the OCR branch uses the null logits on every row
        no_ocr = r(f, False)
        assert torch.allclose(no_ocr, image + (text + table[f.task_id] + null)[:, None], atol=1e-5)
    text_only = Run(
        tiny_prep, MethodEntry("mmrouter-moa", {"router_inputs": "text+task"}), tmp_path / "b", backend=in_process
    ).build()
    assert not hasattr(text_only.router, "image") and not hasattr(text_only.router, "ocr")
    _perturb(text_only)
    text_only.bind(STAGE2, ALL, True)
    with torch.no_grad():
        lg = text_only.router(f, True)
        assert lg.shape == (6, 1, 5)
        text_only.adapt(f)
    assert text_only.routing.shape == (6, 5)


def test_client_without_ocr_routes_over_task_experts_only(tiny_prep, tmp_path):
    run = Run(tiny_prep, MethodEntry("mmrouter-moa"), tmp_path, backend=in_process)
    model = run.build()
    _perturb(model)
    f = _features(run, model, client_context(run.prep, tiny_prep.infos[0], 0).train_rows[:5])
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
def test_non_ocr_client_never_trains_ocr_parts_nor_foreign_task_rows(tiny_prep, tmp_path, frozen, train_client):
    run = Run(tiny_prep, MethodEntry("mmrouter-moa", {"ocr_frozen_on_non_ocr": frozen}), tmp_path, backend=in_process)
    model = run.build()
    _perturb(model)
    ocr, plain = _infos(tiny_prep)
    for r in (0, 1):  # its first participation (stage 1), its second (stage 2)
        before = trainable_state(model)
        train_client(run, model, plain, r)
        after = trainable_state(model)
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        assert not any(is_ocr_part(n) for n in changed)
        assert not any(n.startswith("router.task.") and n.split(".")[2] not in plain.tasks for n in changed)
        assert any(n.startswith("heads.") for n in changed)
    assert {f"router.task.{t}.weight" for t in plain.tasks} <= changed  # stage 2: its own rows train
    before = trainable_state(model)
    train_client(run, model, ocr, 1)
    after = trainable_state(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert {"router.image.to_ocr", "router.ocr.weight"} <= changed
    assert {f"router.task.{t}.to_ocr" for t in ocr.tasks} <= changed
    assert not any(n.startswith("router.task.") and n.split(".")[2] not in ocr.tasks for n in changed)


def test_bad_router_inputs_are_named():
    with pytest.raises(ValueError, match="router_inputs"):
        create_method("mmrouter-moa", {"router_inputs": "image+pixels"})
    with pytest.raises(ValueError, match="router_inputs"):
        create_method("mmrouter-moa", {"router_inputs": ""})
    assert create_method("mmrouter-moa", {"router_inputs": "ocr+task"}).options.router_inputs == ("ocr", "task")


def test_clients_route_over_the_ocr_expert_from_their_first_stage2_evaluation(tiny_run):
    """The shared TINY run (checked like every method's in test_methods): clients 0, 1 train in stage 1
    then 2 and are evaluated in stage 2 after round 0 already; the usage rows include the OCR expert."""
    done = tiny_run("mmrouter-moa")
    usage = done.of("usage")
    assert usage and {r["round"] for r in usage} == {0, 1}
    assert {r["expert"] for r in usage} == {*ALL, "ocr"}
    assert {(r["round"], r["stage"]) for r in done.of("train")} == {(0, 1), (1, 2)}


def test_stage2_update_trains_every_router_branch_from_its_zero_start(tiny_prep, tmp_path, train_client):
    """The text, task, OCR and null branches start at zero (the router starts as Pilot's); stage-2
    updates must move each of them, or the ablation would compare untrained inputs."""
    run = Run(tiny_prep, MethodEntry("mmrouter-moa"), tmp_path, backend=in_process)
    model = run.build()
    with torch.no_grad():  # experts that differ, as after stage 1 (fresh adapters all output zero)
        gen = torch.Generator().manual_seed(5)
        for name, p in model.named_parameters():
            if name.endswith("up.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    params = dict(model.named_parameters())
    ocr, plain = _infos(tiny_prep)
    rows = [f"router.task.{t}.{p}" for t in ocr.tasks for p in ("weight", "to_ocr")]
    row_branches = ("router.text.weight", "router.text.to_ocr", "router.ocr.weight", "router.ocr.to_ocr", *rows)
    nulls = ("router.null.weight", "router.null.to_ocr")
    assert all(torch.count_nonzero(params[n]) == 0 for n in (*row_branches, *nulls))
    train_client(run, model, ocr, 1)  # client 1's second participation: stage 2
    assert all(torch.count_nonzero(params[n]) > 0 for n in row_branches), [
        n for n in row_branches if not params[n].any()
    ]
    assert all(torch.count_nonzero(params[n]) == 0 for n in nulls)  # every row of an OCR client carries OCR text
    train_client(run, model, plain, 1)  # a client without OCR routes with the null logits
    assert torch.count_nonzero(params["router.null.weight"]) > 0
    assert torch.count_nonzero(params["router.null.to_ocr"]) == 0  # ... over the task experts only


def test_stage1_ocr_expert_acts_on_reading_rows_only(tiny_prep, tmp_path):
    """Every row of an OCR client carries OCR text; in stage 1 the OCR expert still acts only on the rows
    of tasks whose head reads it (OCR-VQA), not on a VQA row that happens to carry the same words."""
    run = Run(tiny_prep, MethodEntry("mmrouter-moa"), tmp_path, backend=in_process)
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
