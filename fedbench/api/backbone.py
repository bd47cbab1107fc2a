"""Frozen CLIP towers behind one small interface, whatever library built them.

A :class:`Backbone` turns uint8 images into patch tokens + a pooled embedding and strings into
pooled text embeddings. Loaders are registered in :data:`fedbench.api.registry.BACKBONES` under a
scheme (``embedded``, ``open_clip``, ``hf``); ``create_backbone("open_clip:ViT-B-32:TAG")``
dispatches on the part before the first colon.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedbench.api.registry import BACKBONES

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class BackboneUnavailable(RuntimeError):
    """Weights that are not on disk (we never download at run time)."""


def normalize_images(images: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float, resized to ``size`` (bilinear) and normalised."""
    x = images.to(mean.device, torch.float32) / 255.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - mean) / std


class Backbone(nn.Module):
    """Frozen image and text towers (the ``clip`` backbone family: CLIP towers + answer trunk).

    Args:
        towers: the library's model (owns every weight, so ``.to(device)`` moves all).
        image_tower: the submodule PEFT may adapt (LoRA is injected here).
        encode_image_fn: normalised images -> (pooled [B, embed_dim], tokens [B, L, token_dim]).
        encode_text_fn: strings -> pooled text embeddings [B, embed_dim].
        image_size: input side the image tower expects.
        token_dim / embed_dim: width of patch tokens and of pooled embeddings.
        name: the spec it was created from.
        meta: provenance shown with results (pretraining steps, zero-shot accuracy, chance).
        lora_backend: the registered LoRA injector for ``image_tower`` (:data:`fedbench.adapters.lora.LORA_INJECTORS`):
            ``fedbench`` (our q/v LoRA, which also adapts fused ``in_proj`` weights) or ``peft``
            (the transformers family), so a method's LoRA follows the library that built the tower.
    """

    def __init__(
        self,
        towers: nn.Module,
        image_tower: nn.Module,
        encode_image_fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        encode_text_fn: Callable[[Sequence[str]], torch.Tensor],
        image_size: int,
        token_dim: int,
        embed_dim: int,
        name: str,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
        meta: dict | None = None,
        lora_backend: str = "fedbench",
    ) -> None:
        super().__init__()
        self.family = "clip"
        self.meta = dict(meta or {})  # provenance, e.g. the embedded backbone's zero-shot accuracy
        self.towers = towers
        self._image_tower_name = next(n for n, m in towers.named_modules() if m is image_tower)
        self._encode_image = encode_image_fn
        self._encode_text = encode_text_fn
        self.image_size = image_size
        self.token_dim = token_dim
        self.embed_dim = embed_dim
        self.name = name
        self.lora_backend = lora_backend
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def image_tower(self) -> nn.Module:
        return self.towers.get_submodule(self._image_tower_name)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_images(images, self.image_size, self.mean, self.std)

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B,3,H,W] -> (patch tokens [B, L, token_dim], pooled [B, embed_dim])."""
        pooled, tokens = self._encode_image(self.preprocess(images))
        return tokens, pooled

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Pooled text embeddings [B, embed_dim], computed without gradients (tower is frozen)."""
        out = [self._encode_text(list(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
        if not out:
            return torch.zeros(0, self.embed_dim, device=self.mean.device)
        return torch.cat(out).float()


def backbone_family(backbone: object) -> str:
    """The backbone family a backbone belongs to (``clip`` or ``vlm``); ``clip`` for one that names none.
    What the harness, the staging and the methods branch on, with one default."""
    return getattr(backbone, "family", "clip")


def create_backbone(spec: str, device: str | torch.device = "cpu") -> Backbone:
    """Create a frozen backbone from ``scheme[:rest]``.

    Examples: ``embedded``, ``open_clip:ViT-B-32:laion2b_s34b_b79k``, ``hf:/path/to/clip``.
    """
    scheme, _, rest = spec.partition(":")
    loader = BACKBONES.get(scheme)
    backbone = loader(rest, spec)
    return backbone.to(device).eval()
