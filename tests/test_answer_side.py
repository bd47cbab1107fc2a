"""The answer side: one shared trunk + thin task outputs (default), or full per-task heads."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TINY

from fedbench.api.model import AnswerHead, AnswerOutput, BoxHead, BoxOutput, attention_box
from fedbench.backends.inprocess import in_process
from fedbench.config.protocol import ModelConfig, ProtocolError
from fedbench.config.toml_file import from_dict
from fedbench.runtime.server import Run


def _run(prep, tmp_path, answer_side):
    proto = TINY.replace(model=ModelConfig(answer_side))
    return Run(dataclasses.replace(prep, protocol=proto), proto.methods[0], tmp_path, backend=in_process)


def test_shared_trunk_serves_every_task_and_every_client_exchanges_it(tiny_prep, tmp_path):
    run = _run(tiny_prep, tmp_path, "shared")
    model = run.build()
    assert model.trunk is not None
    assert all(isinstance(h, (AnswerOutput, BoxOutput)) for h in model.heads.values())
    trunk = {n for n, p in model.named_parameters() if n.startswith("trunk.")}
    for info in tiny_prep.infos:  # whatever its tasks, a client sends the trunk and its tasks' outputs
        up = run.method.upload(model, info)
        assert trunk <= set(up)
        assert {n.split(".")[1] for n in up if n.startswith("heads.")} == set(info.tasks)
    # a thin output is far smaller than the trunk it sits on
    out = sum(p.numel() for p in model.heads["vqa"].parameters())
    assert out < sum(p.numel() for n, p in model.named_parameters() if n in trunk) / 4


def test_per_task_heads_have_no_trunk_and_run(tiny_prep, tmp_path):
    run = _run(tiny_prep, tmp_path, "per_task")
    model = run.build()
    assert model.trunk is None and not any(n.startswith("trunk.") for n, _ in model.named_parameters())
    assert all(isinstance(h, (AnswerHead, BoxHead)) for h in model.heads.values())
    run.execute()
    assert run.completed()


def test_answer_side_is_validated_with_its_choices():
    with pytest.raises(ProtocolError, match=r"model.answer_side.*'everything'.*shared, per_task, frozen_trunk"):
        from_dict({"model": {"answer_side": "everything"}})


def test_attention_box_is_the_attention_centroid_with_the_predicted_size():
    weights = torch.zeros(1, 16)  # a 4x4 patch grid, all attention on the patch at row 1, column 2
    weights[0, 1 * 4 + 2] = 1.0
    box = attention_box(weights, torch.tensor([[0.0, 0.0, 0.0, 0.0]]))  # no nudge, sigmoid(0) = 0.5 sizes
    cx, cy = (2 + 0.5) / 4, (1 + 0.5) / 4
    assert torch.allclose(box, torch.tensor([[cx - 0.25, cy - 0.25, cx + 0.25, cy + 0.25]]))


def test_frozen_trunk_is_neither_trained_nor_sent(tiny_prep, tmp_path):
    run = _run(tiny_prep, tmp_path, "frozen_trunk")
    model = run.build()
    trunk = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("trunk.")}
    assert trunk and not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("trunk."))
    assert not any(n.startswith("trunk.") for n in run.method.tags(model))
    assert all(isinstance(h, (AnswerOutput, BoxOutput)) for h in model.heads.values())
    up = run.method.upload(model, tiny_prep.infos[0])
    assert up and not any(n.startswith("trunk.") for n in up)
    run.execute()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in trunk.items())  # still the seeded init
