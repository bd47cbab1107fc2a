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


def _tiny_hf_clip(path):
    """A tiny randomly initialised transformers CLIPModel and a word-level CLIP tokenizer, saved to ``path``."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    words = ["a", "red", "circle", "what", "does", "the", "sign", "say?"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "<unk>": 2, **{f"{w}</w>": i + 3 for i, w in enumerate(words)}}
    (path / "vocab.json").parent.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=77)
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "eos_token_id": 1, "bos_token_id": 0},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=24,
    )  # fmt: skip
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def test_tiny_hf_clip_saved_to_disk_loads_by_path_through_the_registry(tmp_path):
    model = _tiny_hf_clip(tmp_path / "clip")
    bb = create_backbone(f"hf:{tmp_path / 'clip'}")
    tokens, pooled = bb.encode_image(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))  # resized to 32
    assert tokens.shape == (2, 16, 32) and pooled.shape == (2, 24)
    assert torch.equal(bb.towers.vision_model.embeddings.patch_embedding.weight,
                       model.vision_model.embeddings.patch_embedding.weight)  # fmt: skip
    assert bb.encode_text(["a red circle", "what does the sign say?"]).shape == (2, 24)
    assert not any(p.requires_grad for p in bb.parameters())  # frozen towers
    assert len(inject_lora(bb.image_tower, LoRASpec(rank=2))) == 4  # q and v of both layers


def test_fedbench_qv_lora_and_peft_lora_agree_on_outputs_and_gradients(tmp_path):
    import copy

    from fedbench.backbones.hf_clip import peft_lora

    model = _tiny_hf_clip(tmp_path / "clip")
    spec = LoRASpec(rank=2, alpha=6.0, dropout=0.0)
    ours, theirs = copy.deepcopy(model.vision_model), copy.deepcopy(model.vision_model)
    for tower in (ours, theirs):
        tower.requires_grad_(False)
    deltas = inject_lora(ours, spec)
    peft_lora(theirs, spec)
    projs = [m for layer in theirs.encoder.layers for m in (layer.self_attn.q_proj, layer.self_attn.v_proj)]
    gen = torch.Generator().manual_seed(1)
    for delta, proj in zip(deltas, projs, strict=True):  # the same A and B (B non-zero) on both sides
        a = torch.randn(spec.rank, proj.in_features, generator=gen) * 0.1
        b = torch.randn(proj.out_features, spec.rank, generator=gen) * 0.1
        with torch.no_grad():
            delta.lora_A["default"].copy_(a[None])
            delta.lora_B["default"].copy_(b[None])
            proj.lora_A["default"].weight.copy_(a)
            proj.lora_B["default"].weight.copy_(b)
    assert proj.scaling["default"] == delta.spec.scale == 3.0
    x = torch.randn(2, 3, 32, 32, generator=gen)
    out_ours, out_theirs = ours(pixel_values=x).last_hidden_state, theirs(pixel_values=x).last_hidden_state
    assert torch.allclose(out_ours, out_theirs, atol=1e-5)
    assert not torch.allclose(out_ours, model.vision_model(pixel_values=x).last_hidden_state, atol=1e-3)
    out_ours.pow(2).mean().backward()
    out_theirs.pow(2).mean().backward()
    for delta, proj in zip(deltas, projs, strict=True):
        assert torch.allclose(delta.lora_A["default"].grad[0], proj.lora_A["default"].weight.grad, atol=1e-5)
        assert torch.allclose(delta.lora_B["default"].grad[0], proj.lora_B["default"].weight.grad, atol=1e-5)
