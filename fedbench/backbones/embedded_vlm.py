"""The embedded generative VLM: a tiny LLaVA that runs offline on a laptop CPU (issue 21).

Layout (transformers' ``LlavaForConditionalGeneration``, docs/methods.md §7): the embedded CLIP's
vision tower, converted weight for weight from ``embedded_clip.safetensors`` to a transformers
``CLIPVisionModel`` and kept frozen; LLaVA-1.5's 2-layer MLP connector; a small Llama LM over a
word-level vocabulary (the suite's words, so the embedding table stays small). Sizes and the
pretraining recipe live in ``embedded_vlm.json``; the pretraining itself is
:mod:`fedbench.backbones.embedded_vlm_pretrain` (``fedbench backbone pretrain --vlm``). This module builds
the model and its tokenizer, writes a standard LLaVA directory (``save_pretrained`` of model, tokenizer
and processor) with ``SHA256SUMS``, checked on every load, and loads it: the default loads through the
same code as any downloaded LLaVA checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedbench.api.backbone import OPENAI_MEAN, OPENAI_STD, BackboneUnavailable, normalize_images
from fedbench.api.registry import register_backbone
from fedbench.backbones import embedded
from fedbench.backbones.llava import load_llava
from fedbench.utils.integrity import IntegrityError, read_checked, sha256_file

if TYPE_CHECKING:
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    from fedbench.api.vlm import VisionLanguageModel

HERE = Path(__file__).parent
CONFIG_PATH = HERE / "embedded_vlm.json"
MODEL_DIR = HERE / "embedded_vlm"
SUMS_NAME = "SHA256SUMS"  # `sha256sum -c SHA256SUMS` in the directory reads it too
META_NAME = "fedbench_provenance.json"  # zero-shot per family, baselines, steps, seconds

IMAGE_TOKEN = "<image>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN, USER, ASSISTANT)
# User turn: the image placeholder(s) first, then the text; the assistant turn ends with </s> (the LM
# learns to stop). BOS comes from the tokenizer (llava-1.5 style), not from the template.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '<|user|> ' }}{% elif m['role'] == 'assistant' %}{{ '<|assistant|> ' }}{% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] if c['type'] == 'image' %}{{ '<image> ' }}{% endfor %}"
    "{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# Decoding re-attaches punctuation, so a box decodes as "[120, 45, 600, 900]", as it was written.
_ATTACH = ((" ,", ","), (" .", "."), (" ?", "?"), (" !", "!"), (" :", ":"), (" ;", ";"), (" ]", "]"), ("[ ", "["),
           (" )", ")"), ("( ", "("))  # fmt: skip


def load_config() -> dict:
    """The architecture and pretraining recipe (``embedded_vlm.json``)."""
    return json.loads(CONFIG_PATH.read_text())


# ---- tokenizer ------------------------------------------------------------------------------------


def build_tokenizer(vocabulary: Sequence[str]) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over ``vocabulary``: lower-cased, split on whitespace and each
    punctuation mark, BOS prepended, a chat template; small, so the LM's embedding table is."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])
    words = {piece for item in vocabulary for piece, _ in pre.pre_tokenize_str(item.lower())} - set(SPECIALS)
    vocab = {w: i for i, w in enumerate([*SPECIALS, *sorted(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.decoder = decoders.Sequence(
        [decoders.WordPiece(prefix="##", cleanup=False), decoders.Fuse(), *(decoders.Replace(a, b) for a, b in _ATTACH)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        clean_up_tokenization_spaces=False,
        padding_side="left",  # generation pads on the left (training packs its own batches)
    )


# ---- vision tower: the embedded CLIP's, in transformers' layout --------------------------------------


def vision_config(clip_config: dict | None = None) -> CLIPVisionConfig:
    """The transformers config of the embedded CLIP's vision tower (``embedded_clip.json``)."""
    from transformers import CLIPVisionConfig

    cfg = (clip_config or json.loads(embedded.CONFIG_PATH.read_text()))["model"]
    v = cfg["vision_cfg"]
    width = v["width"]
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=int(width * v.get("mlp_ratio", 4.0)),
        num_hidden_layers=v["layers"],
        num_attention_heads=width // v.get("head_width", 64),
        image_size=v["image_size"],
        patch_size=v["patch_size"],
        projection_dim=cfg["embed_dim"],
        # open_clip.CLIP's default act is exact GELU (quick_gelu only when asked), LayerNorm eps 1e-5
        hidden_act="quick_gelu" if cfg.get("quick_gelu") else "gelu",
        layer_norm_eps=1e-5,
    )


def convert_clip_tower(visual: torch.nn.Module) -> dict[str, torch.Tensor]:
    """open_clip ``VisionTransformer`` weights -> a transformers ``CLIPVisionModel`` state dict (the
    fused attention in_proj split into q/k/v; the output projection ``proj`` has no place there and
    LLaVA does not use it)."""
    sd = {k: v.detach().float() for k, v in visual.state_dict().items()}
    out = {
        "embeddings.class_embedding": sd["class_embedding"],
        "embeddings.patch_embedding.weight": sd["conv1.weight"],
        "embeddings.position_embedding.weight": sd["positional_embedding"],
        "pre_layrnorm.weight": sd["ln_pre.weight"],  # sic: transformers' name
        "pre_layrnorm.bias": sd["ln_pre.bias"],
        "post_layernorm.weight": sd["ln_post.weight"],
        "post_layernorm.bias": sd["ln_post.bias"],
    }
    n_layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    for i in range(n_layers):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for name, w, b in zip(
            ("q_proj", "k_proj", "v_proj"),
            sd[src + "attn.in_proj_weight"].chunk(3),
            sd[src + "attn.in_proj_bias"].chunk(3),
            strict=True,
        ):
            out[f"{dst}self_attn.{name}.weight"], out[f"{dst}self_attn.{name}.bias"] = w, b
        pairs = (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                 ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))  # fmt: skip
        for a, b in pairs:
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = sd[f"{src}{a}.{p}"]
    return {k: v.contiguous() for k, v in out.items()}


# ---- the model ------------------------------------------------------------------------------------


def llava_layout(
    tokenizer: PreTrainedTokenizerFast,
    vision: CLIPVisionConfig,
    text: dict,
    strategy: str = "default",
    feature_layer: int = -2,
    projector_act: str = "gelu",
) -> tuple[LlavaConfig, LlavaProcessor]:
    """The LLaVA config (``vision`` tower, a Llama LM of ``text``'s sizes over ``tokenizer``'s vocabulary)
    and the standard processor that writes its prompts: what the embedded VLM and any LLaVA-shaped model
    built here (``scripts/vlm_gpu_check.py``) share."""
    from transformers import CLIPImageProcessor, LlamaConfig, LlavaConfig, LlavaProcessor

    grid = vision.image_size // vision.patch_size
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **ids, **text),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=grid * grid + (strategy == "full"),  # CLS dropped by "default"
        projector_hidden_act=projector_act,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=feature_layer,
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": vision.image_size},
        crop_size={"height": vision.image_size, "width": vision.image_size},
        image_mean=list(OPENAI_MEAN),  # what the embedded CLIP was pretrained with
        image_std=list(OPENAI_STD),
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # the tower's CLS
    )
    return config, processor


def set_generation_ids(model: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerFast) -> None:
    """The tokenizer's bos, eos and pad ids as the model's generation defaults."""
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))


def build_vlm(
    vocabulary: Sequence[str], config: dict | None = None
) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerFast, LlavaProcessor]:
    """(model, tokenizer, processor): the embedded CLIP tower (converted, frozen), a seeded random
    connector and LM over ``vocabulary``'s words, and the standard LLaVA processor for them."""
    from transformers import LlavaForConditionalGeneration

    cfg = config or load_config()
    mcfg = cfg["model"]
    tokenizer = build_tokenizer(vocabulary)
    clip, _clip_tokenizer, _ = embedded.load_embedded()
    config_, processor = llava_layout(
        tokenizer,
        vision_config(),
        mcfg["text_cfg"],
        mcfg["vision_feature_select_strategy"],
        mcfg["vision_feature_layer"],
        mcfg["projector_hidden_act"],
    )
    torch.manual_seed(cfg["pretrain"]["seed"])
    model = LlavaForConditionalGeneration(config_)
    tower = model.model.vision_tower
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in tower.state_dict()) else ""  # < 5.x
    tower.load_state_dict({prefix + k: v for k, v in convert_clip_tower(clip.visual).items()}, strict=True)
    tower.requires_grad_(False)
    set_generation_ids(model, tokenizer)
    return model.eval(), tokenizer, processor


def chat_prompt(tokenizer: PreTrainedTokenizerFast, user_text: str) -> str:
    """The generation prompt of one row: user turn (image, then ``user_text``), then the assistant marker."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text}]}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def pixel_values(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> the tower's normalised input (what the processor's CLIPImageProcessor
    gives at ``size`` px, checked by the tests)."""
    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return normalize_images(images, size, mean, std)


@torch.no_grad()
def vision_features(model: LlavaForConditionalGeneration, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The frozen tower's selected features [N, L, Dv] (the layer and CLS rule of the config), once per image."""
    cfg = model.config
    size = cfg.vision_config.image_size
    out = []
    for i in range(0, len(images), batch):
        hidden = model.model.vision_tower(pixel_values(images[i : i + batch], size), output_hidden_states=True)
        feats = hidden.hidden_states[cfg.vision_feature_layer]
        out.append(feats[:, 1:] if cfg.vision_feature_select_strategy == "default" else feats)
    return torch.cat(out)


# ---- writing and loading ---------------------------------------------------------------------------


def write_dir(
    model: LlavaForConditionalGeneration,
    tokenizer: PreTrainedTokenizerFast,
    processor: LlavaProcessor,
    meta: dict,
    out_dir: Path,
    dtype: str = "float32",
) -> None:
    """Write a standard LLaVA directory (model, tokenizer, processor), the provenance and ``SHA256SUMS``:
    built beside ``out_dir`` and swapped in whole, so a kill never leaves half a model."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / SUMS_NAME).is_file():
        raise ValueError(f"'{out_dir}' holds files that are not an embedded VLM: choose an empty or new directory")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.to(getattr(torch, dtype)).save_pretrained(tmp)
    model.float()
    tokenizer.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / META_NAME).write_text(json.dumps(meta, indent=1) + "\n")
    files = sorted(p.name for p in tmp.iterdir() if p.is_file())
    (tmp / SUMS_NAME).write_text("".join(f"{sha256_file(tmp / f)}  {f}\n" for f in files))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.replace(out_dir)


def check_dir(path: Path = MODEL_DIR) -> dict[str, str]:
    """Every file of the directory against ``SHA256SUMS`` (one line naming a damaged, missing or
    unlisted file); returns name -> sha256."""
    path = Path(path)
    fix = "restore it (git checkout) or run `fedbench backbone pretrain --vlm`"
    sums_path = path / SUMS_NAME
    if not path.is_dir():
        raise BackboneUnavailable(f"embedded VLM directory '{path}' is missing; {fix}")
    if not sums_path.is_file():
        raise IntegrityError(f"the checksums '{sums_path}' of the embedded VLM are missing; {fix}")
    sums = {}
    for line in sums_path.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if not re.fullmatch(r"[0-9a-f]{64}", digest) or not name or "/" in name:
            raise IntegrityError(f"the checksums '{sums_path}' of the embedded VLM are damaged; {fix}")
        sums[name] = digest
    for name, digest in sums.items():
        read_checked(path / name, digest, "embedded VLM file", fix)
    unlisted = sorted(p.name for p in path.iterdir() if p.name != SUMS_NAME and not p.name.startswith("."))
    unlisted = [n for n in unlisted if n not in sums]
    if unlisted:
        raise IntegrityError(
            f"embedded VLM directory '{path}' holds files its checksums do not list: {unlisted}; {fix}"
        )
    return sums


def read_meta(path: Path = MODEL_DIR) -> dict:
    """The provenance written by :func:`pretrain` (zero-shot per family, baselines, steps, seconds)."""
    return json.loads((Path(path) / META_NAME).read_text())


def load_embedded_vlm(
    path: Path = MODEL_DIR,
) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerFast, LlavaProcessor, dict]:
    """The checked directory through plain transformers, in float32: (model, tokenizer, processor, provenance)."""
    from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    check_dir(path)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path), AutoProcessor.from_pretrained(path), read_meta(path)


SHOWN = ("zero_shot", "majority", "chance", "steps", "synthetic")  # provenance the wrapper carries


@register_backbone("embedded-vlm")
def create_embedded_vlm(rest: str, spec: str) -> VisionLanguageModel:
    """``embedded-vlm`` (the committed directory) or ``embedded-vlm:DIR`` (another one written by
    ``pretrain``): checksums verified, then loaded by the ``llava`` loader like any LLaVA checkpoint."""
    path = Path(rest) if rest else MODEL_DIR
    check_dir(path)
    vlm = load_llava(str(path), name=spec)
    meta = read_meta(path)
    vlm.meta.update({k: meta[k] for k in SHOWN if k in meta})
    return vlm
