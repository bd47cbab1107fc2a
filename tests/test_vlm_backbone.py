"""The ``vlm`` family's backbone: a LLaVA checkpoint loaded by ``llava:DIR`` gives what transformers' own processor
and feature path give, and every broken directory stops with one line naming it."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from vlm_fixtures import save_tiny_llava, tiny_tokenizer

from fedbench.api.backbone import BackboneUnavailable, create_backbone
from fedbench.api.vlm import VisionLanguageModel

QUESTION = "what colour is the circle ?"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    return {lm: save_tiny_llava(root / lm, lm) for lm in ("llama", "qwen2")}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def loaded(request, checkpoints):
    """(the checkpoint's directory, the wrapper loaded from it, its own processor)."""
    from transformers import AutoProcessor

    path = checkpoints[request.param]
    return path, create_backbone(f"llava:{path}"), AutoProcessor.from_pretrained(path, local_files_only=True)


def images(n, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_wrapper_is_frozen_and_names_its_parts(loaded):
    path, vlm, _ = loaded
    model = vlm.model
    assert isinstance(vlm, VisionLanguageModel) and vlm.family == "vlm" and vlm.name == f"llava:{path}"
    assert not any(p.requires_grad for p in vlm.parameters())
    assert vlm.meta["path"] == str(path) and vlm.meta["model_type"] == "llava" and vlm.meta["dtype"] == "float32"
    assert vlm.meta["lm_type"] == model.config.text_config.model_type
    assert vlm.meta["params"] == sum(p.numel() for p in model.parameters())
    assert vlm.connector is model.model.multi_modal_projector and vlm.lm_head is model.lm_head
    assert vlm.language_model is model.model.language_model and vlm.input_embeddings is model.get_input_embeddings()
    assert vlm.image_size == 32 and vlm.context_length == 128
    assert vlm.image_token_id == model.config.image_token_id and vlm.pad_token_id == vlm.tokenizer.pad_token_id
    # llama: layer -2, CLS dropped; qwen2: last layer, CLS kept (16 patches + CLS)
    assert vlm.image_seq_length == (16 if vlm.meta["lm_type"] == "llama" else 17)


def test_prompt_ids_are_the_processors(loaded):
    _, vlm, processor = loaded
    image = images(1)[0]
    text = vlm.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    out = processor(text=text, images=image, return_tensors="pt")
    ids = vlm.prompt_ids(QUESTION)
    assert ids == out["input_ids"][0].tolist() and ids.count(vlm.image_token_id) == vlm.image_seq_length
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    turn = [{"role": "user", "content": [{"type": "image", "image": pil}, {"type": "text", "text": QUESTION}]}]
    chat = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert ids == list(np.ravel(chat["input_ids"]))  # the processor's own chat path agrees on BOS
    # no resize at 32 px: the processor's pixels and ours differ only by rounding
    torch.testing.assert_close(vlm.preprocess(image[None]), out["pixel_values"], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="holds 2"):
        vlm.prompt_ids("what <image> is it")


def test_vision_features_are_what_the_connector_receives(loaded):
    _, vlm, _ = loaded
    pixels = vlm.preprocess(images(2))
    seen = []
    hook = vlm.connector.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    try:
        ids = torch.tensor([vlm.prompt_ids(QUESTION)] * 2)
        vlm.model(input_ids=ids, pixel_values=pixels)
    finally:
        hook.remove()
    features = vlm.vision_features(pixels)
    assert features.shape == (2, vlm.image_seq_length, vlm.model.config.vision_config.hidden_size)
    torch.testing.assert_close(features, seen[0], atol=0, rtol=0)
    projected = torch.stack(vlm.model.get_image_features(pixel_values=pixels).pooler_output)
    torch.testing.assert_close(vlm.connector(features), projected)


def test_teacher_forced_forward_from_embeddings_matches_llavas(loaded):
    _, vlm, _ = loaded
    pixels = vlm.preprocess(images(1))
    prompt, answer = vlm.prompt_ids(QUESTION), vlm.answer_ids("red")
    ids = torch.tensor([prompt + answer])
    embeds = vlm.input_embeddings(ids)
    mask = (ids == vlm.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(mask, vlm.connector(vlm.vision_features(pixels)))
    labels = torch.tensor([[-100] * len(prompt) + answer])
    ours = vlm.model(inputs_embeds=embeds, labels=labels)
    theirs = vlm.model(input_ids=ids, pixel_values=pixels, labels=labels)
    torch.testing.assert_close(ours.logits, theirs.logits)
    assert torch.isfinite(ours.loss) and ours.loss.item() == pytest.approx(theirs.loss.item(), rel=1e-5)


def test_generate_with_left_padding(loaded):
    _, vlm, _ = loaded
    prompts = [vlm.prompt_ids(QUESTION), vlm.prompt_ids("stop")]
    width = max(map(len, prompts))
    ids = torch.tensor([[vlm.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    pixels = vlm.preprocess(images(2))
    kw = {"max_new_tokens": 3, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    batch = vlm.model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kw)
    assert batch.sequences.shape == (2, width + 3)
    alone = vlm.model.generate(input_ids=torch.tensor(prompts[1:]), pixel_values=pixels[1:], **kw)
    torch.testing.assert_close(batch.scores[0][1], alone.scores[0][0], atol=1e-4, rtol=1e-4)  # padding is masked
    assert isinstance(vlm.decode(batch.sequences[0, width:]), str)


def test_answer_ids_close_with_eos_and_decode_round_trips(loaded):
    _, vlm, _ = loaded
    ids = vlm.answer_ids("red")
    assert ids[-1] == vlm.eos_token_id and len(ids) == 2 and vlm.tokenizer.bos_token_id not in ids
    assert vlm.decode(ids) == "red" and vlm.decode(torch.tensor(ids)) == "red"


def _drop(*names):
    return lambda d: [(d / n).unlink() for n in names]


def _config(**fields):
    def write(d):
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **fields}))

    return write


def _tokenizer_without_image_token(d):
    _drop("tokenizer.json", "tokenizer_config.json")(d)
    tiny_tokenizer("llama", image_token=None).save_pretrained(d)


def _processor_counting(n_extra):
    def write(d):
        cfg = json.loads((d / "processor_config.json").read_text())
        (d / "processor_config.json").write_text(json.dumps({**cfg, "num_additional_image_tokens": n_extra}))

    return write


@pytest.mark.parametrize(
    ("mutate", "says"),
    [
        (lambda d: shutil.rmtree(d), "does not exist"),
        (lambda d: (shutil.rmtree(d), d.write_text("weights")), "is a file"),
        (_drop("config.json"), "has no config.json"),
        (_config(model_type="clip"), "holds a 'clip' checkpoint, not 'llava'"),
        (_drop("tokenizer.json", "tokenizer_config.json"), "has no tokenizer"),
        (_drop("processor_config.json"), "has no image processor config"),
        (_drop("chat_template.jinja"), "tokenizer without a chat template"),
        (_tokenizer_without_image_token, "without the image token '<image>'"),
        (_drop("model.safetensors"), "has no LLaVA model that loads (OSError: "),
        (_config(image_token_index=0), "but its config's image_token_id is 0"),
        (_processor_counting(0), "expands '<image>' to 15 tokens, but its vision tower gives 16"),
    ],
    ids=["missing", "a-file", "no-config", "not-llava", "no-tokenizer", "no-processor", "no-template",
         "no-image-token", "no-weights", "image-token-id", "token-count"],
)  # fmt: skip
def test_a_broken_directory_stops_with_one_line_naming_it(checkpoints, tmp_path, mutate, says):
    bad = tmp_path / "ckpt"
    shutil.copytree(checkpoints["llama"], bad)
    mutate(bad)
    with pytest.raises(BackboneUnavailable) as err:
        create_backbone(f"llava:{bad}")
    message = str(err.value)
    assert "\n" not in message and f"'{bad}'" in message and says in message, message
