"""pFedMoE (Yi et al., arXiv 2402.01350; docs/methods.md §3).

The method's description, harness choices included, is the class docstring (shown by
``fedbench describe``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedbench.adapters.moa import Adapter
from fedbench.api.backbone import Backbone
from fedbench.api.batch import Batch, Features
from fedbench.api.method import ClientInfo, Method, Tag, register_method
from fedbench.api.model import ClientModel
from fedbench.api.task import TaskSpec

if TYPE_CHECKING:
    from fedbench.api.context import ClientContext

PIXEL_SIDE = 16  # the pixel gate sees the image at 16x16x3


@dataclass(frozen=True)
class PFedMoEOptions:
    """Global expert width, per-client local widths, gate input and hidden width."""

    global_width: int = 16
    local_widths: tuple[int, ...] = (32,)
    gate_input: Literal["pixels", "features"] = "pixels"
    gate_hidden: int = 64

    def __post_init__(self) -> None:
        if self.global_width < 1:
            raise ValueError(f"global_width = {self.global_width} must be >= 1")
        if not self.local_widths or min(self.local_widths) < 1:
            raise ValueError(f"local_widths = {self.local_widths} must be a non-empty tuple of ints >= 1")
        if self.gate_hidden < 1:
            raise ValueError(f"gate_hidden = {self.gate_hidden} must be >= 1")


@dataclass
class GatedFeatures(Features):
    """Features plus what the local gate reads (pixels or pooled features), row-aligned."""

    gate_input: torch.Tensor  # [B, D_gate]


def downsample(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float [B, 3·16·16] in [0, 1] (area average)."""
    x = images.float() / 255.0
    return F.adaptive_avg_pool2d(x, PIXEL_SIDE).flatten(1)


class PFedMoEModel(ClientModel):
    """Frozen towers -> gated global + local adapters on the patch tokens -> local answer side."""

    def __init__(
        self, backbone: Backbone, tasks: list[TaskSpec], options: PFedMoEOptions, answer_side: str = "shared"
    ) -> None:
        super().__init__(backbone, tasks, answer_side)
        dt, de = backbone.token_dim, backbone.embed_dim
        self.options = options
        self.global_expert = Adapter(dt, options.global_width)
        self.local_expert = Adapter(dt, max(options.local_widths))
        gate_in = 3 * PIXEL_SIDE * PIXEL_SIDE if options.gate_input == "pixels" else 2 * de
        self.gate = nn.Sequential(
            nn.LayerNorm(gate_in),
            nn.Linear(gate_in, options.gate_hidden),
            nn.Sigmoid(),
            nn.Linear(options.gate_hidden, 2),
        )
        self.expert_names = ["global", "local"]
        self.local_width = max(options.local_widths)

    def set_client(self, client: ClientInfo) -> None:
        """The client's local-expert width (model-heterogeneous setting)."""
        widths = self.options.local_widths
        self.local_width = widths[client.client % len(widths)]

    def encode(self, batch: Batch, cached: tuple[torch.Tensor, torch.Tensor] | None = None) -> GatedFeatures:
        f = super().encode(batch, cached)
        if self.options.gate_input == "features":
            gate_input = torch.cat([f.image, f.question], -1)
        else:
            gate_input = downsample(batch.images)
        return GatedFeatures(**{k: getattr(f, k) for k in Features.__dataclass_fields__}, gate_input=gate_input)

    def local_delta(self, tokens: torch.Tensor) -> torch.Tensor:
        """L(tokens) with the bottleneck units past this client's width masked out."""
        lx = self.local_expert
        hidden = F.gelu(lx.down(lx.norm(tokens)))
        if self.local_width < hidden.shape[-1]:
            keep = torch.arange(hidden.shape[-1], device=hidden.device) < self.local_width
            hidden = hidden * keep
        return lx.up(hidden)

    def adapt(self, f: GatedFeatures) -> Features:
        alpha = self.gate(f.gate_input).softmax(-1)  # [B, 2]: (α_global, α_local)
        self.routing = alpha
        a_g, a_l = alpha[:, 0, None, None], alpha[:, 1, None, None]
        tokens = f.tokens + a_g * self.global_expert(f.tokens) + a_l * self.local_delta(f.tokens)
        return replace(f, tokens=tokens)


@register_method("pfedmoe")
class PFedMoE(Method):
    """pFedMoE (Yi et al.): https://arxiv.org/abs/2402.01350 (docs/methods.md §3).

    - Shared: a small **global expert** G (a bottleneck adapter of width ``global_width`` on the
      patch tokens, the same shape on every client); the server takes its example-weighted mean.
      Only G goes up and comes down.
    - Local: a **local expert** L (an adapter whose width may differ per client: the
      model-heterogeneous setting), a **local gate** (LayerNorm -> Linear(·, m) -> Sigmoid ->
      Linear(m, 2) -> Softmax, m = ``gate_hidden``) and the answer side (the shared trunk and the
      thin task outputs: the paper's local head).
    - Representation: tokens' = tokens + α_g·G(tokens) + α_l·L(tokens) with per-row (α_g, α_l)
      from the gate; since α_g + α_l = 1 this is α_g·(x + G(x)) + α_l·(x + L(x)). The pooled
      image embedding is unchanged. G, L, gate and heads train together, end to end, in one pass.

    Simplifications / harness choices (the official code is not public; these are ours):
    - Experts are adapters on frozen CLIP patch tokens (the paper's experts are CNN extractors).
    - Gate input ``gate_input=pixels`` (default, as in the paper: the raw image) uses the image
      downsampled to 16x16x3 (768 values in [0, 1]) to keep it small on CPU;
      ``gate_input=features`` uses the frozen pooled image + question embeddings instead.
    - Per-client local widths: ``local_widths`` is a tuple; client c uses the
      entry c mod len(local_widths) (default ``(32,)``: all clients width 32;
      ``local_widths=16+32+64`` gives the heterogeneous setting). The model is built once, before
      clients are known, so L is built at the largest width and the bottleneck units past the
      client's width are masked to zero (they never affect its output and get no gradient, only
      AdamW's weight decay; the parameter counts show the largest width).
    """

    Options = PFedMoEOptions
    paper = "https://arxiv.org/abs/2402.01350"

    def build_model(self, backbone: Backbone, tasks: Sequence[TaskSpec], answer_side: str = "shared") -> ClientModel:
        return PFedMoEModel(backbone, list(tasks), self.options, answer_side)

    def tag(self, name: str) -> Tag:
        return "shared" if name.startswith("global_expert.") else "local"

    def prepare_client(self, model: PFedMoEModel, ctx: ClientContext) -> None:
        model.set_client(ctx.info)
