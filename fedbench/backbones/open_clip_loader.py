"""Real open_clip models: ``open_clip:MODEL:TAG`` or ``open_clip:MODEL:/path/to/checkpoint``.

Weights are never downloaded at run time: a pretrained tag must already be in the local
Hugging Face / open_clip cache (checked without a network call), a path must exist.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fedbench.api.backbone import Backbone, BackboneUnavailable
from fedbench.api.registry import register_backbone


def local_weights(model_name: str, tag: str, cache_dir: str | None) -> str:
    """Path of a pretrained tag's weights already on disk, or :class:`BackboneUnavailable`.

    Looked up without any network call (the Hugging Face cache, then open_clip's URL cache),
    so an offline machine fails at once instead of waiting on retries.
    """
    import open_clip  # imported on use: `fedbench list` stays fast
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.pretrained.get_pretrained_cfg(model_name, tag)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "(none)"
        raise BackboneUnavailable(
            f"unknown pretrained tag '{tag}' for open_clip model '{model_name}'. Available: {tags}"
        )
    if cfg.get("hf_hub"):
        repo = cfg["hf_hub"].rstrip("/")
        for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
            if isinstance(found, str):
                return found
    if cfg.get("url"):
        path = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(cfg["url"])
        if path.is_file():
            return str(path)
    raise BackboneUnavailable(
        f"backbone 'open_clip:{model_name}:{tag}' is not on this machine and nothing is downloaded at run time; "
        "put the weights in the Hugging Face cache or pass a checkpoint path"
    )


@register_backbone("open_clip")
def create_open_clip(rest: str, spec: str) -> Backbone:
    """``open_clip:MODEL:TAG`` (weights in the local cache) or ``open_clip:MODEL:/path/to/checkpoint``."""
    import open_clip  # imported on use: `fedbench list` stays fast

    model_name, _, pretrained = rest.partition(":")
    if model_name not in open_clip.list_models():
        raise BackboneUnavailable(f"unknown open_clip model '{model_name}' in '{spec}'")
    cache_dir = os.environ.get("OPEN_CLIP_CACHE")
    if pretrained and ("/" in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors"))):
        if not Path(pretrained).is_file():
            raise BackboneUnavailable(f"checkpoint '{pretrained}' of backbone '{spec}' does not exist")
    elif pretrained:
        pretrained = local_weights(model_name, pretrained, cache_dir)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained or None)
    tokenizer = open_clip.get_tokenizer(model_name)
    model.visual.output_tokens = True
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    norm = next(t for t in preprocess.transforms if hasattr(t, "mean"))

    def encode_text(texts: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(texts).to(next(model.parameters()).device))

    token_dim = model.visual.transformer.width if hasattr(model.visual, "transformer") else model.visual.output_dim
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
