"""The embedded generative VLM: its tower is the embedded CLIP's, its committed directory is checked and loads as
any LLaVA checkpoint, and its pretraining is deterministic (issue 21)."""

import hashlib
import shutil

import pytest
import torch

from fedbench.api.backbone import create_backbone
from fedbench.backbones import embedded_vlm as ev
from fedbench.backbones import embedded_vlm_pretrain as evp
from fedbench.backbones.embedded import load_embedded
from fedbench.tasks.vlm_corpus import vlm_pretrain_corpus, vlm_vocabulary
from fedbench.utils.integrity import IntegrityError


@pytest.fixture(scope="module")
def committed():
    return ev.load_embedded_vlm()  # (model, tokenizer, processor, provenance)


def _open_clip_tokens(visual, x):
    """open_clip's transformer output for normalised images (before ln_post), CLS first."""
    h = visual.conv1(x).flatten(2).transpose(1, 2)
    h = torch.cat([visual.class_embedding.expand(len(h), 1, -1), h], 1) + visual.positional_embedding
    return visual.transformer(visual.ln_pre(h))


def test_converted_tower_equals_the_embedded_clip_tower():
    from transformers import CLIPVisionModel

    clip, _, _ = load_embedded()
    clip.eval()
    tower = CLIPVisionModel(ev.vision_config()).eval()
    tower.load_state_dict(ev.convert_clip_tower(clip.visual), strict=True)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    x = ev.pixel_values(images, 64)
    with torch.no_grad():
        hf = tower(x).last_hidden_state
        ours = _open_clip_tokens(clip.visual, x)
        clip.visual.output_tokens = True
        _, tokens = clip.visual(x)  # open_clip's output tokens: ln_post applied, CLS dropped
    assert hf.shape == (4, 65, 128)
    torch.testing.assert_close(hf, ours, atol=1e-4, rtol=0)
    torch.testing.assert_close(tower.post_layernorm(hf)[:, 1:], tokens, atol=1e-4, rtol=0)
    assert (hf - CLIPVisionModel(ev.vision_config())(x).last_hidden_state).abs().max() > 0.1  # not a random tower


def test_committed_tower_is_the_converted_clip_tower_and_the_processor_expands_the_image(committed):
    model, tokenizer, processor, _ = committed
    clip, _, _ = load_embedded()
    state = model.model.vision_tower.state_dict()
    for name, value in ev.convert_clip_tower(clip.visual).items():
        torch.testing.assert_close(state[name], value)  # frozen through pretraining, saved in float32
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    inputs = processor(images=list(images), text=[ev.chat_prompt(tokenizer, "what?")] * 2, return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist() == [64, 64]
    torch.testing.assert_close(inputs["pixel_values"], ev.pixel_values(images, 64), atol=1e-5, rtol=0)


def test_tokenizer_round_trip_of_a_box_and_an_ocr_prompt(committed):
    _, tokenizer, _, _ = committed
    box = "[120, 45, 600, 900]"
    ids = tokenizer(box, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["[", "120", ",", "45", ",", "600", ",", "900", "]"]
    assert tokenizer.decode(ids) == box
    prompt = "OCR: STOP OPEN\nwhat does the white sign say?\nAnswer the question using a single word or phrase."
    ids = tokenizer(prompt)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.convert_ids_to_tokens(ids[1:6]) == ["ocr", ":", "stop", "open", "what"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == " ".join(prompt.lower().split())
    chat = ev.chat_prompt(tokenizer, "what?")
    assert chat == "<|user|> <image> what? <|assistant|>"
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}]
    assert tokenizer.apply_chat_template(turn, tokenize=False).split() == ["<|user|>", "hi", "<|assistant|>", "red</s>"]


def test_committed_directory_checksums_verify_and_a_damaged_byte_is_refused(tmp_path):
    sums = ev.check_dir()
    assert {"model.safetensors", "config.json", "tokenizer.json", ev.META_NAME} <= set(sums)
    assert sum((ev.MODEL_DIR / n).stat().st_size for n in sums) <= 20 * 2**20
    copy = tmp_path / "vlm"
    shutil.copytree(ev.MODEL_DIR, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as err:
        create_backbone(f"embedded-vlm:{copy}")
    message = str(err.value)
    assert "\n" not in message and "model.safetensors" in message and "damaged" in message
    shutil.copytree(ev.MODEL_DIR, tmp_path / "extra")
    (tmp_path / "extra" / "added.json").write_text("{}")
    with pytest.raises(IntegrityError, match="do not list"):
        ev.check_dir(tmp_path / "extra")


def test_committed_model_loads_through_the_llava_loader_and_generates_left_padded(committed):
    model, _, processor, meta = committed
    vlm = create_backbone("embedded-vlm")
    assert vlm.meta["synthetic"] is True and vlm.meta["steps"] == meta["steps"] >= 1
    assert set(vlm.meta["zero_shot"]) >= {"classification", "vqa", "grounding", "ocr_vqa"}
    assert vlm.image_seq_length == 64 and vlm.model.dtype == torch.float32
    prompts, answers = evp.encode_rows(vlm.tokenizer, 64, ["what is it?"], ["[0, 16, 500, 1000]"])
    assert vlm.prompt_ids("what is it?") == prompts[0] and vlm.answer_ids("[0, 16, 500, 1000]") == answers[0]
    corpus = vlm_pretrain_corpus(2, seed=99)
    texts = [corpus.user_texts[1], corpus.user_texts[8]]  # a short and a long prompt: the short one is padded
    images = corpus.images[torch.as_tensor(corpus.image_index[[1, 8]])]
    side = processor.tokenizer.padding_side
    both = evp.generate_answers(model, processor, images, texts, max_new_tokens=12)
    alone = [evp.generate_answers(model, processor, images[i : i + 1], texts[i : i + 1], 12)[0] for i in range(2)]
    assert both == alone and all(isinstance(t, str) and t for t in both)
    assert processor.tokenizer.padding_side == side  # as it was before generation


def test_packed_rows_give_the_loss_of_the_standard_forward(committed):
    model, tokenizer, processor, _ = committed
    corpus = vlm_pretrain_corpus(2, seed=5)
    prompts, answers = evp.encode_rows(tokenizer, 64, corpus.user_texts, corpus.answers)
    packs = evp.pack_rows(prompts, answers, corpus.image_index, model.config.image_token_id)
    images = corpus.images[torch.as_tensor(corpus.image_index)]
    inputs = processor(images=list(images), text=[ev.chat_prompt(tokenizer, t) for t in corpus.user_texts])
    assert inputs["input_ids"] == prompts  # the processor's prompts, token for token
    width = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    labels, mask = torch.full_like(ids, -100), torch.zeros_like(ids)
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        ids[i, : len(p) + len(a)], mask[i, : len(p) + len(a)] = torch.tensor(p + a), 1
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
    with torch.no_grad():
        features = ev.vision_features(model, corpus.images)
        batch = evp.packed_batch(model, packs, features, tokenizer.pad_token_id)
        weights = batch.pop("weights")
        out = model(**batch)
        hidden = model.model(**{k: v for k, v in batch.items() if k != "labels"}).last_hidden_state
        pixels = ev.pixel_values(images, 64)
        standard = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
    torch.testing.assert_close(out.loss, standard, atol=1e-5, rtol=1e-5)
    loss = evp.answer_loss(hidden, model.lm_head, batch["labels"])  # the head at the answer positions only
    torch.testing.assert_close(loss, standard, atol=1e-5, rtol=1e-5)
    per_row = []  # each row's mean answer-token loss, then their mean
    with torch.no_grad():
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
            one = model.model(input_ids=ids[i : i + 1, : len(p) + len(a)], pixel_values=pixels[i : i + 1])
            per_row.append(evp.answer_loss(one.last_hidden_state, model.lm_head, labels[i : i + 1, : len(p) + len(a)]))
        row_mean = evp.answer_loss(hidden, model.lm_head, batch["labels"], weights)
    torch.testing.assert_close(row_mean, torch.stack(per_row).mean(), atol=1e-5, rtol=1e-5)


def test_pretrain_a_few_steps_is_deterministic_and_writes_a_loadable_directory(tmp_path):
    config = ev.load_config()
    config["pretrain"].update(corpus_images=4, zero_shot_images=2, batch_images=2)
    per_image = ["caption", "classification", "vqa", "grounding", "ocr_vqa"]
    rules = evp.ZeroShotRules(row_families=lambda c: per_image * len(c.images), max_new_tokens=lambda f: 4)
    vocabulary = vlm_vocabulary()
    metas = [
        evp.pretrain(vlm_pretrain_corpus, vocabulary, tmp_path / n, 3, lambda s: None, rules, config) for n in "ab"
    ]
    assert metas[0]["steps"] == 3 and metas[0]["first_loss"] == metas[1]["first_loss"]
    assert metas[0]["final_loss"] == metas[1]["final_loss"] and metas[0]["zero_shot"] == metas[1]["zero_shot"]
    digests = [hashlib.sha256((tmp_path / n / "model.safetensors").read_bytes()).hexdigest() for n in "ab"]
    assert digests[0] == digests[1]  # the same weights, bit for bit
    assert set(metas[0]["zero_shot"]) == set(per_image) and metas[0]["synthetic"] is True
    vlm = create_backbone(f"embedded-vlm:{tmp_path / 'a'}")  # checksums, then the llava loader
    assert vlm.meta["steps"] == 3 and vlm.image_seq_length == 64


def test_the_smoke_vlm_preset_runs_from_the_cli_and_beats_the_majority_row(tmp_path):
    """`fedbench run --preset smoke-vlm` on the committed VLM: every LoRA row writes its answers, they are
    parsed and scored (parse_fail per task in the leaderboard), and the pretrained LM answers classification
    and VQA far above the majority answer (0.46 and 0.59 zero-shot against 0.06 and 0.15)."""
    import csv

    from typer.testing import CliRunner

    from fedbench.cli import app

    done = CliRunner().invoke(app, ["run", "--preset", "smoke-vlm", "--results", str(tmp_path), "--no-plots"])
    assert done.exit_code == 0, done.output
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "leaderboard.csv").open())}
    assert set(rows) == {"fedavg-lora", "ffa-lora", "fedsa-lora", "majority"}
    for name in ("fedavg-lora", "ffa-lora", "fedsa-lora"):
        row = rows[name]
        assert all(0.0 <= float(row[f"parse_fail_{t}"]) <= 1.0 for t in ("classification", "vqa", "grounding"))
        for task in ("classification", "vqa"):
            assert float(row[f"acc_{task}"]) > float(rows["majority"][f"acc_{task}"]) + 0.1
