"""The ``grounding`` family: referring expression -> box [x0, y0, x1, y1] in [0, 1], scored Acc@IoU>=0.5.

Loss: L1 + generalised IoU; a row is correct when the predicted box overlaps the target with IoU
>= 0.5; the majority row predicts the mean training box.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedbench.api.family import MetricSpec, TaskFamily
from fedbench.api.model import BoxHead, BoxOutput
from fedbench.api.registry import register_family


class BoxFamily(TaskFamily):
    name = "grounding"
    metric = MetricSpec("acc_iou50", higher_is_better=True, aggregate="mean")
    has_answers = False
    symbol = "BOX"

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

    def __repr__(self) -> str:
        return "BoxFamily('grounding')"


GROUNDING = register_family("grounding")(BoxFamily())
