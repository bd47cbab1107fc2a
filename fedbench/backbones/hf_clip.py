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


def peft_lora(tower: torch.nn.Module, spec, adapter_name: str = "default") -> torch.nn.Module:
    """LoRA on a transformers CLIP tower's ``q_proj`` and ``v_proj`` through ``peft`` (``LoraConfig``;
    ``r = spec.rank``, ``lora_alpha = spec.alpha``, ``lora_dropout = spec.dropout``), injected in place
    into the plain module (no ``PeftModel`` wrapper, so the tower keeps its forward and its names, plus
    ``.lora_A.<adapter>`` / ``.lora_B.<adapter>``). With the same weights, A and B it computes what
    :func:`fedbench.lora.inject_lora` computes (``tests/test_backbones.py``), up to where dropout acts
    (peft: on the input; fedbench: on A's columns)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=["q_proj", "v_proj"]
    )
    return inject_adapter_in_model(config, tower, adapter_name=adapter_name)
