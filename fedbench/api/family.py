"""Task families as plug-ins: what a family of tasks owns, whatever dataset its rows come from.

A family (``classification``, ``vqa``, ``grounding``, ``ocr_vqa``, ``vqa_soft``, ...) is one registered
:class:`TaskFamily` instance in its own file under ``tasks/families/`` (or a third-party package's
``fedbench.families`` entry point). It owns:

- its **heads**: the thin output on the shared answer trunk and the full per-task head;
- its **loss** and its **correctness rule** (a score in [0, 1] per row);
- its **majority baseline** (the reference row: what a constant prediction from the training rows
  scores on the global test set);
- its **metric spec**: the metric's name (what eval records carry), whether higher is better and how
  per-row scores average;
- whether it has an answer vocabulary, whether Dirichlet label skew applies to its labels, and the
  symbol a prompt view draws for it.

The harness never branches on a family's name: it asks the family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from fedbench.api.batch import Batch
    from fedbench.api.data import ExampleTable
    from fedbench.api.task import TaskSpec


@dataclass(frozen=True)
class MetricSpec:
    """A metric's meaning: ``name`` (the eval records' ``metric``), ``higher_is_better``, and
    ``aggregate``, how per-row scores become a task's score (``"mean"``)."""

    name: str
    higher_is_better: bool = True
    aggregate: str = "mean"

    def reduce(self, scores: np.ndarray) -> float:
        if self.aggregate != "mean":
            raise ValueError(f"metric '{self.name}': unknown aggregate '{self.aggregate}'")
        return float(np.mean(scores)) if len(scores) else float("nan")


class TaskFamily:
    """Base class of a task family; subclass it in one file and register an instance.

    Attributes:
        name: the registry key tasks name in ``TaskSpec.family``.
        metric: its :class:`MetricSpec`.
        has_answers: tasks of this family have an answer vocabulary (the head predicts one of them).
        label_skew: Dirichlet label skew of the partitioner applies to this family's labels.
        symbol: the short tag a prompt view draws for the family's rows.
    """

    name: str = ""
    metric: MetricSpec = MetricSpec("accuracy")
    has_answers: bool = True
    label_skew: bool = False
    symbol: str = "?"

    def validate(self, spec: TaskSpec) -> None:
        """Raise ValueError naming the task when ``spec`` does not fit the family."""
        if not self.has_answers and spec.answers:
            raise ValueError(f"task '{spec.name}': a {self.name} task has no answer vocabulary")

    def output(self, spec: TaskSpec, hidden: int) -> nn.Module:
        """The thin output on the shared answer trunk."""
        raise NotImplementedError

    def head(self, spec: TaskSpec, token_dim: int, embed_dim: int) -> nn.Module:
        """The full per-task head (``answer_side = "per_task"``)."""
        raise NotImplementedError

    def loss(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def correct(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Per row, a score in [0, 1] (1.0 = correct)."""
        raise NotImplementedError

    def majority(self, spec: TaskSpec, table: ExampleTable, train: np.ndarray, test: np.ndarray) -> float:
        """The reference row's score: a constant prediction made from the ``train`` rows, on ``test``."""
        raise NotImplementedError

    # --- on a generative VLM (the ``vlm`` backbone family): the LM writes the answer as text --------
    instruction: str = "Answer the question using a single word or phrase."  # LLaVA-1.5's short-answer prompt
    max_new_tokens: int = 8  # the least generation budget (a cut answer is counted, and parsed as is)

    def widest_answers(self, spec: TaskSpec) -> list[str]:
        """Valid answers that take the most tokens, whatever the tokenizer (a box with four-digit
        coordinates, the task's answer vocabulary): the generation budget covers the longest of them
        (:meth:`generation_budget`)."""
        return list(spec.answers)

    def generation_budget(self, spec: TaskSpec, answer_tokens: Callable[[str], int]) -> int:
        """New tokens generation may write for ``spec``'s rows: the longest valid answer in the LM's own
        tokens (``answer_tokens``: with the end token) plus two, and at least ``max_new_tokens``, so a
        sub-word tokenizer is not cut where a word-level one is not."""
        longest = max((answer_tokens(a) for a in self.widest_answers(spec)), default=0)
        return max(self.max_new_tokens, longest + 2)

    def user_text(self, question: str, ocr_text: str) -> str:
        """The user turn of a row's chat prompt, after the image: the OCR tokens when the row has them
        (every row alike, whichever its task: LLaVA-style TextVQA prompts), the question, the family's
        instruction."""
        ocr = [f"OCR: {ocr_text}"] if ocr_text else []
        return "\n".join([*ocr, question, self.instruction])

    def target_text(self, spec: TaskSpec, table: ExampleTable, row: int) -> str:
        """The answer the LM is trained to write for ``row`` (teacher forcing; the prompt is masked)."""
        raise NotImplementedError

    def score_text(
        self, spec: TaskSpec, table: ExampleTable, row: int, text: str, vqa_metric: str
    ) -> tuple[float, bool]:
        """(score in [0, 1], parsed) of the generated ``text`` for ``row``: an output the family cannot
        parse scores 0 and is counted as a parse failure. ``vqa_metric``: ``official`` | ``normalized``
        (how VQA accuracy normalises answers; families without VQA accuracy ignore it)."""
        raise NotImplementedError


def family_of(spec: TaskSpec) -> TaskFamily:
    """The registered family of a task."""
    from fedbench.api.registry import FAMILIES

    return FAMILIES.get(spec.family)
