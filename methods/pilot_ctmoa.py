"""Pilot's CT-MoA (Xiong et al., AAAI 2025, arXiv 2501.13985; METHODS.md §5).

The method's description, harness choices included, is the class docstring (shown by
``fedbench describe``); the shared machinery is :mod:`fedbench.task_experts`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedbench.method import ClientInfo, Tag, register_method
from fedbench.task_experts import AOA, CLIENT_ADAPTER, ROUTER, TaskExpertOptions, TaskExpertsMethod


@dataclass(frozen=True)
class PilotOptions(TaskExpertOptions):
    """Task-expert options plus ``share_router`` (false: router and adapters-on-adapters stay local)."""

    share_router: bool = False


@register_method("pilot-ctmoa")
class PilotCTMoA(TaskExpertsMethod):
    """Pilot / CT-MoA (Xiong et al., AAAI 2025): https://arxiv.org/abs/2501.13985 (METHODS.md §5).

    - Shared: one **task adapter** per task (bottleneck Adapter on the patch tokens); a client
      uploads only its tasks' adapters and the server takes the example-weighted mean within each
      task; all T task adapters go down to every client (counted in the download). The **task
      heads** are shared with Pilot's per-client distance-weighted rule: each client gets its own
      aggregate (the M = ``nearest`` closest clients ∝ 1/d, mixed with its own head by examples).
    - Local: the **client adapter**, the **router** and the **adapters-on-adapters** (AoA)
      (``share_router=true``: router and AoAs shared, example-weighted mean; an AoA only from the
      clients that train it, i.e. that do not hold its task).
    - Stage 1 (rounds < ``stage1_rounds``; -1 = the first 20% of the rounds, at least one):
      tokens' = tokens + A_task(row)(tokens) + C(tokens), loss + ``orth_weight`` (0.1) × the
      orthogonality penalty between A's and C's outputs; no router.
    - Stage 2 (CT-MoA): experts = the T task adapters; own tasks' adapters train, the others are
      frozen, each with a trainable AoA on its output (E_t = A_t + AoA_t(A_t)); router
      Linear(token_dim → T, no bias) on each image token, softmax (``top_k`` = 0: dense; k: top-k
      renormalised); tokens' = tokens + Σ_t w_t·E_t(tokens) + C(tokens) (C frozen); loss +
      ``balance_weight`` (0.1) × switch load balance + ``z_weight`` (0.01) × router z-loss.
      Usage rows: token-averaged router weights per task × expert (task names).

    Simplifications / harness choices:
    - No LLM on a 2-core CPU: the experts sit on the frozen CLIP patch tokens (Pilot's projector
      position) and the task heads play the part of Pilot's language-side LoRA for the
      distance-weighted per-client aggregation. The released code has no server; the server rules
      are a reading of the paper.
    - Distance-weighted heads, applied task by task: among the replying clients that hold a task,
      d(k, i) = plain L2 distance between their flattened heads of that task (the same parameter
      set for every pair, so no per-parameter normalisation), weights 1/d normalised to sum 1 over
      the M nearest, that neighbour average mixed with the client's own head as n_k : Σ n_i.
      The server keeps each client's aggregate (``client<k>/heads.*``) and the plain example-
      weighted mean (``heads.*``) for a client it has never seen and, at evaluation, for the
      heads of tasks a client does not hold.
    - AoA placement follows METHODS.md (an adapter on the frozen expert's *output*); the released
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

    def uploads(self, name: str, client: ClientInfo) -> bool:
        if self.options.share_router and name.startswith(ROUTER):
            return True
        if self.options.share_router and name.startswith(AOA):
            return name.split(".", 2)[1] not in client.tasks  # only the AoAs the client trains
        return super().uploads(name, client)
