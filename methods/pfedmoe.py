"""pFedMoE (Yi et al., arXiv 2402.01350; docs/methods.md §3).

The method's description, harness choices included, is the class docstring (shown by
``fedbench describe``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedbench.adapters.moa import Adapter
from fedbench.api.backbone import Backbone, backbone_family
from fedbench.api.batch import Batch, Features
from fedbench.api.method import ClientInfo, Method, Tag, register_method
from fedbench.api.model import ClientModel
from fedbench.api.task import TaskSpec
from fedbench.api.vlm_model import VLMClientModel

if TYPE_CHECKING:
    from fedbench.api.context import ClientContext
    from fedbench.api.vlm import VisionLanguageModel

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


def make_gate(gate_in: int, hidden: int) -> nn.Module:
    """The local gate: LayerNorm -> Linear(·, hidden) -> Sigmoid -> Linear(hidden, 2) (softmax by the caller)."""
    return nn.Sequential(nn.LayerNorm(gate_in), nn.Linear(gate_in, hidden), nn.Sigmoid(), nn.Linear(hidden, 2))


def gate_input(
    options: PFedMoEOptions, images: torch.Tensor, image: torch.Tensor, question: torch.Tensor
) -> torch.Tensor:
    """What the gate reads per row: the image at 16x16x3 (``pixels``) or pooled image + question features."""
    return torch.cat([image, question], -1) if options.gate_input == "features" else downsample(images)


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
        self.gate = make_gate(gate_in, options.gate_hidden)
        self.expert_names = ["global", "local"]
        self.local_width = max(options.local_widths)

    def set_client(self, client: ClientInfo) -> None:
        """The client's local-expert width (model-heterogeneous setting)."""
        widths = self.options.local_widths
        self.local_width = widths[client.client % len(widths)]

    def encode(self, batch: Batch, cached: tuple[torch.Tensor, torch.Tensor] | None = None) -> GatedFeatures:
        f = super().encode(batch, cached)
        gated = gate_input(self.options, batch.images, f.image, f.question)
        return GatedFeatures(**{k: getattr(f, k) for k in Features.__dataclass_fields__}, gate_input=gated)

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


class PFedMoEVLMModel(VLMClientModel):
    """``vlm`` family: the global and the local expert are two connectors initialised from the pretrained
    one, mixed by the local gate: image embeddings = α_g·G(x) + α_l·L(x) on every vision token x."""

    def __init__(self, backbone: VisionLanguageModel, tasks: list[TaskSpec], options: PFedMoEOptions) -> None:
        super().__init__(backbone, tasks, train_connector=False)
        if len(set(options.local_widths)) > 1:
            raise ValueError(
                f"pfedmoe: local_widths = {options.local_widths} (heterogeneous local experts) does not apply to the "
                "vlm family, whose experts are whole connectors; leave local_widths at one width"
            )
        self.options = options
        self.global_expert = copy.deepcopy(backbone.connector).requires_grad_(True)
        self.local_expert = copy.deepcopy(backbone.connector).requires_grad_(True)
        pooled = backbone.vision_dim + backbone.lm_dim  # the mean vision token and the question's LM embedding
        gate_in = 3 * PIXEL_SIDE * PIXEL_SIDE if options.gate_input == "pixels" else pooled
        self.gate = make_gate(gate_in, options.gate_hidden)
        self.expert_names = ["global", "local"]

    def set_client(self, client: ClientInfo) -> None:
        """Nothing to set: every client's local expert is a whole connector."""

    def connect(self, vision: torch.Tensor, batch: Batch) -> torch.Tensor:
        f = self.features(vision, batch)
        alpha = self.gate(gate_input(self.options, batch.images.to(vision.device), f.image, f.question)).softmax(-1)
        self.routing = alpha
        a_g, a_l = alpha[:, 0, None, None], alpha[:, 1, None, None]
        return a_g * self.global_expert(vision) + a_l * self.local_expert(vision)


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

    - Where it acts, per backbone family: ``clip``, the experts are adapters on the frozen CLIP
      patch tokens (above); ``vlm`` (a generative VLM), the experts are two connectors (LLaVA's
      2-layer MLP) initialised from the pretrained connector, image embeddings = α_g·G(x) + α_l·L(x)
      on every vision token, the gate on the same inputs (``features``: the pooled vision tokens and
      the LM's input embeddings of the question); the LM stays frozen (no LoRA: the paper's local
      head has no counterpart in a frozen LM that writes every answer), so only G goes up and down.

    Simplifications / harness choices (the official code is not public; these are ours):
    - Experts are adapters on frozen CLIP patch tokens (the paper's experts are CNN extractors);
      on ``vlm`` connectors (the paper has no VLM form), where widths do not apply: a single
      ``local_widths`` entry is the homogeneous setting, several are refused.
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

    families = ("clip", "vlm")
    frozen_lm_form = True  # its vlm form never adapts the LM: model.answer_side = "frozen_trunk" changes nothing there

    def build_model(self, backbone: Backbone, tasks: Sequence[TaskSpec], answer_side: str = "shared") -> ClientModel:
        if backbone_family(backbone) == "vlm":
            return PFedMoEVLMModel(backbone, list(tasks), self.options)
        return PFedMoEModel(backbone, list(tasks), self.options, answer_side)

    def tag(self, name: str) -> Tag:
        return "shared" if name.startswith("global_expert.") else "local"

    def prepare_client(self, model: PFedMoEModel, ctx: ClientContext) -> None:
        model.set_client(ctx.info)
