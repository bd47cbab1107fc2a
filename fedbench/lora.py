"""LoRA on the query and value projections of a frozen attention block.

Why not peft here: open_clip's towers (and torch's ``nn.MultiheadAttention``) hold q, k and v
in one fused ``in_proj_weight``, and peft can only adapt that fused matrix as a whole. The
methods' papers adapt q and v, so we add ``scale · B @ A`` to the q and v row-slices through
``torch.nn.utils.parametrize``, which works for any module whose forward reads the weight
(fused in_proj, or separate ``q_proj``/``v_proj`` Linear layers of Hugging Face CLIP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize


@dataclass(frozen=True)
class LoRASpec:
    """LoRA's rank, alpha and dropout (``scale = alpha / rank``, as in the LoRA paper), validated.

    Declared once: a method with LoRA uses it as its options (``fedavg-lora``) or subclasses it with
    its own fields (``feddpa``), so every such method takes ``rank``, ``alpha`` and ``dropout``
    (``--methods fedavg-lora:rank=4``) with the same defaults (FedIT's) and the same checks.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank = {self.rank!r} must be an integer >= 1")
        if not self.alpha > 0:
            raise ValueError(f"alpha = {self.alpha!r} must be > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout = {self.dropout!r} must be in [0, 1)")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def lora(self) -> LoRASpec:
        """The LoRA fields alone (of a method's options that extend this class)."""
        return LoRASpec(self.rank, self.alpha, self.dropout)


class LoRADelta(nn.Module):
    """Low-rank update of selected row-slices of a weight: W + scale · pad(B @ A).

    Holds one (A, B) pair per adapter name so FedDPA-style global/local adapters share a
    layer; ``mix`` weights each adapter (a detached adapter contributes without gradient).
    Dropout on the adapter input (standard LoRA) is applied as dropout on A's columns, the
    weight-space equivalent for a parametrization.
    """

    def __init__(
        self,
        out_features: int,
        in_features: int,
        slices: list[slice],
        spec: LoRASpec,
        adapters: tuple[str, ...] = ("default",),
    ) -> None:
        super().__init__()
        self.slices = slices
        self.spec = spec
        self.out_features = out_features
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in adapters:
            self.lora_A[name] = nn.Parameter(torch.empty(len(slices), spec.rank, in_features))
            self.lora_B[name] = nn.Parameter(torch.zeros(len(slices), slices[0].stop - slices[0].start, spec.rank))
            nn.init.kaiming_uniform_(self.lora_A[name].view(-1, in_features), a=math.sqrt(5))
        self.mix: dict[str, float] = {adapters[0]: 1.0}
        self.detached: set[str] = set()
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()

    def delta(self) -> torch.Tensor:
        total = None
        for name, weight in self.mix.items():
            if weight == 0.0:
                continue
            a, b = self.dropout(self.lora_A[name]), self.lora_B[name]
            d = torch.bmm(b, a) * (self.spec.scale * weight)  # [n_slices, rows, in]
            if name in self.detached:
                d = d.detach()
            total = d if total is None else total + d
        return total

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        d = self.delta()
        if d is None:
            return weight
        pieces = []
        cursor = 0
        for i, sl in enumerate(self.slices):
            if sl.start > cursor:
                pieces.append(torch.zeros(sl.start - cursor, weight.shape[1], dtype=weight.dtype, device=weight.device))
            pieces.append(d[i].to(weight.dtype))
            cursor = sl.stop
        if cursor < weight.shape[0]:
            pieces.append(
                torch.zeros(weight.shape[0] - cursor, weight.shape[1], dtype=weight.dtype, device=weight.device)
            )
        return weight + torch.cat(pieces, 0)


def attention_qv_targets(tower: nn.Module) -> list[tuple[nn.Module, str, list[slice]]]:
    """(module, weight name, [q rows, v rows]) for every attention block of a tower."""
    targets: list[tuple[nn.Module, str, list[slice]]] = []
    for module in tower.modules():
        if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            d = module.embed_dim
            targets.append((module, "in_proj_weight", [slice(0, d), slice(2 * d, 3 * d)]))
        elif hasattr(module, "in_proj_weight") and isinstance(getattr(module, "in_proj_weight", None), nn.Parameter):
            d = module.in_proj_weight.shape[1]  # open_clip's custom Attention
            targets.append((module, "in_proj_weight", [slice(0, d), slice(2 * d, 3 * d)]))
        elif hasattr(module, "q_proj") and hasattr(module, "v_proj") and isinstance(module.q_proj, nn.Linear):
            for proj in (module.q_proj, module.v_proj):  # Hugging Face CLIP attention
                targets.append((proj, "weight", [slice(0, proj.out_features)]))
    if not targets:
        raise ValueError(f"no attention q/v projections found in {type(tower).__name__}")
    return targets


def inject_lora(tower: nn.Module, spec: LoRASpec, adapters: tuple[str, ...] = ("default",)) -> list[LoRADelta]:
    """Attach a :class:`LoRADelta` to every q/v projection of ``tower``; returns them in order."""
    deltas = []
    for module, weight_name, slices in attention_qv_targets(tower):
        weight = getattr(module, weight_name)
        delta = LoRADelta(weight.shape[0], weight.shape[1], slices, spec, adapters)
        parametrize.register_parametrization(module, weight_name, delta, unsafe=True)
        deltas.append(delta)
    return deltas
