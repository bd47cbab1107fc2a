"""LoRA on the query and value projections of a frozen attention block, per backbone family.

Methods call :func:`inject_lora` with their :class:`~fedbench.api.backbone.Backbone`; it dispatches on
``backbone.lora_backend`` to an injector registered in :data:`LORA_INJECTORS`:

- ``fedbench`` (the embedded and open_clip backbones): our own q/v LoRA below. open_clip's towers
  (and torch's ``nn.MultiheadAttention``) hold q, k and v in one fused ``in_proj_weight``, and peft
  can only adapt that fused matrix as a whole. The methods' papers adapt q and v, so we add
  ``scale · B @ A`` to the q and v row-slices through ``torch.nn.utils.parametrize``, which works
  for any module whose forward reads the weight.
- ``peft`` (Hugging Face CLIP, registered by :mod:`fedbench.backbones.hf_clip`): ``peft.LoraConfig``
  on the separate ``q_proj`` / ``v_proj`` Linear layers.

Both name their parameters ``….lora_A.<adapter>…`` / ``….lora_B.<adapter>…`` (ours end with the
adapter, peft's with ``.weight`` after it), so a method selects them by ``".lora_A." in name`` or
through :func:`lora_param` whatever the family, and both expose FedDPA's per-adapter ``mix`` /
``detached`` through :func:`lora_layers`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn
from torch.nn.utils import parametrize

from fedbench.utils.checks import POSITIVE, Bound, bounded

if TYPE_CHECKING:
    from fedbench.api.backbone import Backbone


@bounded(alpha=POSITIVE, dropout=Bound(0, 1, hi_open=True))
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


def inject_qv_lora(tower: nn.Module, spec: LoRASpec, adapters: tuple[str, ...] = ("default",)) -> list[LoRADelta]:
    """Attach a :class:`LoRADelta` to every q/v projection of ``tower``; returns them in order."""
    deltas = []
    for module, weight_name, slices in attention_qv_targets(tower):
        weight = getattr(module, weight_name)
        delta = LoRADelta(weight.shape[0], weight.shape[1], slices, spec, adapters)
        parametrize.register_parametrization(module, weight_name, delta, unsafe=True)
        deltas.append(delta)
    return deltas


class LoRAInjector(Protocol):
    """Adds LoRA (every adapter in ``adapters`` trainable, only the first active) to the q and v
    projections of ``tower`` in place; returns the adapted layers in order."""

    def __call__(self, tower: nn.Module, spec: LoRASpec, adapters: tuple[str, ...]) -> list[nn.Module]: ...


LORA_INJECTORS: dict[str, LoRAInjector] = {"fedbench": inject_qv_lora}


def register_lora_injector(name: str) -> Callable[[LoRAInjector], LoRAInjector]:
    """Decorator: register a backbone family's LoRA injector under ``name`` (a ``lora_backend``)."""

    def wrap(fn: LoRAInjector) -> LoRAInjector:
        if name in LORA_INJECTORS and LORA_INJECTORS[name] is not fn:
            raise ValueError(f"LoRA injector '{name}' is already registered")
        LORA_INJECTORS[name] = fn
        return fn

    return wrap


def inject_lora(
    target: Backbone | nn.Module, spec: LoRASpec, adapters: tuple[str, ...] = ("default",)
) -> list[nn.Module]:
    """LoRA on the q and v projections where the backbone family puts it, by the family's injector:
    a CLIP backbone's image tower, a generative VLM's language model (its ``lora_target``).

    ``target`` is a backbone (what methods pass: its ``lora_backend`` picks the injector, so the
    transformers families go through peft) or a bare tower, which gets fedbench's own LoRA. Returns
    the adapted layers (:class:`LoRADelta` or peft ``LoraLayer``).
    """
    if getattr(target, "lora_backend", None) is None:
        return list(inject_qv_lora(target, spec, adapters))
    try:
        injector = LORA_INJECTORS[target.lora_backend]
    except KeyError:
        raise ValueError(
            f"backbone '{target.name}' asks for LoRA backend '{target.lora_backend}', which is not registered "
            f"(available: {', '.join(sorted(LORA_INJECTORS))})"
        ) from None
    return injector(getattr(target, "lora_target", None) or target.image_tower, spec, adapters)


def lora_param(name: str) -> tuple[str, str] | None:
    """``("A" | "B", adapter)`` for a LoRA parameter name of either family, else None.

    fedbench's: ``….lora_A.<adapter>``; peft's: ``….lora_A.<adapter>.weight``.
    """
    parts = name.split(".")
    if parts[-1] == "weight" and len(parts) >= 3 and parts[-3] in ("lora_A", "lora_B"):
        return parts[-3][-1], parts[-2]
    if len(parts) >= 2 and parts[-2] in ("lora_A", "lora_B"):
        return parts[-2][-1], parts[-1]
    return None


class PeftMix:
    """A peft ``LoraLayer`` seen through :class:`LoRADelta`'s ``mix`` / ``detached`` (FedDPA's mixing).

    ``mix = {adapter: w}`` makes exactly those adapters with w != 0 active (in that order) and sets
    each one's peft ``scaling`` to ``w · alpha / rank``, so the layer computes
    ``W0 x + Σ w · s · B A dropout(x)``. ``detached`` adapters are frozen (``requires_grad`` False,
    the previous flags restored when they are attached again): like :class:`LoRADelta`'s
    ``detach()``, they contribute to the output and pass gradient to the layer's input, but receive
    none themselves. The state lives on the layer, so any number of views agree.
    """

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def _params(self, adapter: str) -> list[nn.Parameter]:
        return [*self.layer.lora_A[adapter].parameters(), *self.layer.lora_B[adapter].parameters()]

    @property
    def mix(self) -> dict[str, float]:
        return dict(self.layer.__dict__.get("_fedbench_mix", {a: 1.0 for a in self.layer.active_adapters}))

    @mix.setter
    def mix(self, mix: dict[str, float]) -> None:
        self.layer.__dict__["_fedbench_mix"] = dict(mix)
        for adapter in self.layer.lora_A:
            self.layer.scaling[adapter] = self.layer.lora_alpha[adapter] / self.layer.r[adapter] * mix.get(adapter, 0.0)
        self.layer._active_adapter = [a for a, w in mix.items() if w != 0.0]  # peft's set_adapter would toggle flags

    @property
    def detached(self) -> set[str]:
        return set(self.layer.__dict__.get("_fedbench_detached", {}))

    @detached.setter
    def detached(self, names: Iterable[str]) -> None:
        names = set(names)
        saved: dict[str, list[bool]] = self.layer.__dict__.setdefault("_fedbench_detached", {})
        for adapter in [a for a in saved if a not in names]:
            for p, flag in zip(self._params(adapter), saved.pop(adapter), strict=True):
                p.requires_grad_(flag)
        for adapter in names - set(saved):
            saved[adapter] = [p.requires_grad for p in self._params(adapter)]
            for p in self._params(adapter):
                p.requires_grad_(False)


def lora_layers(model: nn.Module) -> list[LoRADelta | PeftMix]:
    """Every LoRA layer of ``model`` in module order, each with ``mix`` and ``detached`` (either family).

    The order is the model's own: peft re-registers ``q_proj`` after ``v_proj``, so pair two models'
    layers by module, not by position.
    """
    peft_lora = sys.modules.get("peft.tuners.lora")  # no peft layer exists unless peft was imported
    peft_layer = peft_lora.LoraLayer if peft_lora is not None else ()
    layers: list[LoRADelta | PeftMix] = []
    for module in model.modules():
        if isinstance(module, LoRADelta):
            layers.append(module)
        elif isinstance(module, peft_layer):
            layers.append(PeftMix(module))
    return layers


class LoRAMixing:
    """A client model with several named LoRA adapters in its layers (a mixin: FedDPA's global and local,
    FedMix's experts on a VLM): which adapters every LoRA layer mixes, and with what weights."""

    def deltas(self) -> list[LoRADelta | PeftMix]:
        return lora_layers(self)  # fedbench's LoRADelta or peft's layers, each with mix / detached

    @contextmanager
    def mixed(self, mix: Mapping[str, float], detached: Sequence[str] = ()) -> Iterator[None]:
        """Every LoRA layer computes W0 + s·Σ mix[a]·ΔW_a (``detached`` ones without gradient); restored after."""
        deltas = self.deltas()
        saved = [(d.mix, d.detached) for d in deltas]
        try:
            for d in deltas:
                d.mix, d.detached = {k: float(v) for k, v in mix.items()}, set(detached)
            yield
        finally:
            for d, (m, det) in zip(deltas, saved, strict=True):
                d.mix, d.detached = m, det
