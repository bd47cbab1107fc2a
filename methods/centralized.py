"""Reference row ``centralized``: all training rows pooled on one trainer; not federated.

The class docstring is the description ``fedbench describe`` prints.
"""

from __future__ import annotations

from typing import ClassVar

from fedbench.adapters.lora_method import LoRAMethod
from fedbench.api.method import register_method


@register_method("centralized")
class Centralized(LoRAMethod):
    """Centralized reference row (the "Global-Train" row of FL benchmarks such as pFL-Bench, arXiv
    2206.03655): every client's training rows pooled on one trainer, the ceiling a federated method
    approaches. Not federated: nothing is sent, and its bytes are n/a (records carry 0 bytes and
    ``federated: false``; the leaderboard leaves its MB columns empty).

    - Model: the same client model as ``fedavg-lora`` (LoRA on q and v of every image-tower
      attention block, and the answer side; on the ``vlm`` family LoRA on the LM, and the
      connector when ``vlm.connector = "shared"``), with the same options. Every trainable tensor is
      tagged shared only in the sense that the one trainer holds it.
    - Training: each round, the union of all clients' training rows (all tasks; OCR text as each
      row has it), ``local.steps`` × (number of clients sampled that round) AdamW steps at the
      protocol's batch size, continuing from the previous round's pooled model.
    - Evaluation: the pooled model is scored as every client's model, by the same evaluation as
      every row, so per-client and global scores exist.

    Harness choices (no simplification of a paper's method, since it is a reference row): equal
    gradient steps per round with a federated row (the same client sampling decides the count), the
    same model and optimiser settings as ``fedavg-lora``, and a fresh optimiser each round as a
    federated client has.
    """

    paper = "https://arxiv.org/abs/2206.03655"
    federated: ClassVar[bool] = False
