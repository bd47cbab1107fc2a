import pytest
import torch
from torch import nn

from fedbench.adapters.lora import LoRASpec, inject_lora


def _tower():
    torch.manual_seed(0)
    return nn.Sequential(nn.MultiheadAttention(16, 2, batch_first=True))


def test_lora_starts_as_identity_and_touches_only_q_and_v():
    tower = _tower()
    mha = tower[0]
    base = mha.in_proj_weight.detach().clone()
    (delta,) = inject_lora(tower, LoRASpec(rank=2, alpha=4, dropout=0.0))
    assert torch.equal(mha.in_proj_weight, base)  # B = 0 at init
    with torch.no_grad():
        delta.lora_B["default"].fill_(0.5)
    diff = (mha.in_proj_weight - base).abs().sum(1)
    assert (diff[:16] > 0).all(), "q rows adapted"
    assert (diff[16:32] == 0).all(), "k rows untouched"
    assert (diff[32:] > 0).all(), "v rows adapted"


def test_gradients_reach_only_lora_parameters():
    tower = _tower()
    for p in tower.parameters():
        p.requires_grad_(False)
    inject_lora(tower, LoRASpec(rank=2, alpha=4, dropout=0.0))
    x = torch.randn(3, 5, 16)
    out, _ = tower[0](x, x, x)
    out.sum().backward()
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is None for n, p in tower.named_parameters() if "lora_" not in n)


def test_lora_param_reads_both_families_names():
    from fedbench.adapters.lora import lora_param

    assert lora_param("backbone.towers.visual.attn.parametrizations.in_proj_weight.0.lora_A.default") == (
        "A",
        "default",
    )
    assert lora_param("backbone.towers.vision_model.encoder.layers.0.self_attn.q_proj.lora_B.global.weight") == (
        "B",
        "global",
    )
    assert lora_param("backbone.towers.vision_model.encoder.layers.0.self_attn.q_proj.base_layer.weight") is None
    assert lora_param("heads.vqa.out.weight") is None


def test_a_backbone_dispatches_to_its_familys_injector(backbone):
    import copy

    from fedbench.adapters.lora import LORA_INJECTORS, LoRADelta

    assert backbone.lora_backend == "fedbench" and LORA_INJECTORS["fedbench"] is not None
    bb = copy.deepcopy(backbone)
    layers = inject_lora(bb, LoRASpec(rank=2))
    assert layers and all(isinstance(m, LoRADelta) for m in layers)
    bb.lora_backend = "nope"
    with pytest.raises(ValueError, match="LoRA backend 'nope', which is not registered"):
        inject_lora(bb, LoRASpec(rank=2))
