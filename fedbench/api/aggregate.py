"""Aggregation rules as small pure functions of the clients' replies (Flower strategy_utils style)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedbench.api.payload import Payload


def weighted_mean(payloads: Sequence[Payload], weights: Sequence[float]) -> Payload:
    """Per-tensor weighted mean over the payloads that carry each tensor.

    A tensor present in only some payloads is averaged over those (weights renormalised), so
    group-wise rules (per task, OCR clients only) are this function on the group's replies.
    """
    if len(payloads) != len(weights):
        raise ValueError(f"{len(payloads)} payloads but {len(weights)} weights")
    keys = dict.fromkeys(k for p in payloads for k in p)
    out: Payload = {}
    for key in keys:
        pairs = [(p[key], float(w)) for p, w in zip(payloads, weights, strict=True) if key in p]
        total = sum(w for _, w in pairs)
        if total <= 0:
            raise ValueError(f"aggregation weights for '{key}' sum to {total}; they must be positive")
        acc = torch.zeros_like(pairs[0][0], dtype=torch.float64)
        for tensor, w in pairs:
            acc += tensor.to(torch.float64) * (w / total)
        out[key] = acc.to(pairs[0][0].dtype)
    return out
