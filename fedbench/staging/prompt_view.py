"""Text drawn around the image: the routing cue delivered through pixels alone.

The multimodal-router idea has a second form besides feeding the router text features: draw
the task symbol and the question into the image itself, so that an image-only router (Pilot's)
sees them. :func:`prompt_view` shrinks the scene into the middle of a canvas of the same pixel
size and writes the task symbol, then as many words of the question as fit legibly, on a band
above and a band below it. Only the router reads this view; the experts keep the plain image.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from fedbench.api.backbone import Backbone
from fedbench.api.data import ExampleTable

BAND_FRACTION = 0.2  # each band (top and bottom, and the margins left and right) is 20% of the side
MIN_FONT = 7  # below this, the default font's glyphs stop being legible at these sizes
BAND_RGB, INK_RGB = (255, 255, 255), (0, 0, 0)


def band_width(size: int) -> int:
    return max(1, round(BAND_FRACTION * size))


@lru_cache(maxsize=8)
def band_font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def band_lines(symbol: str, question: str, size: int) -> tuple[str, str]:
    """The two band lines: the symbol and the question's first words, then the words that follow,
    each line as long as fits the canvas width (a word that does not fit ends the text)."""
    font = band_font(max(MIN_FONT, band_width(size) - 3))
    words = question.split()
    lines, current, i = [], symbol, 0
    for _ in range(2):
        while i < len(words) and font.getlength(f"{current} {words[i]}".strip()) <= size - 2:
            current = f"{current} {words[i]}".strip()
            i += 1
        lines.append(current)
        current = ""
    return lines[0], lines[1]


def prompt_view(image: torch.Tensor, symbol: str, question: str) -> torch.Tensor:
    """uint8 [3,S,S] -> uint8 [3,S,S]: the scene shrunk into the middle, the lines of
    :func:`band_lines` written on white bands above and below it."""
    size = image.shape[-1]
    band = band_width(size)
    canvas = Image.new("RGB", (size, size), BAND_RGB)
    canvas.paste(Image.fromarray(shrunken_scene(image).permute(1, 2, 0).numpy()), (band, band))
    draw = ImageDraw.Draw(canvas)
    font = band_font(max(MIN_FONT, band - 3))
    top, bottom = band_lines(symbol, question, size)
    draw.text((1, 1), top, fill=INK_RGB, font=font)
    draw.text((1, size - band + 1), bottom, fill=INK_RGB, font=font)
    return torch.from_numpy(np.asarray(canvas).transpose(2, 0, 1).copy())


def shrunken_scene(image: torch.Tensor) -> torch.Tensor:
    """The middle of :func:`prompt_view` on its own (uint8 [3,inner,inner]): what the band surrounds."""
    size = image.shape[-1]
    inner = size - 2 * band_width(size)
    scene = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((inner, inner), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(scene).transpose(2, 0, 1).copy())


class PromptViews:
    """The prompt view of every row of an example table, rendered and encoded by the frozen image
    tower on first use and kept for the seed (rows asking the same question of one image share one
    view). Only the image tower's patch tokens are kept: they are what Pilot's router reads."""

    def __init__(self, table: ExampleTable, symbol_of: dict[str, str], backbone: Backbone, batch_size: int) -> None:
        """``symbol_of``: task name -> its family's symbol (``TaskFamily.symbol``: CLS, VQA, BOX, OCR)."""
        self.table, self.symbol_of, self.backbone, self.batch_size = table, symbol_of, backbone, batch_size
        keys = [f"{i}\x00{t}\x00{q}" for i, t, q in zip(table.image_index, table.task, table.question, strict=True)]
        _, self._first, inverse = np.unique(np.asarray(keys, dtype=object), return_index=True, return_inverse=True)
        self._inverse = torch.as_tensor(inverse, dtype=torch.long)
        self._tokens: torch.Tensor | None = None

    def render(self, rows: np.ndarray) -> torch.Tensor:
        """uint8 [len(rows),3,S,S]: each row's image with its task symbol and question around it."""
        t = self.table
        return torch.stack(
            [prompt_view(t.images[t.image_index[r]], self.symbol_of[t.task[r]], str(t.question[r])) for r in rows]
        )

    @torch.no_grad()
    def tokens(self, row_index: torch.Tensor) -> torch.Tensor:
        """Patch tokens [B,L,D] of the prompt views of table rows ``row_index``."""
        if self._tokens is None:
            device = self.backbone.mean.device
            parts = [
                self.backbone.encode_image(self.render(self._first[i : i + self.batch_size]).to(device))[0]
                for i in range(0, len(self._first), self.batch_size)
            ]
            self._tokens = torch.cat(parts)
        return self._tokens[self._inverse[row_index.cpu()].to(self._tokens.device)]
