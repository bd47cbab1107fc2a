"""LLaVA-format checkpoints through transformers: ``llava:DIR``, a local directory, nothing downloaded.

Any checkpoint saved as ``LlavaForConditionalGeneration`` with its tokenizer (holding a chat template and the
image token) and its ``LlavaProcessor`` loads here; what is missing or inconsistent stops with one line naming
the directory, before the weights are read where it can.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch

from fedbench.api.backbone import BackboneUnavailable
from fedbench.api.registry import register_backbone
from fedbench.api.vlm import VisionLanguageModel


@register_backbone("llava")
def create_llava(rest: str, spec: str) -> VisionLanguageModel:
    return load_llava(rest, name=spec)


def load_llava(path: str, dtype: torch.dtype = torch.float32, name: str | None = None) -> VisionLanguageModel:
    """Load the checkpoint directory ``path`` (offline: ``local_files_only``) with its weights in ``dtype``."""
    from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    name = name or f"llava:{path}"

    def fail(what: str) -> BackboneUnavailable:
        return BackboneUnavailable(f"backbone '{name}': '{path}' {what}")

    def loads(what: str, load):  # a library error, shortened to its first sentence
        try:
            return load(path, local_files_only=True)
        except Exception as err:
            first = (str(err).strip().splitlines() or [""])[0].split(". ")[0][:200]
            raise fail(f"has no {what} that loads ({type(err).__name__}: {first})") from None

    root = Path(path).expanduser()
    if not root.exists():
        raise fail("does not exist (llava:DIR reads a local checkpoint directory; nothing is downloaded)")
    if not root.is_dir():
        raise fail("is a file, not a LLaVA checkpoint directory")
    if not (root / "config.json").is_file():
        raise fail("has no config.json: not a LLaVA checkpoint directory")
    model_type = json.loads((root / "config.json").read_text()).get("model_type")
    if model_type != "llava":
        raise fail(f"holds a '{model_type}' checkpoint, not 'llava' (LlavaForConditionalGeneration)")
    path = str(root)
    tokenizer = loads("tokenizer", AutoTokenizer.from_pretrained)
    if not any((root / f).is_file() for f in ("processor_config.json", "preprocessor_config.json")):
        raise fail("has no image processor config (processor_config.json or preprocessor_config.json)")
    processor = loads("processor", AutoProcessor.from_pretrained)
    if getattr(processor, "image_processor", None) is None:
        raise fail("has no processor with an image processor (processor_config.json or preprocessor_config.json)")
    if not tokenizer.chat_template:
        raise fail("has a tokenizer without a chat template (the prompts are written in it)")
    image_token = processor.image_token
    if image_token not in tokenizer.get_vocab():
        raise fail(f"has a tokenizer without the image token '{image_token}' in its vocabulary")
    model = loads("LLaVA model", partial(LlavaForConditionalGeneration.from_pretrained, dtype=dtype))
    cfg = model.config
    found = tokenizer.convert_tokens_to_ids(image_token)
    if found != cfg.image_token_id:
        raise fail(f"maps '{image_token}' to id {found}, but its config's image_token_id is {cfg.image_token_id}")
    meta = {
        "path": path,
        "model_type": cfg.model_type,
        "lm_type": cfg.text_config.model_type,
        "vision_type": cfg.vision_config.model_type,
        "params": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
    }
    ip = processor.image_processor
    vlm = VisionLanguageModel(model, tokenizer, ip.image_mean, ip.image_std, name=name, meta=meta)
    expands = _processor_image_tokens(processor)
    if expands is not None and expands != vlm.image_seq_length:
        raise fail(
            f"has a processor that expands '{image_token}' to {expands} tokens, but its vision tower gives "
            f"{vlm.image_seq_length} features per image"
        )
    return vlm


def _processor_image_tokens(processor) -> int | None:
    """How many copies of the image token ``LlavaProcessor`` writes for one image (its ``replace_image_token``);
    None where it has no ``patch_size`` to count with (``prompt_ids`` expands by the model's count anyway)."""
    crop, patch = processor.image_processor.crop_size, processor.patch_size
    if patch is None:
        return None
    n = (crop["height"] // patch) * (crop["width"] // patch) + processor.num_additional_image_tokens
    return n - (processor.vision_feature_select_strategy == "default")
