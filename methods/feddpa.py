"""FedDPA-T: Dual-Personalizing Adapter (Yang et al., NeurIPS 2024, https://arxiv.org/abs/2403.19211).

The method's description, harness choices included, is the class docstring (shown by
``fedbench describe``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F

from fedbench.adapters.lora import LoRAMixing, LoRASpec, inject_lora, lora_param
from fedbench.api import UNIT, Bound, bounded, check_bounds
from fedbench.api.aggregate import weighted_mean
from fedbench.api.backbone import Backbone, backbone_family
from fedbench.api.batch import Batch, sub_batch
from fedbench.api.method import Method, Reply, Tag, register_method
from fedbench.api.model import ClientModel, is_answer_side
from fedbench.api.payload import Payload
from fedbench.api.task import TaskSpec
from fedbench.api.vlm_model import VLMClientModel, is_connector

if TYPE_CHECKING:
    from fedbench.api.context import ClientContext
    from fedbench.api.vlm import VisionLanguageModel

GLOBAL, LOCAL = "global", "local"
REFERENCE_STREAM = "feddpa-reference"


@bounded(local_weight=Bound(0, 1, lo_open=True), max_weight=UNIT)  # LoRASpec declares alpha's and dropout's
@dataclass(frozen=True)
class FedDPAOptions(LoRASpec):
    """FedDPA-T defaults of the official code (LoRA ``rank`` 8 / ``alpha`` 16 / ``dropout`` 0.05 on q,
    v: :class:`~fedbench.adapters.lora.LoRASpec`'s fields and checks) and the dual-adapter options."""

    local_weight: float = 0.5  # weight of the local adapter in pass (1); the global gets 1 - it
    num_reference: int = 5  # training inputs compared with each test instance
    max_weight: float = 0.5  # α = max_weight × mean cosine similarity
    weighting: Literal["uniform", "examples"] = "uniform"
    heads: Literal["shared", "local"] = "shared"
    embedding: Literal["pooled", "token_mean"] = "pooled"  # official emb_type: last (default) / avg

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bounds(self)  # local_weight, max_weight (and LoRA's alpha, dropout): finite and in bounds
        if self.num_reference < 1:
            raise ValueError(f"num_reference = {self.num_reference} must be >= 1")


def adapter_of(name: str) -> str | None:
    """``global`` / ``local`` for a LoRA parameter name (``...lora_A.global``; peft's ``...lora_A.global.weight``)."""
    found = lora_param(name)
    return found[1] if found is not None and found[1] in (GLOBAL, LOCAL) else None


class FedDPAModel(LoRAMixing, ClientModel):
    """``clip``: the backbone with global + local LoRA in the image tower; routing = per-row [α, 1 − α] at
    evaluation."""

    def __init__(self, backbone: Backbone, tasks: list[TaskSpec], spec: LoRASpec, answer_side: str = "shared") -> None:
        super().__init__(backbone, tasks, answer_side)
        inject_lora(backbone, spec, adapters=(GLOBAL, LOCAL))
        self.expert_names = [GLOBAL, LOCAL]
        self.image_alpha: dict[int, float] = {}  # image id -> α of the last encode_images

    def forward(
        self, batch: Batch, cached: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = super().forward(batch, cached)
        ids = batch.image_index.tolist()
        if self.image_alpha and all(i in self.image_alpha for i in ids):
            alpha = torch.tensor([self.image_alpha[i] for i in ids], dtype=torch.float32)
            self.routing = torch.stack([alpha, 1 - alpha], -1)
        else:
            self.routing = None
        return out


class FedDPAVLMModel(LoRAMixing, VLMClientModel):
    """``vlm``: a generative VLM with global + local LoRA on its LM (the connector trains when the protocol
    says ``vlm.connector = "shared"``, shared as in every row)."""

    def __init__(self, backbone: VisionLanguageModel, tasks: list[TaskSpec], spec: LoRASpec) -> None:
        super().__init__(backbone, tasks, backbone.train_connector)
        inject_lora(backbone, spec, adapters=(GLOBAL, LOCAL))
        self.expert_names = [GLOBAL, LOCAL]

    def prompt_embeddings(
        self, batch: Batch, cached: tuple[torch.Tensor, torch.Tensor] | None, embedding: str = "pooled"
    ) -> torch.Tensor:
        """The LM's last-layer states of the rows' prompts (no answer) under the current mix: the last
        prompt token's (``pooled``: the official ``emb_type=last``) or their mean (``token_mean``)."""
        embeds, mask, _ = self.embed(batch, cached, answers=False)  # left-padded
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate numbers a left-padded prompt
        hidden = self.backbone.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions
        ).last_hidden_state
        if embedding == "pooled":
            return hidden[:, -1]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1)


@contextmanager
def evaluating(model: ClientModel) -> Iterator[None]:
    """Eval mode (no LoRA dropout) and no gradients; the previous mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def local_embeddings(
    model: FedDPAModel, image_ids: torch.Tensor, ctx: ClientContext, embedding: str = "pooled"
) -> torch.Tensor:
    """Image embeddings with only the local adapter active (mix {local: 1}): the pooled embedding,
    or the mean of the patch tokens (``token_mean``)."""
    with evaluating(model), model.mixed({LOCAL: 1.0}):
        tokens, pooled = model.backbone.encode_image(ctx.images(image_ids))
    return pooled if embedding == "pooled" else tokens.mean(1)


def reference_images(ctx: ClientContext, num_reference: int = 5) -> torch.Tensor:
    """Image ids of ``num_reference`` training inputs of the client (the ``feddpa-reference`` stream)."""
    rows = ctx.sample(num_reference, REFERENCE_STREAM)
    return ctx.image_ids(rows)


def instance_alphas(
    model: FedDPAModel,
    image_ids: torch.Tensor,
    ctx: ClientContext,
    num_reference: int = 5,
    max_weight: float = 0.5,
    embedding: str = "pooled",
) -> torch.Tensor:
    """α per image: max_weight × mean cosine similarity (local-adapter embeddings) to the references."""
    test = local_embeddings(model, image_ids, ctx, embedding)
    refs = local_embeddings(model, reference_images(ctx, num_reference), ctx, embedding)
    sims = F.cosine_similarity(test[:, None, :], refs[None, :, :], dim=-1)  # [n_images, n_refs]
    return (max_weight * sims.mean(1)).cpu()


@register_method("feddpa")
class FedDPA(Method):
    """FedDPA-T (Yang et al., NeurIPS 2024): https://arxiv.org/abs/2403.19211 (docs/methods.md §4).

    Shared / local / aggregation: two LoRA adapters on the q and v projections of every image-tower
    attention block: the **global** adapter (shared; the only adapter that travels) and the
    **local** adapter (never leaves its client). The answer side (the shared trunk and the thin task
    outputs, or the per-task heads under ``answer_side = "per_task"``; "heads" below) is shared by
    default (option ``heads``; see below). Server: mean of the uploads with **uniform** weights, as the official
    ``FedAvg`` (``fed_utils/model_aggregation.py`` weights every client by 1); ``weighting=examples``
    weights by training examples. Each tensor is averaged over the replies that carry it (the trunk
    over all sampled clients, a task's output over the clients holding its task).

    Client schedule (FedDPA-T, official ``main.py`` with ``--local_model True``): round 0 trains the
    global adapter alone (mix {global: 1}). Every later round runs two passes of ``local.steps``
    steps each: (1) the local adapter, with the received global adapter mixed in frozen and
    detached (mix {local: w, global: 1 - w}, ``local_weight`` w = 0.5); (2) the global adapter
    alone (mix {global: 1}) from the received global, which is then uploaded. A round thus costs
    twice the compute of FedAvg-LoRA after round 0, as in the paper.

    Inference (instance-wise dynamic weighting, official ``GlobalModel_generated.py --auto``): each
    test image is embedded with the local adapter alone; α = ``max_weight`` (0.5) × the mean cosine
    similarity to the embeddings of ``num_reference`` (5) of the client's training inputs; the
    image's features are then computed with the mix {global: α, local: 1 − α}. One α per image,
    never one per batch. ``model.routing`` = [α, 1 − α] per row (experts "global", "local"), so the
    expert-usage records show the mixing.

    Where it acts, per backbone family:
    - ``clip``: both adapters in the frozen CLIP image tower (as for FedAvg-LoRA), the answer side as
      below; the "instance" whose α is computed is the image.
    - ``vlm`` (a generative VLM), the paper's setting: both adapters on the LM's q and v (peft); the
      instance is the row's prompt, embedded as the LM's last-layer state of the prompt's last token
      with the local adapter alone (``embedding=token_mean``: the mean over the prompt's tokens), against
      ``num_reference`` of the client's training prompts; each row's answer is generated with its own
      mix (one generation per row). The connector, when ``vlm.connector = "shared"``, trains with the
      global adapter (round 0 and pass (2)) and is averaged like it; ``heads`` does not apply (the LM
      writes every answer).

    Simplifications / harness choices:
    - On ``clip`` there is no LLM: the embedding is the pooled image embedding with the local adapter
      active (official: the LLM's last hidden state of the prompt's last token with the local adapter
      active, which is what the ``vlm`` form uses).
    - Task heads: in the paper the output layer is the LLM's pretrained head, identical on every
      client, and the global adapter exists to serve test-time tasks the client never trained
      (the TTP score). Our heads are new and must be trained; kept local, a client's heads of the
      tasks it does not hold would stay at their init and its TTP on those tasks would be chance
      whatever the global adapter learned. So by default (``heads=shared``) heads play the role of
      the common output layer: trained with the global adapter in pass (2) and in round 0, frozen
      while the local adapter trains in pass (1), exchanged only for held tasks and averaged like
      the global adapter; personalization lives in the local adapter alone, as in the paper.
      ``heads=local`` keeps them personal instead (trained in both passes, never sent).
    - Embedding for α: ``embedding=pooled`` (default) uses the pooled image embedding, the
      analogue of the official default ``emb_type=last``; ``token_mean`` averages the patch
      tokens, the analogue of ``emb_type=avg``. Beware: the embedded backbone's pooled embeddings
      of different images are nearly orthogonal (mean pairwise cosine ≈ 0.04, against ≈ 0.73 for
      the token mean), so with ``pooled`` α stays near 0 and inference runs almost on the local
      adapter alone; the LLM hidden states of the paper are far more similar to each other.
    - Reference inputs: one draw of ``num_reference`` training rows per client and evaluation
      (``ctx.sample``, with replacement), shared by all its test images (official: a fresh
      ``random.sample`` per test instance). α is not clipped (official neither).
    - Exact per-instance mixing: the LoRA delta lives in the weights, so each unique test image
      runs through the tower alone with its own mix (one forward per image at evaluation).
    - The local adapter is created at build (B = 0) and persists in the client's stored state
      (official: created fresh in round 1, reloaded from the client's last local adapter later).
    - Only FedDPA-T (iterative) is implemented, not FedDPA-F (fine-tune the local adapter after
      federated training).
    """

    Options = FedDPAOptions
    paper = "https://arxiv.org/abs/2403.19211"

    families = ("clip", "vlm")

    def build_model(self, backbone: Backbone, tasks: Sequence[TaskSpec], answer_side: str = "shared") -> ClientModel:
        if backbone_family(backbone) == "vlm":
            if self.options.heads != "shared":
                raise ValueError(
                    f"feddpa: heads = '{self.options.heads}' does not apply to the vlm family (the LM writes every "
                    "answer: there are no heads); leave heads at 'shared'"
                )
            return FedDPAVLMModel(backbone, list(tasks), self.options.lora)
        return FedDPAModel(backbone, list(tasks), self.options.lora, answer_side)

    def tag(self, name: str) -> Tag:
        adapter = adapter_of(name)
        if adapter == GLOBAL:
            return "shared"
        if adapter == LOCAL:
            return "local"
        if is_connector(name):  # a generative VLM's connector, when it trains: shared, as in every row
            return "shared"
        if is_answer_side(name):
            return self.options.heads
        raise ValueError(f"feddpa: unexpected trainable parameter '{name}'")

    def local_update(self, model: ClientModel, ctx: ClientContext) -> None:
        assert isinstance(model, FedDPAModel | FedDPAVLMModel)
        if isinstance(model, FedDPAModel):
            model.image_alpha.clear()
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        glob = [p for n, p in params if adapter_of(n) == GLOBAL]
        loc = [p for n, p in params if adapter_of(n) == LOCAL]
        heads = [p for n, p in params if adapter_of(n) is None]  # the answer side (clip), the connector (vlm)
        if ctx.round > 0:  # pass (1): the local adapter, global mixed in frozen and detached
            w = self.options.local_weight
            with model.mixed({LOCAL: w, GLOBAL: 1.0 - w}, detached=(GLOBAL,)):
                ctx.train(model, loc + (heads if self.options.heads == "local" else []), phase="feddpa-local")
        with model.mixed({GLOBAL: 1.0}):  # pass (2) / round 0: the global adapter alone
            ctx.train(model, glob + heads, phase="feddpa-global")

    def encode_images(
        self, model: ClientModel, image_ids: torch.Tensor, ctx: ClientContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: α from the local-adapter embedding, then features with mix {global: α, local: 1 − α}."""
        assert isinstance(model, FedDPAModel)
        o = self.options
        alphas = instance_alphas(model, image_ids, ctx, o.num_reference, o.max_weight, o.embedding).tolist()
        images = ctx.images(image_ids)
        tokens, pooled = [], []
        with evaluating(model):
            for i, alpha in enumerate(alphas):  # one forward per image: the mix is in the weights
                with model.mixed({GLOBAL: alpha, LOCAL: 1.0 - alpha}):
                    t, p = model.backbone.encode_image(images[i : i + 1])
                tokens.append(t)
                pooled.append(p)
        model.image_alpha.update(zip(image_ids.tolist(), alphas, strict=True))
        return torch.cat(tokens), torch.cat(pooled)

    def generate(
        self, model: ClientModel, batch: Batch, cached: tuple[torch.Tensor, torch.Tensor] | None, budget: int,
        ctx: ClientContext,
    ) -> tuple[list[str], np.ndarray]:  # fmt: skip
        """Per row of a generative VLM: α from the LM's prompt states with the local adapter alone, against
        ``num_reference`` of the client's training prompts; then the row's answer generated with the mix
        {global: α, local: 1 − α} (one generation per row: the mix is in every LoRA layer)."""
        assert isinstance(model, FedDPAVLMModel)
        o = self.options
        refs = ctx.sample(o.num_reference, REFERENCE_STREAM)
        with evaluating(model), model.mixed({LOCAL: 1.0}):
            test = model.prompt_embeddings(batch, cached, o.embedding)
            ref = model.prompt_embeddings(*ctx.inputs(model, refs), o.embedding)
        sims = F.cosine_similarity(test[:, None, :], ref[None, :, :], dim=-1)
        alphas = (o.max_weight * sims.mean(1)).cpu()
        texts, cut = [], np.zeros(len(batch), dtype=bool)
        for i, alpha in enumerate(alphas.tolist()):
            one = torch.tensor([i])
            row_cached = None if cached is None else (cached[0][i : i + 1], cached[1][i : i + 1])
            with model.mixed({GLOBAL: alpha, LOCAL: 1.0 - alpha}):
                text, was_cut = model.generate(sub_batch(batch, one), row_cached, budget)
            texts += text
            cut[i] = was_cut[0]
        model.routing = torch.stack([alphas, 1 - alphas], -1)
        return texts, cut

    def aggregate(self, server_state: Payload, replies: Sequence[Reply]) -> Payload:
        """Mean of the uploads per tensor: uniform weights (official) or by training examples."""
        if self.options.weighting == "uniform":
            weights = [1.0] * len(replies)
        else:
            weights = [float(r.num_examples) for r in replies]
        return {**server_state, **weighted_mean([r.payload for r in replies], weights)}
