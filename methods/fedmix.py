"""FedMix: Federated Mixture of Experts (Reisser et al., arXiv 2107.06724; docs/methods.md §2).

The method's description, harness choices included, is the class docstring (shown by
``fedbench describe``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fedbench.adapters.lora import LoRAMixing, LoRASpec, inject_lora, lora_param
from fedbench.adapters.moa import Adapter, entropy
from fedbench.api import NON_NEGATIVE, bounded, check_bounds, device_index
from fedbench.api.aggregate import weighted_mean
from fedbench.api.backbone import Backbone, backbone_family
from fedbench.api.batch import Batch, Features
from fedbench.api.method import ClientInfo, Method, Reply, Tag, register_method
from fedbench.api.model import AnswerTrunk, ClientModel, answer_input, make_heads
from fedbench.api.payload import META, Payload
from fedbench.api.task import TaskSpec
from fedbench.api.vlm_model import IGNORE, VLMClientModel

if TYPE_CHECKING:
    from fedbench.api.vlm import VisionLanguageModel

EXPERT = "expert"  # a vlm expert's peft adapter name: expert<k>
SELECTION = "selection/"  # server-state prefix of the per-client expert selections
META_SELECTION = META + "selection"
META_GATE_MASS = META + "gate_mass"


@bounded(sparsity_weight=NON_NEGATIVE)
@dataclass(frozen=True)
class FedMixOptions:
    """K experts (the paper's CIFAR-10 setting), m per client, entropy sparsity weight."""

    num_experts: int = 4
    experts_per_client: int = 2
    sparsity_weight: float = 0.01
    bottleneck: int = 32

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts = {self.num_experts} must be >= 1")
        if not 1 <= self.experts_per_client <= self.num_experts:
            raise ValueError(f"experts_per_client = {self.experts_per_client} must be in [1, num_experts]")
        check_bounds(self)  # sparsity_weight: finite and >= 0
        if self.bottleneck < 1:
            raise ValueError(f"bottleneck = {self.bottleneck} must be >= 1")


class Expert(nn.Module):
    """One expert: an adapter on the patch tokens and its own output per task (on the model's shared
    answer trunk; full per-task heads when there is no trunk)."""

    def __init__(
        self, tasks: Sequence[TaskSpec], token_dim: int, embed_dim: int, bottleneck: int, trunk: AnswerTrunk | None
    ) -> None:
        super().__init__()
        self.adapter = Adapter(token_dim, bottleneck)
        self.heads = make_heads(tasks, trunk, token_dim, embed_dim)


class FedMixModel(ClientModel):
    """Frozen towers -> K (adapter + heads) experts mixed by a shared gate."""

    def __init__(
        self, backbone: Backbone, tasks: list[TaskSpec], options: FedMixOptions, answer_side: str = "shared"
    ) -> None:
        super().__init__(backbone, tasks, answer_side)
        for p in self.heads.parameters():  # only the heads' static loss / correct rules are used
            p.requires_grad_(False)
        dt, de = backbone.token_dim, backbone.embed_dim
        self.experts = nn.ModuleList(
            Expert(tasks, dt, de, options.bottleneck, self.trunk) for _ in range(options.num_experts)
        )
        self.gate = nn.Linear(2 * de, options.num_experts)
        self.expert_names = [f"expert{k}" for k in range(options.num_experts)]
        self.sparsity_weight = options.sparsity_weight
        self.is_box = {t.name: t.is_box for t in tasks}
        self._gate_probs: torch.Tensor | None = None
        # what this client's last local update chose (read by upload)
        self.selection: torch.Tensor | None = None
        self.gate_mass: torch.Tensor | None = None

    def gate_probs(self, f: Features) -> torch.Tensor:
        return self.gate(torch.cat([f.image, f.question], -1)).softmax(-1)

    def gate_of(self, batch: Batch, cached: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """The gate's probabilities [B, K] for the rows."""
        return self.gate_probs(self.encode(batch, cached))

    def forward(
        self, batch: Batch, cached: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        f = self.encode(batch, cached)
        g = self.gate_probs(f)
        self._gate_probs = g
        self.routing = g
        reps = [answer_input(self.trunk, replace(f, tokens=f.tokens + e.adapter(f.tokens))) for e in self.experts]
        outputs = {}
        for name in dict.fromkeys(batch.task.tolist()):
            idx = device_index(np.flatnonzero(batch.task == name), f.image.device)
            gk = g[idx]  # [b, K]
            outs = [e.heads[name](rep.select(idx)) for e, rep in zip(self.experts, reps, strict=True)]
            if self.is_box[name]:
                mixed = (torch.stack(outs, -1) * gk.unsqueeze(1)).sum(-1)
            else:  # log of the mixture of predictive distributions
                logp = torch.stack([o.log_softmax(-1) for o in outs], -1)  # [b, A, K]
                mixed = torch.logsumexp(logp + gk.clamp_min(1e-12).log().unsqueeze(1), -1)
            outputs[name] = (idx, mixed)
        return outputs

    def extra_loss(self) -> torch.Tensor | float:
        if self._gate_probs is None or self.sparsity_weight == 0:
            return 0.0
        return self.sparsity_weight * entropy(self._gate_probs.mean(0))


class FedMixVLMModel(LoRAMixing, VLMClientModel):
    """``vlm``: K LoRA experts on the LM (peft adapters ``expert<k>``), mixed by the shared gate on the
    pooled vision tokens and the LM's input embedding of the question. Every next-token distribution is
    the gate-weighted mixture of the K experts' (K forward passes of the LM per step, in training and in
    generation)."""

    def __init__(self, backbone: VisionLanguageModel, tasks: list[TaskSpec], options: FedMixOptions) -> None:
        super().__init__(backbone, tasks, backbone.train_connector)
        self.expert_names = [f"{EXPERT}{k}" for k in range(options.num_experts)]
        inject_lora(backbone, LoRASpec(), adapters=tuple(self.expert_names))
        self.gate = nn.Linear(backbone.vision_dim + backbone.lm_dim, options.num_experts)
        self.sparsity_weight = options.sparsity_weight
        self._gate_probs: torch.Tensor | None = None
        self.selection: torch.Tensor | None = None
        self.gate_mass: torch.Tensor | None = None

    def gate_of(self, batch: Batch, cached: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        vision = self.vision(batch, cached).to(self.gate.weight.device)
        f = self.features(vision, batch)
        return self.gate(torch.cat([f.image, f.question], -1)).softmax(-1)

    def loss(self, batch: Batch, cached: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The mixture's NLL of each answer token, −log Σ_k g_k p_k(y_t | y_<t), mean over the answer tokens."""
        embeds, mask, labels = self.embed(batch, cached, answers=True)
        g = self.gate_of(batch, cached)
        self._gate_probs = self.routing = g
        keep = labels[:, 1:] != IGNORE
        rows = torch.nonzero(keep)[:, 0]
        logps = []
        for name in self.expert_names:
            with self.mixed({name: 1.0}):
                hidden = self.backbone.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            logps.append(self.backbone.lm_head(hidden[:, :-1][keep]).float().log_softmax(-1))
        mixed = torch.logsumexp(torch.stack(logps, -1) + g[rows].clamp_min(1e-12).log().unsqueeze(1), -1)
        return -mixed.gather(1, labels[:, 1:][keep].unsqueeze(1)).mean() + self.extra_loss()

    def extra_loss(self) -> torch.Tensor | float:
        if self._gate_probs is None or self.sparsity_weight == 0:
            return 0.0
        return self.sparsity_weight * entropy(self._gate_probs.mean(0))

    @torch.no_grad()
    def generate(
        self, batch: Batch, cached: tuple[torch.Tensor, torch.Tensor] | None, max_new_tokens: int
    ) -> tuple[list[str], np.ndarray]:
        """Greedy answers from the mixture of the experts' next-token distributions (left-padded batch,
        one KV cache per expert), and per row whether it was cut at ``max_new_tokens``."""
        vlm = self.backbone
        embeds, mask, _ = self.embed(batch, cached, answers=False)
        g = self.gate_of(batch, cached)
        self.routing = g
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate numbers a left-padded prompt
        caches: list = [None] * len(self.expert_names)
        written, done = [], torch.zeros(len(mask), dtype=torch.bool, device=mask.device)
        for _ in range(max_new_tokens):
            probs = 0.0
            for k, name in enumerate(self.expert_names):
                with self.mixed({name: 1.0}):
                    out = vlm.model(
                        inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                        cache=caches[k], use_cache=True, logits_to_keep=1,
                    )  # fmt: skip
                caches[k] = out.cache
                probs = probs + g[:, k : k + 1] * out.logits[:, -1].float().softmax(-1)
            token = torch.where(done, vlm.pad_token_id, probs.argmax(-1))
            written.append(token)
            done |= token == vlm.eos_token_id
            if bool(done.all()):
                break
            embeds = vlm.input_embeddings(token[:, None])
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
            positions = positions[:, -1:] + 1
        return self.read_answers(torch.stack(written, 1).tolist())


def expert_of(name: str) -> int | None:
    """Index of the expert a parameter belongs to (None for the gate): ``experts.<k>.*`` (clip), or a LoRA
    tensor of the peft adapter ``expert<k>`` (vlm)."""
    if name.startswith("experts."):
        return int(name.split(".")[1])
    found = lora_param(name)
    return int(found[1][len(EXPERT) :]) if found is not None and found[1].startswith(EXPERT) else None


def exchanged(client: ClientInfo, name: str) -> bool:
    """False for an expert's head of a task the client does not hold."""
    parts = name.split(".")
    if len(parts) > 3 and parts[0] == "experts" and parts[2] == "heads":
        return parts[3] in client.tasks
    return True


@register_method("fedmix")
class FedMix(Method):
    """FedMix, Federated Mixture of Experts (Reisser et al.): https://arxiv.org/abs/2107.06724 (docs/methods.md §2).

    Not the mixup method of the same name (Yoon et al. 2021). No public code exists.

    - Shared: one gate (Linear on concat(pooled image, pooled question) -> softmax over K, one
      gate for all clients) and K experts, each a bottleneck adapter on the patch tokens plus its
      own thin output per task on the shared answer trunk (its own full per-task heads under
      ``answer_side = "per_task"``). The trunk (the LLM's part, one for all experts) is averaged
      over all sampled clients like the gate. Nothing is local; the default ``model.heads`` are
      frozen and unused (only their static loss / accuracy rules are).
    - Prediction: the gate-weighted mixture of the experts' predictive distributions; answer
      tasks output ``log Σ_k g_k softmax(logits_k)`` (cross-entropy on it = the mixture's NLL),
      box tasks ``Σ_k g_k box_k``.
    - Exchange, the selection before the experts (a two-message download, ``Method.request``):
      (1) the server sends the current gate (with every other non-expert tensor: the trunk);
      (2) the client measures that gate's mean mass over all its training rows and selects the
      top ``experts_per_client`` experts; it sends the selection (``meta.selection``, m int64
      indices: uplink bytes); (3) the server sends its current copies of those experts. Every
      message is serialized and counted (the train record's ``up_bytes`` / ``down_bytes`` sum
      them; ``request`` records the round's selection). The selection is fixed for the round.
    - Client: trains the gate and exactly the experts it received, starting from the server's
      copies; uploads them, the gate and its mean gate mass. Loss = mixture NLL (+ box loss on
      the mixed box) + ``sparsity_weight`` × entropy of the batch's mean gate mass.
    - Server: gate = example-weighted mean over the sampled clients; expert k = mean over the
      clients that trained it, weighted by examples × that client's mean gate mass on k.

    - Where it acts, per backbone family: ``clip``, each expert is an adapter on the frozen CLIP patch
      tokens with its own outputs (above); ``vlm`` (a generative VLM), each expert is a LoRA adapter
      on the LM's q and v (rank 8, alpha 16, dropout 0.05; peft adapter ``expert<k>``), the gate reads
      the pooled vision tokens and the LM's input embedding of the question, and every next-token
      distribution is ``Σ_k g_k softmax(logits_k)``: training minimises that mixture's NLL of each
      answer token and generation is greedy on it. Cost: K forward passes of the LM per training
      step and per generated token (K KV caches), about K times a LoRA row's compute. The
      connector, when ``vlm.connector = "shared"``, travels with the gate.

    Simplifications / harness choices:
    - Experts are adapters + heads on frozen CLIP features, or LoRA experts on a VLM's LM (the paper
      trains whole networks).
    - Sparsity penalty = entropy of the client's mean gate mass over the batch, weight 0.01.
    - Expert aggregation weights (examples × gate mass) are ours; the paper's are unverified.
    - The upload carries the client's mean gate mass ``meta.gate_mass`` (K floats, measured with
      the received gate: the aggregation weights), not the selection again: the uploaded experts
      are the selection, which the server keeps under ``selection/<client>`` (latest, unused by
      the exchange).
    - Faithful to the paper's "each client keeps only its experts": a client is evaluated with
      ITS experts, after the same exchange as in training: the final gate, its selection with
      that gate over its training rows, the server's copies of those experts (every task's
      heads: evaluation asks for all tasks). An expert it does not select stays at the client's
      own stored copy (or the common init if it never trained it).
    - As for every method here, an expert's heads of tasks the client does not hold are neither
      trained nor exchanged.
    - An upload made before any selection (a model no exchange has reached) carries experts
      0..m-1 and a uniform gate mass: a stand-in to show the bytes.
    """

    Options = FedMixOptions
    paper = "https://arxiv.org/abs/2107.06724"

    families = ("clip", "vlm")

    def build_model(self, backbone: Backbone, tasks: Sequence[TaskSpec], answer_side: str = "shared") -> ClientModel:
        if backbone_family(backbone) == "vlm":
            return FedMixVLMModel(backbone, list(tasks), self.options)
        return FedMixModel(backbone, list(tasks), self.options, answer_side)

    def tag(self, name: str) -> Tag:
        return "shared"

    # --- client ------------------------------------------------------------------------------
    @torch.no_grad()
    def measure_gate_mass(self, model: FedMixModel, ctx) -> torch.Tensor:
        """Mean gate probability over all the client's training rows (downloaded gate, no grad)."""
        model.eval()
        rows = ctx.train_rows
        total = torch.zeros(self.options.num_experts, dtype=torch.float64)
        step = max(1, ctx.protocol.eval.batch_size)
        for i in range(0, len(rows), step):
            batch, cached = ctx.inputs(model, rows[i : i + step])
            total += model.gate_of(batch, cached).sum(0).double().cpu()
        return (total / max(len(rows), 1)).float()

    def select(self, model: FedMixModel, ctx) -> torch.Tensor:
        """Top ``experts_per_client`` experts by the model's gate's mean mass over the client's
        training rows (sorted indices); sets ``model.selection`` and ``model.gate_mass``."""
        mass = self.measure_gate_mass(model, ctx)
        model.selection = torch.sort(torch.topk(mass, self.options.experts_per_client).indices).values
        model.gate_mass = mass
        return model.selection

    def prepare_client(self, model: FedMixModel, ctx) -> None:
        """Each time a client is loaded it has no selection yet: :meth:`request` makes it."""
        model.selection = model.gate_mass = None

    def request(self, model: FedMixModel, ctx) -> Payload:
        """Client, with the current gate just received: select, and ask for those experts."""
        return {META_SELECTION: self.select(model, ctx).to(torch.int64).clone()}

    def local_update(self, model: FedMixModel, ctx) -> None:
        """Train the gate and the experts of this round's selection (made by :meth:`request` before
        they came down; selected here only when no exchange ran, e.g. a direct call in a test)."""
        selection = model.selection if model.selection is not None else self.select(model, ctx)
        trained = {None, *selection.tolist()}  # the gate and the trunk (no expert), and the selected experts
        ctx.train(model, [p for n, p in model.named_parameters() if p.requires_grad and expert_of(n) in trained])

    # --- communication --------------------------------------------------------------------
    def upload(self, model: FedMixModel, client: ClientInfo) -> Payload:
        k, m = self.options.num_experts, self.options.experts_per_client
        selection = model.selection if model.selection is not None else torch.arange(m)
        mass = model.gate_mass if model.gate_mass is not None else torch.full((k,), 1.0 / k)
        chosen = set(selection.tolist())
        tags = self.tags(model)
        up = {
            n: p.detach().clone()
            for n, p in model.named_parameters()
            if tags.get(n) == "shared" and exchanged(client, n) and expert_of(n) in (None, *chosen)
        }
        up[META_GATE_MASS] = mass.to(torch.float32).clone()
        return up

    def download(self, server_state: Payload, client: ClientInfo) -> Payload:
        """First message: the gate (and every other shared tensor that is not an expert's)."""
        return {
            n: t
            for n, t in server_state.items()
            if not n.startswith(SELECTION) and expert_of(n) is None and exchanged(client, n)
        }

    def answer(self, server_state: Payload, client: ClientInfo, request: Payload) -> Payload:
        """Second message: the server's current copies of the experts the client selected."""
        chosen = self.requested(request)
        return {n: t for n, t in server_state.items() if expert_of(n) in chosen and exchanged(client, n)}

    def requested(self, request: Payload) -> set[int]:
        """The experts a request names: ``experts_per_client`` distinct indices in [0, K)."""
        k, m = self.options.num_experts, self.options.experts_per_client
        selection = request.get(META_SELECTION)
        chosen = set() if selection is None else set(selection.tolist())
        if selection is None or selection.numel() != m or len(chosen) != m or not chosen <= set(range(k)):
            got = None if selection is None else selection.tolist()
            raise ValueError(
                f"fedmix: a request names {m} distinct experts of 0..{k - 1} ({META_SELECTION}); got {got}"
            )
        return chosen

    def aggregate(self, server_state: Payload, replies: Sequence[Reply]) -> Payload:
        """Gate: example-weighted mean; expert k: over its trainers, weights examples × gate mass on k."""
        params = [{n: t for n, t in r.payload.items() if not n.startswith(META)} for r in replies]
        new = weighted_mean(
            [{n: t for n, t in p.items() if expert_of(n) is None} for p in params],
            [r.num_examples for r in replies],
        )
        trained = sorted({expert_of(n) for p in params for n in p} - {None})
        for k in trained:
            group = [(p, r) for p, r in zip(params, replies, strict=True) if any(expert_of(n) == k for n in p)]
            new.update(
                weighted_mean(
                    [{n: t for n, t in p.items() if expert_of(n) == k} for p, _ in group],
                    [r.num_examples * float(r.payload[META_GATE_MASS][k]) for _, r in group],
                )
            )
        for p, r in zip(params, replies, strict=True):  # a client's selection: the experts it trained
            selection = sorted({expert_of(n) for n in p} - {None})
            new[f"{SELECTION}{r.client.client}"] = torch.tensor(selection, dtype=torch.int64)
        return {**server_state, **new}
