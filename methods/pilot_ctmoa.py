"""Pilot's CT-MoA (Xiong et al., AAAI 2025, arXiv 2501.13985; docs/methods.md §5).

The method's description, harness choices included, is the class docstring (shown by
``fedbench describe``); the shared machinery is :mod:`fedbench.adapters.task_experts`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedbench.adapters.expert_models import AOA, CLIENT_ADAPTER, ROUTER
from fedbench.adapters.task_experts import TaskExpertOptions, TaskExpertsMethod
from fedbench.api.method import ClientInfo, Tag, register_method


@dataclass(frozen=True)
class PilotOptions(TaskExpertOptions):
    """Task-expert options plus ``share_router`` (false: router and adapters-on-adapters stay local)."""

    share_router: bool = False


@register_method("pilot-ctmoa")
class PilotCTMoA(TaskExpertsMethod):
    """Pilot / CT-MoA (Xiong et al., AAAI 2025): https://arxiv.org/abs/2501.13985 (docs/methods.md §5).

    - Shared: one **task adapter** per task (bottleneck Adapter on the patch tokens); a client
      uploads only its tasks' adapters and the server takes the example-weighted mean within each
      task; all T task adapters go down to every client (counted in the download). The **answer
      trunk** (the LLM's part, used by every task) is shared with Pilot's per-client distance-
      weighted rule across all clients: each client gets its own aggregate (the M = ``nearest``
      closest clients ∝ 1/d, mixed with its own trunk by examples). The thin **task outputs** are
      averaged over the clients holding the task.
    - Local: the **client adapter**, the **router** and the **adapters-on-adapters** (AoA)
      (``share_router=true``: router and AoAs shared, example-weighted mean over the clients that
      trained them this round: clients in stage 2, an AoA only from those not holding its task).
    - Stages per client: a client runs stage 1 on its first ``stage1_participations`` (default 1)
      participations and stage 2 on later ones, so none reaches stage 2 with an untrained client
      adapter (the paper runs stage 1 in the first of 3 rounds with every client taking part; with
      partial participation a round-based schedule would leave late-sampled clients' adapters at
      zero). The harness tells a client its past participations (deterministic sampling). A client
      is evaluated in the stage its next participation would run: stage 2 once it has done its
      stage-1 participations, stage 1 before (a client never sampled). Train records carry ``stage``.
    - Stage 1: tokens' = tokens + A_task(row)(tokens) + C(tokens), loss + ``orth_weight`` (0.1) × the
      orthogonality penalty between A's and C's outputs; no router.
    - Stage 2 (CT-MoA): experts = the T task adapters; own tasks' adapters train, the others are
      frozen, each with a trainable AoA on its output (E_t = A_t + AoA_t(A_t)); router
      Linear(token_dim → T, no bias) on each image token, softmax (``top_k`` = 0: dense, as Pilot's
      released script; k >= 2: top-k renormalised; 1 is refused: its one weight renormalises to a
      constant 1, so the router would learn nothing); tokens' = tokens + Σ_t w_t·E_t(tokens) + C(tokens)
      (C frozen); loss + ``balance_weight`` (0.1) × switch load balance + ``z_weight`` (0.01) × router
      z-loss.
      Usage rows: token-averaged routing weights per task × expert (task names).
    - Reference routing (``routing``, the same option as ``mmrouter-moa``'s): ``learned`` (default,
      the router above); ``oracle`` (no router: each row to its own task's adapter with weight 1, the
      upper bound of task-aware routing; the others and their AoAs get no weight, so no gradient);
      ``uniform`` (no router: weight 1/T on every task expert). Without a router none is built,
      trained or sent, and there is no load-balance or z-loss; the usage rows record those weights.
    - Row (a) of the ``mmrouter-moa`` ablation ladder: ``mmrouter-moa`` with ``router_inputs=image``,
      ``router_scope=local`` and ``ocr_expert=false`` gives bit-identical records.

    - Where it acts, per backbone family:
      - ``clip``: the experts (task, client) are bottleneck adapters on the frozen CLIP patch tokens
        (Pilot's projector position), and the answer trunk plays the part of Pilot's language-side
        LoRA for the distance-weighted per-client aggregation;
      - ``vlm`` (a generative VLM, LLaVA layout), as Pilot's released code runs on LLaVA: the
        connector itself becomes the mixture. Every expert is a connector (LLaVA's 2-layer MLP)
        initialised from the pretrained one; the router reads each vision token before projection;
        the AoAs act on a foreign connector's output (the LM's width); LoRA on the LM's q and v
        (rank 8, alpha 16, dropout 0.05) is the language side, aggregated per client by the distance
        rule. ``vlm.connector`` does not apply (the pretrained connector stays frozen and unused).
        With ``model.answer_side = "frozen_trunk"`` the LM stays as pretrained, without LoRA: the
        connector experts and the router are all that train (the frozen trunk's counterpart).

    Simplifications / harness choices:
    - On ``clip`` there is no LLM (a 2-core CPU): the trunk stands in for it. The released code has no
      server; the server rules are a reading of the paper.
    - On ``vlm`` the parts are whole connectors, so they are averaged where the ``clip`` adapters' deltas
      add: stage 1 (A_task + C) / 2, stage 2 (Σ_t w_t·E_t + C) / 2 (Pilot's ``two_mlp`` sums them; the
      average keeps the LM's input at the pretrained connector's scale at initialisation). C is in the
      stage-2 sum on both families (the released code keeps it out, using it only in its Diff loss);
      the orthogonality penalty is a stage-1 loss on both.
    - Distance-weighted trunk: among all replying clients, d(k, i) = plain L2 distance between
      their flattened trunks (the same parameter set for every pair, so no per-parameter
      normalisation), weights 1/d normalised to sum 1 over the M nearest, that neighbour average
      mixed with the client's own trunk as n_k : Σ n_i. The server keeps each client's aggregate
      (``client<k>/trunk.*``) and the plain example-weighted mean (``trunk.*``, ``heads.*``) for a
      client it has never seen and, at evaluation, for the outputs of tasks a client does not
      hold. Under ``answer_side = "per_task"`` (no trunk) the rule runs task by task on the full
      heads, among the clients holding each task.
    - AoA placement follows docs/methods.md (an adapter on the frozen expert's *output*); the released
      code adds its adapter on the expert's input instead. An AoA exists for every task on every
      client (one model is built before clients are known); a client applies only its foreign
      tasks' AoAs, so its own tasks' AoAs stay untrained and unused.
    - Stage 1 uses the row's own task adapter (rows carry their task id); the model learns its
      stage, tasks and OCR from ``prepare_client`` (called by the harness whenever it loads a client).
    """

    Options = PilotOptions
    paper = "https://arxiv.org/abs/2501.13985"

    def tag(self, name: str) -> Tag:
        if name.startswith(CLIENT_ADAPTER):
            return "local"
        if name.startswith((ROUTER, AOA)):
            return "shared" if self.options.share_router else "local"
        return "shared"

    def sends(self, name: str, client: ClientInfo) -> bool:
        return super().sends(name, client) or (self.options.share_router and name.startswith((ROUTER, AOA)))
