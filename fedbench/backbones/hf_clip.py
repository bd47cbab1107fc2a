"""Hugging Face CLIP through transformers: ``hf:PATH_OR_REPO`` with files already on disk."""

from __future__ import annotations

import torch

from fedbench.backbone import Backbone, BackboneUnavailable
from fedbench.registry import register_backbone


@register_backbone("hf")
def create_hf_clip(rest: str, spec: str) -> Backbone:
    from transformers import AutoTokenizer, CLIPModel

    try:
        model = CLIPModel.from_pretrained(rest, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(rest, local_files_only=True)
    except Exception as err:
        raise BackboneUnavailable(
            f"backbone '{spec}' is not on this machine (local_files_only; nothing is downloaded): "
            f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        ) from None
    vision = model.vision_model

    def encode_image(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = vision(pixel_values=x)
        return model.visual_projection(out.pooler_output), out.last_hidden_state[:, 1:]

    def encode_text(texts: list[str]) -> torch.Tensor:
        batch = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(model.device)
        pooled = model.text_model(**batch).pooler_output
        return model.text_projection(pooled)

    cfg = model.config.vision_config
    return Backbone(
        model,
        vision,
        encode_image,
        encode_text,
        image_size=cfg.image_size,
        token_dim=cfg.hidden_size,
        embed_dim=model.config.projection_dim,
        name=spec,
    )
