"""Backbones: the committed embedded CLIP, and real loaders through the same code (offline)."""

import json

import open_clip
import pytest
import torch

from fedbench.backbone import BackboneUnavailable, create_backbone
from fedbench.backbones.embedded import load_embedded
from fedbench.lora import LoRASpec, inject_lora


def test_embedded_backbone_is_pretrained_not_random():
    _model, tokenizer, meta = load_embedded()
    assert meta["zero_shot_acc"] > 2 * meta["chance"], meta  # contrastive pretraining worked
    assert meta["synthetic"] is True and meta["steps"] >= 1
    assert tokenizer.vocab[-1] == "<eot>"  # argmax pooling needs EOT to be the largest id


def test_embedded_encodes_images_and_text(backbone):
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    tokens, pooled = backbone.encode_image(images)
    assert tokens.shape == (3, 64, backbone.token_dim) and pooled.shape == (3, backbone.embed_dim)
    text = backbone.encode_text(["the red circle", "what does the orange sign say?"])
    assert text.shape == (2, backbone.embed_dim) and not torch.allclose(text[0], text[1])


def test_missing_open_clip_weights_give_an_offline_error():
    with pytest.raises(BackboneUnavailable, match="not on this machine"):
        create_backbone("open_clip:ViT-B-32:laion2b_s34b_b79k")
    with pytest.raises(BackboneUnavailable, match="does not exist"):
        create_backbone("open_clip:ViT-B-32:/nonexistent/ckpt.pt")
    with pytest.raises(BackboneUnavailable, match="not on this machine"):
        create_backbone("hf:/nonexistent/clip")


def test_local_open_clip_checkpoint_loads_through_the_same_code(tmp_path):
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "fedbench-test-tiny.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "fedbench-test-tiny.json")
    torch.manual_seed(0)
    model = open_clip.create_model("fedbench-test-tiny")
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    bb = create_backbone(f"open_clip:fedbench-test-tiny:{ckpt}")
    tokens, pooled = bb.encode_image(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))  # resized to 32
    assert tokens.shape == (2, 16, 32) and pooled.shape == (2, 32)
    assert torch.equal(bb.towers.visual.conv1.weight, model.visual.conv1.weight)
    assert bb.encode_text(["a red circle"]).shape == (1, 32)
    assert len(inject_lora(bb.image_tower, LoRASpec(rank=2))) == 1
