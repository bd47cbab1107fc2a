"""Checkpoints: the server state and the clients' stored states after the last completed round,
written atomically, so a killed run resumes to the same records (never read with pickle)."""

from __future__ import annotations

from pathlib import Path

import torch

from fedbench.payload import Payload
from fedbench.records import append_records, read_jsonl

State = dict[str, torch.Tensor]


class CheckpointMismatch(RuntimeError):
    """A checkpoint that the current code cannot resume."""


class Checkpoint:
    """``path`` holds {round, server_state, client_states, trainable}; ``trainable`` names the model's
    trainable tensors, so a checkpoint of other code is refused rather than half-loaded."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def save(self, next_round: int, server: Payload, clients: dict[int, State] | None, init: State) -> None:
        if clients is None:  # the clients' states live on their nodes: nothing here resumes them
            return
        tmp = self.path.with_suffix(".tmp")
        body = {"round": next_round, "server_state": server, "client_states": clients}
        torch.save({**body, "trainable": sorted(init)}, tmp)
        tmp.replace(self.path)

    def load(self, init: State) -> tuple[int, Payload, dict[int, State]] | None:
        if not self.path.is_file():
            return None
        ckpt = torch.load(self.path, weights_only=True)
        if sorted(ckpt.get("trainable", [])) != sorted(init):
            raise CheckpointMismatch(
                f"checkpoint '{self.path}' was written by a model with other parameters "
                "(code changed since); remove that run directory or use another --results"
            )
        return ckpt["round"], ckpt["server_state"], ckpt["client_states"]

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def truncate_records(path: Path, next_round: int) -> None:
    """Drop records of rounds from ``next_round`` on (a kill between append and checkpoint)."""
    if not path.is_file():
        return
    keep = [r for r in read_jsonl(path) if r.get("round", -1) < next_round]
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    append_records(tmp, keep)
    tmp.replace(path)
