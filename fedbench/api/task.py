"""What the harness knows about a task: its family, answer space and metric."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    """A registered task.

    Attributes:
        name: registry key, what users type (``"vqa"``).
        family: a registered task family (:mod:`fedbench.api.family`, ``fedbench list``); it owns the head,
            the loss, the correctness rule, the majority baseline and the metric.
        suite: the suite registry name that produces this task's rows.
        answers: answer vocabulary (class names); empty for box tasks, and for a real-data task until
            its suite has read the training clients' answers (``Prepared.specs`` then carry them).
        metric: the family's metric name (``"accuracy"``, ``"acc_iou50"``, ``"vqa_accuracy"``); filled
            in from the family when left empty, and must match it when given.
        uses_ocr: whether the task's head reads the OCR tokens (rows of every task carry OCR text
            when the client has OCR; only such heads answer from it).
    """

    name: str
    family: str
    suite: str
    answers: tuple[str, ...] = ()
    metric: str = ""
    uses_ocr: bool = False

    def __post_init__(self) -> None:
        from fedbench.api.registry import FAMILIES

        if self.family not in FAMILIES:
            raise ValueError(f"task '{self.name}': family '{self.family}' not in {tuple(FAMILIES.names())}")
        family = FAMILIES.get(self.family)
        if not self.metric:
            object.__setattr__(self, "metric", family.metric.name)
        elif self.metric != family.metric.name:
            raise ValueError(f"task '{self.name}': metric '{self.metric}' is not its family's ('{family.metric.name}')")
        family.validate(self)

    @property
    def is_box(self) -> bool:
        """Whether the task predicts a box (its family has no answer vocabulary)."""
        from fedbench.api.registry import FAMILIES

        return not FAMILIES.get(self.family).has_answers

    @property
    def num_answers(self) -> int:
        return len(self.answers)
