"""Reference row ``local-only``: every client trains its own model and nothing is sent.

The class docstring is the description ``fedbench describe`` prints.
"""

from __future__ import annotations

from fedbench.adapters.lora_method import LoRAMethod
from fedbench.api.method import Tag, register_method


@register_method("local-only")
class LocalOnly(LoRAMethod):
    """Local-only reference row (the "Isolated"/local-training row of FL benchmarks such as
    pFL-Bench, arXiv 2206.03655): the floor a federated method has to beat.

    - Model: the same client model as ``fedavg-lora`` (LoRA on q and v of every image-tower
      attention block, and the answer side; on the ``vlm`` family LoRA on the LM, and the
      connector when ``vlm.connector = "shared"``), with the same options; every trainable tensor is
      tagged local, so it differs from ``fedavg-lora`` only in that nothing crosses the network.
    - Client: plain supervised loss from its own stored state (the shared seeded init at first).
    - Server: holds nothing; download and upload are empty, and an empty payload is no message,
      so the ledger records 0 bytes (not the 16-byte header of an empty safetensors file).

    Harness choices (no simplification of a paper's method, since it is a reference row): a client
    trains only in the rounds it is sampled, for ``local.steps`` steps, as in every federated row,
    so compute is equal; a client never sampled is evaluated at the shared init.
    """

    paper = "https://arxiv.org/abs/2206.03655"

    def tag(self, name: str) -> Tag:
        return "local"
