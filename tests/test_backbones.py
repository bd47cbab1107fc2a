"""Backbones: the committed embedded CLIP, and real loaders through the same code (offline)."""

import json

import open_clip
import pytest
import torch

from fedbench.adapters.lora import LoRASpec, inject_lora
from fedbench.api.backbone import BackboneUnavailable, create_backbone
from fedbench.backbones.embedded import load_embedded


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


def test_peft_mix_and_detach_match_fedbench_lora_for_two_adapters(tmp_path):
    """FedDPA's mixing on peft layers (``PeftMix``) computes what ``LoRADelta.mix`` / ``detached`` do:
    same outputs, same gradients, and none for the detached adapter; flags come back afterwards."""
    import copy

    from fedbench.adapters.lora import PeftMix, inject_qv_lora, lora_layers
    from fedbench.backbones.hf_clip import inject_peft_lora

    model = _tiny_hf_clip(tmp_path / "clip")
    spec, adapters = LoRASpec(rank=2, alpha=4.0, dropout=0.0), ("global", "local")
    ours, theirs = copy.deepcopy(model.vision_model), copy.deepcopy(model.vision_model)
    for tower in (ours, theirs):
        tower.requires_grad_(False)
    deltas = inject_qv_lora(ours, spec, adapters)
    inject_peft_lora(theirs, spec, adapters)
    projs = [m for layer in theirs.encoder.layers for m in (layer.self_attn.q_proj, layer.self_attn.v_proj)]
    views = [PeftMix(proj) for proj in projs]  # in our deltas' order (peft re-inserts q_proj after v_proj)
    assert len(deltas) == 4 and {id(v.layer) for v in lora_layers(theirs)} == {id(p) for p in projs}
    assert all(d.mix == v.mix == {"global": 1.0} for d, v in zip(deltas, views, strict=True))
    gen = torch.Generator().manual_seed(2)
    for delta, view in zip(deltas, views, strict=True):
        for name in adapters:
            a = torch.randn(spec.rank, view.layer.in_features, generator=gen) * 0.1
            b = torch.randn(view.layer.out_features, spec.rank, generator=gen) * 0.1
            with torch.no_grad():
                delta.lora_A[name].copy_(a[None])
                delta.lora_B[name].copy_(b[None])
                view.layer.lora_A[name].weight.copy_(a)
                view.layer.lora_B[name].weight.copy_(b)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    for layer in (*deltas, *views):
        layer.mix, layer.detached = {"local": 0.3, "global": 0.7}, {"global"}
    out_ours, out_theirs = ours(pixel_values=x).last_hidden_state, theirs(pixel_values=x).last_hidden_state
    assert torch.allclose(out_ours, out_theirs, atol=1e-5)
    out_ours.pow(2).mean().backward()
    out_theirs.pow(2).mean().backward()
    for delta, view in zip(deltas, views, strict=True):
        assert view.layer.lora_A["global"].weight.grad is None and view.layer.lora_B["global"].weight.grad is None
        assert torch.allclose(delta.lora_A["local"].grad[0], view.layer.lora_A["local"].weight.grad, atol=1e-5)
        assert torch.allclose(delta.lora_B["local"].grad[0], view.layer.lora_B["local"].weight.grad, atol=1e-5)
        view.mix, view.detached = {"global": 1.0}, set()
    assert all(p.requires_grad for n, p in theirs.named_parameters() if "lora_" in n)  # flags restored
    with torch.no_grad():
        for delta in deltas:
            delta.mix, delta.detached = {"global": 1.0}, set()
        assert torch.allclose(
            ours(pixel_values=x).last_hidden_state, theirs(pixel_values=x).last_hidden_state, atol=1e-5
        )


@pytest.fixture(scope="module")
def hf_prep(tmp_path_factory):
    """The tiny protocol of conftest (embedded ``scenes`` suite) on a tiny random HF CLIP loaded by path."""
    from dataclasses import replace

    from conftest import TINY

    from fedbench.config.protocol import BackboneConfig
    from fedbench.staging.prepare import prepare

    path = tmp_path_factory.mktemp("hf") / "clip"
    _tiny_hf_clip(path)
    spec = f"hf:{path}"
    protocol = replace(TINY, backbone=BackboneConfig(spec))
    return prepare(protocol, 0, backbone=create_backbone(spec), device=torch.device("cpu"))


# method -> which LoRA matrices of which adapter are shared (travel); the others are local or frozen
SHARED_LORA = {"fedavg-lora": {("A", "default"), ("B", "default")}, "ffa-lora": {("B", "default")},
               "feddpa": {("A", "global"), ("B", "global")}}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SHARED_LORA))
def test_tower_lora_methods_go_through_peft_on_the_transformers_family(name, hf_prep, tmp_path):
    from conftest import RecordingRuntime
    from peft.tuners.lora import LoraLayer

    from fedbench.adapters.lora import LoRADelta, lora_param
    from fedbench.api.payload import deserialize
    from fedbench.backends.inprocess import InProcessBackend
    from fedbench.config.protocol import MethodEntry
    from fedbench.runtime.server import Run

    class KeepingRuntime(RecordingRuntime):  # also keeps the uploads and the LoRA tensors after each update
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.uploads: list[dict[str, torch.Tensor]] = []
            self.trained: list[tuple[int, dict[str, torch.Tensor]]] = []

        def train(self, msg):
            reply = super().train(msg)
            self.uploads.append(deserialize(reply.upload))
            lora_now = {n: p.detach().clone() for n, p in self.model.named_parameters() if lora_param(n)}
            self.trained.append((msg.round, lora_now))
            return reply

    run = Run(hf_prep, MethodEntry(name), tmp_path / name, backend=lambda r: InProcessBackend(r.runtime))
    run.runtime = KeepingRuntime(hf_prep, run.method)
    model = run.runtime.model
    layers = [m for m in model.backbone.image_tower.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 4 and not any(isinstance(m, LoRADelta) for m in model.modules())  # q, v × 2 layers
    adapters = ("global", "local") if name == "feddpa" else ("default",)
    lora = {n: p for n, p in model.named_parameters() if lora_param(n)}
    assert {lora_param(n) for n in lora} == {(m, a) for m in "AB" for a in adapters}
    assert len(lora) == 4 * 2 * len(adapters)
    tags = run.method.tags(model)
    shared_lora = {n for n in lora if tags.get(n) == "shared"}
    assert {lora_param(n) for n in shared_lora} == SHARED_LORA[name]
    assert all(n.endswith(".weight") for n in shared_lora)  # peft's names
    init = {n: p.detach().clone() for n, p in lora.items()}

    run.execute()

    uploads = run.runtime.uploads
    assert len(uploads) >= 2  # at least one client in each of the 2 rounds
    for up in uploads:  # the LoRA tensors that travel are exactly the shared ones, and all else is shared too
        assert {n for n in up if lora_param(n)} == shared_lora
        assert all(tags[n] == "shared" for n in up if n != "__metadata__")
    # trained: B moved off its zero init (the gradient reached the peft layers of the client's tower copy)
    assert all(any(not torch.equal(up[n], init[n]) for n in shared_lora) for up in uploads)
    if name == "ffa-lora":  # A frozen: never tagged, never sent, the same after 2 rounds
        a_names = [n for n in lora if lora_param(n)[0] == "A"]
        assert not any(lora[n].requires_grad or n in tags for n in a_names)
        assert all(torch.equal(lora[n], init[n]) for n in a_names)
    if name == "feddpa":  # the local adapter is tagged local and trained (round 1's pass 1), never sent
        local_b = [n for n in lora if lora_param(n) == ("B", "local")]
        assert all(tags[n] == "local" for n in lora if lora_param(n)[1] == "local")
        later = [after for r, after in run.runtime.trained if r > 0]
        assert later and all(any(not torch.equal(after[n], init[n]) for n in local_b) for after in later)
