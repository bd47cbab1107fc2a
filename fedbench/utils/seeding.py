"""Seeded streams and the client sampler: the same draws on every backend."""

from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple (run seed, round, client, purpose): independent streams."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sample_clients(seed: int, round_: int, num_clients: int, fraction: float) -> list[int]:
    """The clients (partition ids) sampled in ``round_``: fedbench's own seeded draw, never a
    backend's (Flower samples node ids from the global ``random``, which seeds cannot reproduce)."""
    k = max(1, round(fraction * num_clients))
    rng = np.random.default_rng(derive_seed(seed, round_, "sample"))
    return sorted(rng.choice(num_clients, size=k, replace=False).tolist())


def participations(seed: int, client: int, before: int, num_clients: int, fraction: float) -> int:
    """How many of the rounds ``0 .. before-1`` sampled ``client``."""
    return sum(client in sample_clients(seed, q, num_clients, fraction) for q in range(before))
