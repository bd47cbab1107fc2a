"""The LoRA family's base: one client model with the backbone family's LoRA, which the LoRA rows
(``fedavg-lora``, ``ffa-lora``, ``fedsa-lora``) and the reference rows (``local-only``,
``centralized``) build on, so that no method imports another."""

from __future__ import annotations

from collections.abc import Sequence

from fedbench.adapters.lora import LoRASpec, inject_lora
from fedbench.api.backbone import Backbone, backbone_family
from fedbench.api.method import Method
from fedbench.api.model import ClientModel
from fedbench.api.task import TaskSpec
from fedbench.api.vlm_model import VLMClientModel


class LoRAMethod(Method):
    """The client model with LoRA (rank, alpha, dropout from the row's options) where the backbone
    family puts it: on q and v of every attention block of the CLIP image tower (with the answer
    trunk and task outputs), or of the generative VLM's language model (with the connector when
    ``vlm.connector = "shared"``); every trainable tensor shared unless a row tags it."""

    Options = LoRASpec  # rank, alpha, dropout (FedIT's defaults: 8, 16, 0.05), validated
    families = ("clip", "vlm")

    def build_model(
        self, backbone: Backbone, tasks: Sequence[TaskSpec], answer_side: str = "shared"
    ) -> ClientModel | VLMClientModel:
        if backbone_family(backbone) == "vlm":
            model = VLMClientModel(backbone, tasks, backbone.train_connector)
        else:
            model = ClientModel(backbone, list(tasks), answer_side)
        inject_lora(backbone, self.options.lora)  # the backbone family's LoRA (peft for transformers)
        return model
