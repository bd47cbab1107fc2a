"""The ``grounding`` family: referring expression -> box [x0, y0, x1, y1] in [0, 1], scored Acc@IoU>=0.5.

Loss: L1 + generalised IoU; a row is correct when the predicted box overlaps the target with IoU
>= 0.5; the majority row predicts the mean training box. On a generative VLM the LM writes the box as
``[x1, y1, x2, y2]`` on a 0-1000 grid (:func:`format_box`); a text without such a box scores 0 and counts
as a parse failure (:func:`parse_box`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedbench.api.family import MetricSpec, TaskFamily
from fedbench.api.model import BoxHead, BoxOutput
from fedbench.api.registry import register_family
from fedbench.tasks.families.text_answers import box_iou, format_box, parse_box


class BoxFamily(TaskFamily):
    name = "grounding"
    metric = MetricSpec("acc_iou50", higher_is_better=True, aggregate="mean")
    has_answers = False
    symbol = "BOX"
    # Shikra's bracketed list with Qwen-VL's integer 0-1000 grid: no decimals for the LM to write
    instruction = "Answer with the bounding box as [x1, y1, x2, y2], coordinates from 0 to 1000."
    # "[ 123 , 45 , 678 , 900 ]" is 9 tokens of a word-level tokenizer, + end: 10, and two to spare
    max_new_tokens = 12

    def widest_answers(self, spec):
        return [format_box([1.0, 1.0, 1.0, 1.0]), format_box([0.888, 0.888, 0.999, 0.999])]  # 4 digits, 3 digits

    def output(self, spec, hidden):
        return BoxOutput(spec, hidden, self)

    def head(self, spec, token_dim, embed_dim):
        return BoxHead(spec, token_dim, embed_dim, self)

    def loss(self, out, batch):
        from torchvision.ops import generalized_box_iou_loss  # imported on use: `fedbench list` stays fast

        return F.l1_loss(out, batch.box) + generalized_box_iou_loss(out, batch.box, reduction="mean")

    def correct(self, out, batch):
        from torchvision.ops import box_iou

        return (box_iou(out, batch.box).diagonal() >= 0.5).float()

    def majority(self, spec, table, train, test):
        from torchvision.ops import box_iou

        mean_box = torch.as_tensor(table.box[train].mean(0, keepdims=True))
        ious = box_iou(mean_box.expand(len(test), 4), torch.as_tensor(table.box[test])).diagonal()
        return float((ious >= 0.5).float().mean())

    def target_text(self, spec, table, row):
        return format_box(table.box[row])

    def score_text(self, spec, table, row, text, vqa_metric):
        box = parse_box(text)
        if box is None:
            return 0.0, False
        return float(box_iou(box, table.box[row]) >= 0.5), True

    def __repr__(self) -> str:
        return "BoxFamily('grounding')"


GROUNDING = register_family("grounding")(BoxFamily())
