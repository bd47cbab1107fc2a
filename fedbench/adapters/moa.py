"""Shared Mixture-of-Adapters mechanics: adapters, routers, MoE losses, aggregation groups.

Every MoA method builds from these; a method file holds only what makes it that method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedbench.api.aggregate import weighted_mean
from fedbench.api.payload import Payload


class Adapter(nn.Module):
    """Bottleneck adapter (Houlsby et al. 2019): LayerNorm -> down -> GELU -> up.

    Returns the residual *delta* only (callers add it), with ``up`` zero-initialised so a fresh
    adapter starts as the identity of the frozen features.
    """

    def __init__(self, dim: int, bottleneck: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(self.norm(x))))


def route(logits: torch.Tensor, top_k: int = 0) -> torch.Tensor:
    """Softmax routing weights; with ``top_k > 0`` only the k largest survive, renormalised."""
    probs = logits.softmax(-1)
    if top_k and top_k < probs.shape[-1]:
        kept = torch.zeros_like(probs).scatter(-1, probs.topk(top_k, -1).indices, 1.0)
        probs = probs * kept
        probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-9)
    return probs


def load_balance_loss(probs: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load balance: E · Σ_e f_e · P_e over all routed items.

    f_e is the fraction of items whose top-1 expert is e, P_e the mean routing probability of e;
    it equals 1 when routing is uniform.
    """
    flat = probs.reshape(-1, probs.shape[-1])
    n_experts = flat.shape[-1]
    fraction = F.one_hot(flat.argmax(-1), n_experts).float().mean(0)
    return n_experts * (fraction * flat.mean(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-sum-exp of the router logits."""
    return torch.logsumexp(logits.reshape(-1, logits.shape[-1]), -1).pow(2).mean()


def orthogonality_penalty(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared inner product of the L2-normalised outputs of two parallel adapters."""
    return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1).pow(2).mean()


def mixture(experts: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Σ_e weights[..., e] · experts[e], weights broadcast over the experts' trailing dims."""
    stacked = torch.stack(list(experts), -1)  # [..., D, E]
    return (stacked * weights.unsqueeze(-2)).sum(-1)


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-9).log()).sum(-1)


def grouped_mean(
    payloads: Sequence[Payload], weights: Sequence[float], group_of: Callable[[str], str]
) -> dict[str, Payload]:
    """Weighted mean within each group of tensor names (e.g. per task, or OCR-only).

    Each payload only carries the tensors of the groups its client belongs to, so a group's
    tensors are averaged over exactly its members.
    """
    out: dict[str, Payload] = {}
    for name, tensor in weighted_mean(payloads, weights).items():
        out.setdefault(group_of(name), {})[name] = tensor
    return out


def distance_weighted(payloads: Sequence[Payload], examples: Sequence[float], nearest: int) -> list[Payload]:
    """Per-client aggregates (Pilot's rule for its language-side LoRA).

    For client k: the ``nearest`` other clients by L2 distance between their flattened payloads,
    each weighted ∝ 1/d(k, i); that neighbour average is mixed with the client's own payload by
    example counts (own n_k against the neighbours' total n). Returns one payload per client.
    """
    names = sorted(set.intersection(*(set(p) for p in payloads)))
    flat = torch.stack([torch.cat([p[n].flatten().double() for n in names]) for p in payloads])
    dist = torch.cdist(flat, flat)
    out = []
    for k in range(len(payloads)):
        others = [i for i in torch.argsort(dist[k]).tolist() if i != k][:nearest]
        if not others:
            out.append(dict(payloads[k]))
            continue
        inv = [1.0 / max(float(dist[k, i]), 1e-12) for i in others]
        neighbour = weighted_mean([payloads[i] for i in others], inv)
        n_neigh = sum(examples[i] for i in others)
        mixed = weighted_mean([payloads[k], neighbour], [examples[k], n_neigh])
        out.append({n: mixed[n] for n in names})
    return out
