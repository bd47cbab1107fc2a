"""Rows of a generative VLM: each row's chat prompt and answer as the LM's token ids, made once per
seed (no text tower runs: the LM reads the text itself)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedbench.api.answer_side import FROZEN_TRUNK
from fedbench.api.batch import OCR_TOKENS
from fedbench.api.data import TRAIN, ExampleTable
from fedbench.api.family import family_of
from fedbench.api.task import TaskSpec
from fedbench.config.protocol import Protocol
from fedbench.staging.row_store import RowStore

if TYPE_CHECKING:
    from fedbench.api.vlm import VisionLanguageModel


class TokenRowStore(RowStore):
    """A :class:`RowStore` whose rows carry token ids: the prompt (the image, then the family's user
    text around the question and the OCR tokens, in the LM's chat template) and, for training rows,
    the answer the LM learns to write (the family's target text and the end token).

    A prompt that does not fit the LM's context with its answer loses words of its user text from the
    end of the question until it does (counted in ``truncated``); one whose image alone leaves no room
    is refused when the seed is staged."""

    def encode_text(
        self, table: ExampleTable, specs: Sequence[TaskSpec], backbone: VisionLanguageModel, text: object
    ) -> None:
        n = len(table)
        self.text = None
        # no text tower: the LM reads the prompt; a router reads the LM's input embeddings of the text
        self.question, self.ocr, self.ocr_mask = lm_text_inputs(table, backbone, self.device)
        spec_of = {s.name: s for s in specs}
        # per task, the new tokens generation may write: its longest valid answer in this LM's tokens
        self.generation_budget = {
            s.name: family_of(s).generation_budget(s, lambda a: len(backbone.answer_ids(a))) for s in specs
        }
        prompts: dict[str, list[int]] = {}
        self.prompt_ids, self.target_ids, self.truncated = [], [], 0
        for row in range(n):
            spec = spec_of[str(table.task[row])]
            family = family_of(spec)
            target = backbone.answer_ids(family.target_text(spec, table, row)) if table.split[row] == TRAIN else []
            room = backbone.context_length - max(len(target), self.generation_budget[spec.name])
            user = family.user_text(str(table.question[row]), str(table.ocr_text[row]))
            if user not in prompts:
                prompts[user] = self._fitting(backbone, user, room)
            self.prompt_ids.append(prompts[user])
            self.target_ids.append(target)
        # every training batch padded to the longest row of the seed: a step's cost then depends on its
        # rows alone, so its FLOPs are predicted after a few counted steps (fedbench.utils.flops)
        self.width = max(len(p) + len(t) for p, t in zip(self.prompt_ids, self.target_ids, strict=True))

    def _fitting(self, backbone: VisionLanguageModel, user: str, room: int) -> list[int]:
        ids = backbone.prompt_ids(user)
        words = user.split(" ")
        while len(ids) > room and len(words) > 1:
            words = words[1:]
            ids = backbone.prompt_ids(" ".join(words))
            self.truncated += 1
        if len(ids) > room:
            raise ValueError(
                f"the LM of '{backbone.name}' has a context of {backbone.context_length} tokens: a prompt with "
                f"its image ({backbone.image_seq_length} tokens) and an answer does not fit"
            )
        return ids

    def answer_tokens(self, rows: np.ndarray) -> int:
        """Answer tokens of ``rows`` (with their end tokens): where the loss projects onto the vocabulary,
        so what a step's FLOPs grow with besides rows × width."""
        return int(sum(len(self.target_ids[r]) for r in rows))


@torch.no_grad()
def lm_text_inputs(
    table: ExampleTable, vlm: VisionLanguageModel, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, what a router reads of its text on a generative VLM (docs/methods.md §7): the LM's frozen
    input embeddings of the question, mean-pooled [n, H], and of the first ``OCR_TOKENS`` tokens of its OCR
    text [n, K, H], with their mask [n, K] (all False where the row has no OCR text)."""
    weight = vlm.input_embeddings.weight
    n, width = len(table), weight.shape[1]
    question = torch.zeros(n, width)
    ocr = torch.zeros(n, OCR_TOKENS, width)
    mask = torch.zeros(n, OCR_TOKENS, dtype=torch.bool)
    pooled: dict[str, torch.Tensor] = {}
    for row in range(n):
        text = str(table.question[row])
        if text not in pooled:
            ids = vlm.text_ids(text)
            pooled[text] = weight[ids].float().mean(0).cpu() if ids else torch.zeros(width)
        question[row] = pooled[text]
        ids = vlm.text_ids(str(table.ocr_text[row]))[:OCR_TOKENS] if table.ocr_text[row] else []
        if ids:
            ocr[row, : len(ids)] = weight[ids].float().cpu()
            mask[row, : len(ids)] = True
    return question.to(device), ocr.to(device), mask.to(device)


def vlm_rows(
    protocol: Protocol, table: ExampleTable, specs: Sequence[TaskSpec], vlm: VisionLanguageModel, device: torch.device
) -> RowStore:
    """The rows of a generative VLM (:class:`~fedbench.staging.token_rows.TokenRowStore`), with the
    protocol's ``[vlm]`` options set on it; what cannot apply to the family is refused."""
    if protocol.model.answer_side not in ("shared", FROZEN_TRUNK):
        raise ValueError(
            f"model.answer_side = '{protocol.model.answer_side}' does not apply to the vlm backbone family "
            f"('{protocol.backbone.name}'): its language model answers every task; choose 'shared' (adapters "
            f"on the LM where a method puts them) or '{FROZEN_TRUNK}' (the LM frozen)"
        )
    vlm.train_connector = protocol.vlm.connector == "shared"
    if protocol.vlm.gradient_checkpointing:  # the LM recomputes its activations in the backward pass
        vlm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return TokenRowStore(table, specs, vlm, device)
