"""A frozen generative VLM (LLaVA layout: vision tower -> connector -> causal LM) behind one small interface.

The ``vlm`` family's analogue of :class:`fedbench.api.backbone.Backbone`: methods reach the parts they adapt
(the connector, the LM) and the harness builds prompts and answers through it, whatever checkpoint it came from.
Loaders register under a scheme in :data:`fedbench.api.registry.BACKBONES` (``llava:DIR``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedbench.api.backbone import normalize_images


class VisionLanguageModel(nn.Module):
    """A loaded ``LlavaForConditionalGeneration`` and its tokenizer, every weight frozen.

    Args:
        model: the LLaVA model (owns every weight, so ``.to(device)`` moves all).
        tokenizer: its fast tokenizer, with the chat template its prompts are written in.
        mean / std: the image processor's normalisation.
        name: the spec it was created from.
        meta: provenance shown with results (path, model and LM type, parameters, dtype).
    """

    family = "vlm"
    lora_backend = "peft"  # methods' LoRA goes through peft (fedbench.adapters.lora.inject_lora), on lora_target

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        mean: Sequence[float],
        std: Sequence[float],
        name: str,
        meta: dict | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.meta = dict(meta or {})
        cfg = model.config
        self.image_size = cfg.vision_config.image_size
        self.image_token_id = cfg.image_token_id
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        # tokens the tower emits (CLIP: patches + CLS; SigLIP: patches), less the first one "default" drops
        emitted = self.vision_tower.embeddings.num_positions
        self.image_seq_length = emitted - (cfg.vision_feature_select_strategy == "default")
        self.context_length = cfg.text_config.max_position_embeddings
        layers = cfg.vision_feature_layer  # one layer, or several concatenated on the feature axis
        self.vision_dim = cfg.vision_config.hidden_size * (len(layers) if isinstance(layers, list) else 1)
        self.lm_dim = cfg.text_config.hidden_size  # the LM's width: the connector's output
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.train_connector = True  # the protocol's vlm.connector, set when a seed is staged
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def connector(self) -> nn.Module:
        """LLaVA's ``multi_modal_projector``: vision features [B, L, D_vision] -> LM inputs [B, L, D_lm]."""
        return self.model.model.multi_modal_projector

    @property
    def language_model(self) -> nn.Module:
        """The LM's decoder without its head (``lm_head`` holds the output projection)."""
        return self.model.model.language_model

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def lora_target(self) -> nn.Module:
        """Where the family's LoRA goes: the language model (its attention's q and v), as FedIT tunes an LLM."""
        return self.language_model

    def never_trained(self) -> list[torch.Tensor]:
        """The weights no method of the family trains: all but the connector's (which the protocol may
        train). Every client model built on this backbone shares them instead of holding a copy, so a
        run holds one LM, not one per model (``fedbench.runtime.client.build_model``)."""
        connector = {id(p) for p in self.connector.parameters()}
        return [p for p in self.parameters() if id(p) not in connector]

    @property
    def input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,H,W] -> pixel values for the tower: a bilinear resize to its side, then the processor's
        normalisation. LLaVA's processor resizes the short side (bicubic) and centre-crops: on our square scenes
        the crop removes nothing, so only the interpolation differs."""
        return normalize_images(images, self.image_size, self.mean, self.std)

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, L, D_vision]: what LLaVA feeds its connector, as ``LlavaModel.get_image_features`` selects it
        (hidden states of ``vision_feature_layer``, an index or a list concatenated on the last axis; the
        "default" strategy drops CLS, "full" keeps it)."""
        cfg = self.model.config
        layers = cfg.vision_feature_layer
        # as transformers does: ask the tower to capture only the selected layers' hidden states
        out = self.vision_tower(pixel_values, output_hidden_states=layers, return_dict=True)
        hidden = [out.hidden_states[i] for i in ([layers] if isinstance(layers, int) else layers)]
        if cfg.vision_feature_select_strategy == "default":
            hidden = [h[:, 1:] for h in hidden]
        return torch.cat(hidden, dim=-1)

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B,3,H,W] -> (vision features [B, L, D_vision], their mean [B, D_vision]): the frozen part
        a run caches per image (:class:`fedbench.staging.feature_cache.FeatureCache`), as for a CLIP tower."""
        features = self.vision_features(self.preprocess(images))
        return features, features.mean(1)

    def prompt_ids(self, user_text: str) -> list[int]:
        """One user turn (the image, then ``user_text``) in the chat template, ready for the answer: the image
        placeholder expanded to ``image_seq_length`` copies, tokenized as the checkpoint's processor does it (BOS
        added unless the template already wrote it)."""
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text}]}]
        text = self.tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
        if text.count(self.image_token) != 1:  # e.g. a question that spells the placeholder itself
            raise ValueError(f"the chat prompt holds {text.count(self.image_token)} '{self.image_token}', not 1")
        text = text.replace(self.image_token, self.image_token * self.image_seq_length)
        bos = self.tokenizer.bos_token
        return self.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]

    def text_ids(self, text: str) -> list[int]:
        """``text``'s tokens alone (no special tokens): what the LM's input embeddings of a question or an
        OCR line are looked up by."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def answer_ids(self, text: str) -> list[int]:
        """The answer's tokens, then the eos that closes an assistant turn (the target of teacher forcing)."""
        return [*self.text_ids(text), self.eos_token_id]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Generated ids -> the answer text, special tokens (eos, pad) left out."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
