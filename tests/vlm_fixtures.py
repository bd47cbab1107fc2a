"""A tiny random LLaVA-format checkpoint (CLIP tower, 2-layer MLP connector, Llama or Qwen2 LM) for fast tests.

Written exactly as a real one is (``save_pretrained`` of the model, a fast tokenizer with a chat template and a
``LlavaProcessor``), so ``llava:DIR`` loads it through the same code as a downloaded checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

SENTENCES = [
    "USER : what colour is the circle ? ASSISTANT : red",
    "user assistant system : how many shapes are there ? two three one",
    "what does the sign say ? stop yes no blue green square triangle",
]
# llava-1.5 style (Llama: BOS added by the tokenizer, not the template) and ChatML (Qwen2: no BOS at all)
TEMPLATES = {
    "llama": (
        "{% for m in messages %}{{ m['role'].upper() + ': ' }}"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ ' ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    "qwen2": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
        "{{ '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}


def tiny_tokenizer(lm: str = "llama", image_token: str | None = "<image>"):
    """A word-level fast tokenizer with pad / eos (and, for Llama, BOS) tokens, the image token and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos = ("<s>", "</s>") if lm == "llama" else (None, "<|im_end|>")
    specials = [t for t in ("<unk>", "<pad>", bos, eos, "<|im_start|>", image_token) if t is not None]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=specials))
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    extra = {"image_token": image_token} if image_token else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token=bos,
        eos_token=eos,
        chat_template=TEMPLATES[lm],
        extra_special_tokens=extra,
    )


def save_tiny_llava(path: str | Path, lm: str = "llama") -> Path:
    """Save a tiny random LLaVA checkpoint to ``path`` and return it.

    ``lm="llama"``: llava-1.5's feature path (layer -2, CLS dropped: 16 image tokens); ``lm="qwen2"``: the
    other strategy (last layer, CLS kept: 17 image tokens), so both of LLaVA's select rules are exercised.
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2Config,
    )

    path = Path(path)
    tokenizer = tiny_tokenizer(lm)
    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 128, **ids}  # fmt: skip
    text_config = LlamaConfig(bos_token_id=tokenizer.bos_token_id, **text) if lm == "llama" else Qwen2Config(**text)
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2)  # fmt: skip
    strategy, layer = ("default", -2) if lm == "llama" else ("full", -1)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16 + (strategy == "full"),
        vision_feature_select_strategy=strategy,
        vision_feature_layer=layer,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.25] * 3
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
        chat_template=TEMPLATES[lm],
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    processor.save_pretrained(path)
    return path
