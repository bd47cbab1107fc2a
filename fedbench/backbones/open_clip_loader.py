"""Real open_clip models: ``open_clip:MODEL:TAG`` or ``open_clip:MODEL:/path/to/checkpoint``.

Weights are never downloaded at run time: a pretrained tag must already be in the local
Hugging Face / open_clip cache (offline mode is forced), a path must exist.
"""

from __future__ import annotations

import os
from pathlib import Path

import open_clip
import torch

from fedbench.backbone import Backbone, BackboneUnavailable
from fedbench.registry import register_backbone


@register_backbone("open_clip")
def create_open_clip(rest: str, spec: str) -> Backbone:
    model_name, _, pretrained = rest.partition(":")
    if model_name not in open_clip.list_models():
        raise BackboneUnavailable(f"unknown open_clip model '{model_name}' in '{spec}'")
    if pretrained and ("/" in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors"))):
        if not Path(pretrained).is_file():
            raise BackboneUnavailable(f"checkpoint '{pretrained}' of backbone '{spec}' does not exist")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained or None, cache_dir=os.environ.get("OPEN_CLIP_CACHE")
        )
    except Exception as err:  # the libraries raise many types when offline
        raise BackboneUnavailable(
            f"backbone '{spec}' is not on this machine (offline; nothing is downloaded at run time): "
            f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        ) from None
    tokenizer = open_clip.get_tokenizer(model_name)
    model.visual.output_tokens = True
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    norm = next(t for t in preprocess.transforms if hasattr(t, "mean"))

    def encode_text(texts: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(texts).to(next(model.parameters()).device))

    token_dim = (
        model.visual.transformer.width if hasattr(model.visual, "transformer") else model.visual.output_dim
    )
    return Backbone(
        model,
        model.visual,
        model.visual,
        encode_text,
        image_size=size,
        token_dim=token_dim,
        embed_dim=model.visual.output_dim,
        name=spec,
        mean=norm.mean,
        std=norm.std,
    )
