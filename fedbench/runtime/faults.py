"""Faults of a federated round, decided by the server loop: who drops out, who straggles, who misses
the deadline (the protocol's ``[faults]``), and which replies cannot be aggregated (non-finite).

Every decision is a pure function of (run seed, round, client) through its own seeded stream
(:func:`fedbench.utils.seeding.derive_seed`), drawn on the server before any message is sent: the same
clients fail in every method row of a seed (so rows stay paired), and on every backend, since a
backend only carries the result (a straggler's step count travels in its message).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedbench.config.protocol import FaultsConfig
from fedbench.utils.seeding import derive_seed

DROPOUT, DEADLINE, NONFINITE, ERROR = "dropout", "deadline", "nonfinite", "error"


@dataclass(frozen=True)
class ClientFault:
    """What the round holds for one sampled client: ``drop`` (``dropout`` or ``deadline``; None: it
    takes part), the local steps it runs (0 when dropped), whether it straggles, and its simulated
    time (in steps of a full-speed client) to finish its full local update."""

    drop: str | None
    steps: int
    straggler: bool
    sim_time: float

    def record(self, faults: FaultsConfig) -> dict:
        """The fields a train record of a run with faults carries."""
        out: dict = {"steps": self.steps, "straggler": self.straggler}
        if faults.deadline:
            out["sim_time"] = self.sim_time
        return out

    def reason(self, faults: FaultsConfig) -> str:
        if self.drop == DROPOUT:
            return f"fault: dropped out (faults.dropout = {faults.dropout:g})"
        return f"fault: missed the deadline ({self.sim_time:g} > faults.deadline = {faults.deadline:g} steps)"


def plan_faults(
    seed: int, round_: int, clients: Sequence[int], faults: FaultsConfig, steps: int
) -> dict[int, ClientFault]:
    """Per sampled client: its fault in round ``round_`` (see :class:`~fedbench.config.protocol.FaultsConfig`).

    Each client draws two uniforms from its own stream, in a fixed order (dropout, straggler), so one
    probability never changes who is hit by the other."""
    out = {}
    for c in clients:
        u_drop, u_slow = np.random.default_rng(derive_seed(seed, round_, c, "faults")).random(2)
        straggler = bool(u_slow < faults.stragglers)
        speed = faults.straggler_steps if straggler else 1.0
        sim_time = steps / speed
        done = steps
        drop = None
        if u_drop < faults.dropout:
            drop = DROPOUT
        elif faults.deadline:
            drop = DEADLINE if sim_time > faults.deadline else None
        elif straggler:  # no deadline: the round ends when the full-speed clients are done
            done = max(1, math.floor(faults.straggler_steps * steps + 1e-9))
        out[c] = ClientFault(drop, 0 if drop else done, straggler, round(sim_time, 6))
    return out


def error_line(err: BaseException) -> str:
    """``Type: first line of the message``: what a record says of a client step or a row that raised."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def nonfinite(payload: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``payload`` that hold NaN or Inf."""
    return sorted(n for n, t in payload.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
