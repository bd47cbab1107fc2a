"""FedAvg over LoRA and its two frozen/local variants (docs/methods.md §1).

Each method's description, simplifications included, is its class docstring (shown by
``fedbench describe``).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedbench.adapters.lora_method import LoRAMethod
from fedbench.api.backbone import Backbone
from fedbench.api.method import Tag, register_method
from fedbench.api.model import ClientModel
from fedbench.api.task import TaskSpec
from fedbench.api.vlm_model import is_connector


@register_method("fedavg-lora")
class FedAvgLoRA(LoRAMethod):
    """FedIT (Zhang et al., arXiv 2305.05644) / OpenFedLLM (arXiv 2402.06954): FedAvg over LoRA.

    - Shared: LoRA (rank 8, alpha 16, dropout 0.05) on the q and v projections of every attention
      block where the backbone family puts it, and what else trains:
      - ``clip`` family: in the frozen CLIP image tower, with the answer side (the shared trunk and
        the thin task outputs);
      - ``vlm`` family (a generative VLM, LLaVA layout): in the language model (peft), as FedIT and
        OpenFedLLM tune an LLM, with the connector when ``vlm.connector = "shared"``; the LM writes
        the answers (teacher-forced cross-entropy on the answer tokens).
      Nothing is local.
    - Client: plain supervised loss from the received global weights.
    - Server: per-tensor example-weighted mean over the sampled clients (A and B averaged
      separately; the trunk and the connector over all of them, a task's output over the clients
      holding its task).

    Simplification on the ``clip`` family: the papers tune an LLM; there LoRA sits in the frozen
    CLIP image tower, with the same shared/local placement. LoRA dropout is applied to A's input
    columns, once per forward (the weight-space form of input dropout); on a transformers model
    (Hugging Face CLIP, the ``vlm`` family) the LoRA is peft's, which drops the layer input element
    by element.
    """

    paper = "https://arxiv.org/abs/2305.05644"


@register_method("ffa-lora")
class FFALoRA(FedAvgLoRA):
    """FFA-LoRA (Sun et al., ICLR 2024, arXiv 2403.12313): FedAvg-LoRA with A frozen.

    A is frozen at the initialisation every client builds from the same seed; only B and the
    task heads train and travel (half the LoRA bytes), averaged as in ``fedavg-lora``.
    Simplification on the ``clip`` family, as for ``fedavg-lora``: LoRA in the CLIP image tower
    instead of an LLM (on the ``vlm`` family it is in the LM, as the paper puts it).
    """

    paper = "https://arxiv.org/abs/2403.12313"

    def build_model(self, backbone: Backbone, tasks: Sequence[TaskSpec], answer_side: str = "shared") -> ClientModel:
        model = super().build_model(backbone, tasks, answer_side)
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)  # every client builds A from the same seed
        return model


@register_method("fedsa-lora")
class FedSALoRA(FedAvgLoRA):
    """FedSA-LoRA (Guo et al., ICLR 2025, arXiv 2410.01463): A shared, B local.

    The A matrices are shared and averaged by examples; the B matrices and the answer side (the
    trunk and the task outputs) stay on their client. Simplification on the ``clip`` family, as for
    ``fedavg-lora``: LoRA in the CLIP image tower instead of an LLM (on the ``vlm`` family it is in the
    LM). Harness choice on the ``vlm`` family: a training connector (``vlm.connector = "shared"``) is
    shared and averaged, as in every row (the protocol's connector setting applies to every row alike).
    """

    paper = "https://arxiv.org/abs/2410.01463"

    def tag(self, name: str) -> Tag:
        return "shared" if ".lora_A." in name or is_connector(name) else "local"
