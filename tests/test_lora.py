import torch
from torch import nn

from fedbench.lora import LoRASpec, inject_lora


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
