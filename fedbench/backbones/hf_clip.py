"""Hugging Face CLIP through transformers: ``hf:PATH_OR_REPO`` with files already on disk.

Its LoRA goes through peft (``lora_backend = "peft"``, the injector registered here): the
transformers towers have separate ``q_proj`` / ``v_proj`` Linear layers, which peft adapts as such.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from fedbench.adapters.lora import LoRASpec, PeftMix, register_lora_injector
from fedbench.api.backbone import Backbone, BackboneUnavailable
from fedbench.api.registry import register_backbone
from fedbench.utils.checks import is_local_path


class HFImageEncoder(nn.Module):
    """normalised images -> (projected pooled embedding, patch tokens) of a transformers CLIPModel.

    A module holding the model rather than a closure over it: ``copy.deepcopy`` of the backbone (one
    per client model) then runs the copy's vision tower, the one its LoRA was injected into.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.vision_model(pixel_values=x)
        return self.model.visual_projection(out.pooler_output), out.last_hidden_state[:, 1:]


@register_backbone("hf")
def create_hf_clip(rest: str, spec: str) -> Backbone:
    from pathlib import Path

    from transformers import AutoTokenizer, CLIPModel

    if is_local_path(rest) and not Path(rest).expanduser().is_dir():  # the rule: fedbench.utils.checks.is_local_path
        what = "is a file, not a model directory" if Path(rest).expanduser().exists() else "does not exist"
        raise BackboneUnavailable(
            f"backbone '{spec}' is not on this machine: local path '{rest}' {what} (a hub id is OWNER/NAME, read "
            "from the hub cache)"
        )
    try:
        model = CLIPModel.from_pretrained(rest, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(rest, local_files_only=True)
    except Exception as err:
        raise BackboneUnavailable(
            f"backbone '{spec}' is not on this machine (local_files_only; nothing is downloaded): "
            f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        ) from None

    def encode_text(texts: list[str]) -> torch.Tensor:
        batch = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(model.device)
        pooled = model.text_model(**batch).pooler_output
        return model.text_projection(pooled)

    cfg = model.config.vision_config
    return Backbone(
        model,
        model.vision_model,
        HFImageEncoder(model),
        encode_text,
        image_size=cfg.image_size,
        token_dim=cfg.hidden_size,
        embed_dim=model.config.projection_dim,
        name=spec,
        lora_backend="peft",
    )


def peft_lora(tower: nn.Module, spec: LoRASpec, adapter_name: str = "default") -> nn.Module:
    """LoRA on a transformers CLIP tower's ``q_proj`` and ``v_proj`` through ``peft`` (``LoraConfig``;
    ``r = spec.rank``, ``lora_alpha = spec.alpha``, ``lora_dropout = spec.dropout``), injected in place
    into the plain module (no ``PeftModel`` wrapper, so the tower keeps its forward and its names, plus
    ``.lora_A.<adapter>`` / ``.lora_B.<adapter>``). With the same weights, A and B it computes what
    :func:`fedbench.adapters.lora.inject_qv_lora` computes (``tests/test_backbones.py``), up to where dropout acts
    (peft: on the input; fedbench: on A's columns)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=["q_proj", "v_proj"]
    )
    return inject_adapter_in_model(config, tower, adapter_name=adapter_name)


@register_lora_injector("peft")
def inject_peft_lora(tower: nn.Module, spec: LoRASpec, adapters: tuple[str, ...] = ("default",)) -> list[nn.Module]:
    """The methods' LoRA on a transformers tower: :func:`peft_lora` once per adapter, then fedbench's
    contract (that of :func:`fedbench.adapters.lora.inject_qv_lora`): every adapter trainable (peft freezes the
    inactive ones) and only the first active with weight 1 (``PeftMix.mix``). Returns peft's
    ``LoraLayer`` modules in module order.

    Differences from fedbench's own LoRA, same A/B init (kaiming-uniform A, zero B) and
    ``scale = alpha / rank``: peft drops out the layer input per element, fedbench drops A's columns
    once per forward; and peft adds ``B A x`` to the output instead of folding ``B A`` into the weight.
    """
    from peft.tuners.lora import LoraLayer

    for adapter in adapters:
        with warnings.catch_warnings():  # a second adapter on the same tower is what FedDPA asks for
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            peft_lora(tower, spec, adapter)
    layers = [m for m in tower.modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ValueError(f"no q_proj / v_proj found in {type(tower).__name__} for peft's LoRA")
    for layer in layers:
        for adapter in adapters:
            for p in (*layer.lora_A[adapter].parameters(), *layer.lora_B[adapter].parameters()):
                p.requires_grad_(True)
        PeftMix(layer).mix = {adapters[0]: 1.0}
    return layers
