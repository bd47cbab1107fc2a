"""Payloads: flat name -> tensor maps, serialized with safetensors on every backend.

The byte ledger counts ``len(serialize(payload))``: the bytes that cross the network, header
included. :func:`analytic_bytes` is the Σ numel × element-size count the header adds to.
"""

from __future__ import annotations

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

Payload = dict[str, torch.Tensor]


def serialize(payload: Payload) -> bytes:
    """Serialize to safetensors bytes (tensors made contiguous, detached, on CPU).

    An empty payload is no message: ``b""`` (0 bytes on the ledger), not the 16-byte header of an
    empty safetensors file; a method that sends nothing (``local-only``) costs nothing."""
    if not payload:
        return b""
    return st_save({k: v.detach().to("cpu").contiguous() for k, v in payload.items()})


def deserialize(blob: bytes) -> Payload:
    return st_load(blob) if blob else {}


def analytic_bytes(payload: Payload) -> int:
    """Σ numel × element size: the tensor data without the serialization header."""
    return sum(t.numel() * t.element_size() for t in payload.values())


def header_bytes(blob: bytes) -> int:
    """Size of a safetensors blob's header (8-byte length prefix + JSON header)."""
    return 8 + int.from_bytes(blob[:8], "little")


class ContractError(RuntimeError):
    """A method broke the shared/local contract (e.g. uploaded a local tensor)."""


META = "meta."  # prefix of message tensors that are not parameters (e.g. FedMix's gate mass)


def check_upload(payload: Payload, shared: set[str], local: set[str], method: str) -> None:
    """Reject an upload carrying any tensor that is not tagged shared.

    Tensors named ``meta.*`` are message metadata a method declares (routing statistics,
    selections); they are not parameters, cross the network and are counted like any other.
    """
    leaked = sorted(k for k in payload if k in local)
    if leaked:
        raise ContractError(
            f"method '{method}' uploaded local tensor(s) {leaked[:3]}: local tensors never leave a client"
        )
    unknown = sorted(k for k in payload if k not in shared and not k.startswith(META))
    if unknown:
        raise ContractError(
            f"method '{method}' uploaded tensor(s) {unknown[:3]} that are not tagged shared; "
            f"shared tensors are: {sorted(shared)[:5]}{' ...' if len(shared) > 5 else ''}"
        )
