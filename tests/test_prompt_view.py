"""Text drawn around the image (the routing cue through pixels): band content and geometry."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from fedbench.backends.inprocess import in_process
from fedbench.runtime.training import client_context
from fedbench.staging.prompt_view import band_font, band_lines, band_width, prompt_view, shrunken_scene
from fedbench.tasks.scenes import draw_scenes


def _scene(size: int = 64) -> torch.Tensor:
    images, _ = draw_scenes(np.array([3]), np.array([1]), np.random.default_rng(0), size)
    return images[0]


def _ink(lines: tuple[str, str], size: int) -> np.ndarray:
    """Where black text lands on a white canvas when ``lines`` are written as prompt_view writes them."""
    band = band_width(size)
    canvas = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(canvas)
    font = band_font(max(7, band - 3))
    draw.text((1, 1), lines[0], fill=0, font=font)
    draw.text((1, size - band + 1), lines[1], fill=0, font=font)
    return np.asarray(canvas) < 128


def test_band_lines_hold_the_symbol_then_the_question_words_in_order():
    top, bottom = band_lines("VQA", "what colour is the circle?", 64)
    assert top.split()[0] == "VQA"
    words = (top + " " + bottom).split()[1:]
    assert words == "what colour is the circle?".split()[: len(words)] and len(words) >= 2


def test_prompt_view_is_the_shrunken_scene_inside_a_band_holding_symbol_and_text():
    image = _scene()
    view = prompt_view(image, "BOX", "the red square")
    size, band = 64, band_width(64)
    assert view.shape == image.shape and view.dtype == torch.uint8
    # the middle is exactly the shrunken scene; the experts' image is untouched
    assert torch.equal(view[:, band : size - band, band : size - band], shrunken_scene(image))
    # the band is white except where the symbol and the question's words are written
    in_band = np.ones((size, size), bool)
    in_band[band : size - band, band : size - band] = False
    dark = (view.numpy() < 128).all(0)
    expected = _ink(band_lines("BOX", "the red square", size), size)
    assert np.array_equal(dark[in_band], expected[in_band]) and expected[in_band].sum() > 20
    symbol_only = _ink(("BOX", ""), size)
    assert (dark & symbol_only).sum() == symbol_only.sum()  # every pixel of the symbol's ink is there
    # another question changes the band and nothing else
    other = prompt_view(image, "BOX", "the blue circle")
    assert not torch.equal(other, view)
    assert torch.equal(
        other[:, band : size - band, band : size - band], view[:, band : size - band, band : size - band]
    )


def test_prompt_views_are_each_rows_view_through_the_frozen_tower(tiny_prep):
    from fedbench.api.family import family_of
    from fedbench.api.registry import TASKS

    table, views = tiny_prep.table, tiny_prep.features.prompts
    rows = np.array([0, 1, len(table) - 1])
    got = views.tokens(torch.as_tensor(rows))
    for k, r in enumerate(rows):
        symbol = family_of(TASKS.get(table.task[r])).symbol
        view = prompt_view(table.images[table.image_index[r]], symbol, str(table.question[r]))
        expected, _ = tiny_prep.backbone.encode_image(view[None])
        assert torch.allclose(got[k], expected[0], atol=1e-5)
    # the plain image's tokens (what the experts read) are another thing entirely
    plain, _ = tiny_prep.features.get(torch.as_tensor(table.image_index[rows]))
    assert not torch.allclose(plain, got, atol=1e-2)


def test_prompt_row_routes_on_the_prompt_view_while_experts_read_the_plain_image(tiny_prep, tmp_path):
    from fedbench.adapters.task_experts import STAGE2
    from fedbench.config.protocol import MethodEntry
    from fedbench.runtime.server import Run

    options = {"router_inputs": ["image"], "router_scope": "local", "ocr_expert": False, "router_view": "prompt"}
    run = Run(tiny_prep, MethodEntry("mmrouter-moa", options), tmp_path, backend=in_process)
    model = run.build()
    info = tiny_prep.infos[0]
    ctx = client_context(run.prep, info, 0)
    run.method.prepare_client(model, ctx)
    model.bind(STAGE2, info.tasks, False)
    rows = ctx.train_rows[:6]
    batch, cached = ctx.inputs(model, rows)
    f = model.encode(batch, cached)
    plain, _ = tiny_prep.features.get(batch.image_index)
    assert torch.equal(f.tokens, plain)  # the experts' input: the plain image's tokens
    views = tiny_prep.features.prompts.tokens(torch.as_tensor(rows))
    assert torch.allclose(model.router(f), model.router.image(views))  # the router's: the prompt view's
    assert not torch.allclose(model.router(f), model.router.image(plain))
    run.execute()
    assert run.completed()
