"""What the harness knows about a task: its family, answer space and metric."""

from __future__ import annotations

from dataclasses import dataclass

FAMILIES = ("classification", "vqa", "grounding", "ocr_vqa")


@dataclass(frozen=True)
class TaskSpec:
    """A registered task.

    Attributes:
        name: registry key, what users type (``"vqa"``).
        family: one of :data:`FAMILIES`; decides the head (answer classifier or box regressor).
        suite: the suite registry name that produces this task's rows.
        answers: answer vocabulary (class names); empty for box tasks.
        metric: ``"accuracy"`` (exact answer) or ``"acc_iou50"`` (box IoU >= 0.5).
        uses_ocr: whether the task's head reads the OCR tokens (rows of every task carry OCR text
            when the client has OCR; only such heads answer from it).
    """

    name: str
    family: str
    suite: str
    answers: tuple[str, ...] = ()
    metric: str = "accuracy"
    uses_ocr: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"task '{self.name}': family '{self.family}' not in {FAMILIES}")
        if self.family == "grounding" and self.answers:
            raise ValueError(f"task '{self.name}': a grounding task has no answer vocabulary")

    @property
    def is_box(self) -> bool:
        return self.family == "grounding"

    @property
    def num_answers(self) -> int:
        return len(self.answers)
