"""Pretraining of the embedded generative VLM (``fedbench backbone pretrain --vlm``) and its zero-shot score.

:func:`pretrain` trains the connector and the LM of :func:`~fedbench.backbones.embedded_vlm.build_vlm`
(the tower stays frozen) with teacher-forced answer tokens on captions and question–answer rows of
held-out synthetic scenes that no client ever sees, handed in by the command (data never come from here:
the backbones layer does not import tasks), scores it zero-shot per family on a disjoint draw through
the standard processor and ``generate``, and writes the directory with
:func:`~fedbench.backbones.embedded_vlm.write_dir`.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from fedbench.backbones.embedded_vlm import (
    IMAGE_TOKEN,
    MODEL_DIR,
    build_vlm,
    chat_prompt,
    load_config,
    vision_features,
    write_dir,
)

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast

IGNORE = -100  # label of the positions the loss skips (prompt, padding)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class VLMCorpus(Protocol):
    """What ``corpus_fn(n_images, seed)`` returns (``fedbench.tasks.vlm_corpus.VLMCorpus``)."""

    images: torch.Tensor  # uint8 [N, 3, H, W]
    user_texts: list[str]
    answers: list[str]
    image_index: np.ndarray  # row -> image


CorpusFn = Callable[[int, int], VLMCorpus]
ScoreFn = Callable[[str, str, str], float]  # (family, reference answer, generated text) -> score in [0, 1]


# ---- rows ------------------------------------------------------------------------------------------


def encode_rows(
    tokenizer: PreTrainedTokenizerFast, n_image_tokens: int, user_texts: Sequence[str], answers: Sequence[str]
) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids (image placeholder expanded as the processor expands it) and answer ids + </s>."""
    prompts = [chat_prompt(tokenizer, t).replace(IMAGE_TOKEN, IMAGE_TOKEN * n_image_tokens) for t in user_texts]
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    return prompt_ids, [[*a, tokenizer.eos_token_id] for a in answer_ids]


def pack_rows(
    prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]], image_index: np.ndarray, image_token: int
) -> list[tuple[int, list[int], list[list[int]], list[int]]]:
    """Per image: (its index; the prompt prefix its rows share, which holds the image tokens; each row's rest
    of the prompt and answer; each row's answer length): one image's rows train in one sequence."""
    rows: dict[int, list[int]] = {}
    for r, i in enumerate(np.asarray(image_index).tolist()):
        rows.setdefault(i, []).append(r)
    packs = []
    for i in sorted(rows):
        prompts = [list(prompt_ids[r]) for r in rows[i]]
        n = next((k for k in range(min(map(len, prompts))) if len({p[k] for p in prompts}) > 1), min(map(len, prompts)))
        n = min(n, min(map(len, prompts)) - 1)  # every row keeps a token of its own to attend from
        if any(image_token in p[n:] for p in prompts):
            raise ValueError(f"the rows of image {i} do not share the image placeholder at the start of their prompts")
        packs.append((i, prompts[0][:n], [[*p[n:], *answer_ids[r]] for p, r in zip(prompts, rows[i], strict=True)],
                      [len(answer_ids[r]) for r in rows[i]]))  # fmt: skip
    return packs


def packed_batch(
    model: LlavaForConditionalGeneration,
    packs: Sequence[tuple[int, list[int], list[list[int]], list[int]]],
    features: torch.Tensor,
    pad_id: int,
) -> dict[str, torch.Tensor]:
    """The forward arguments of a batch of images, each image's rows in one sequence: the shared prefix (the
    image's tokens, once), then each row's own tokens at the positions they have alone, attending only to the
    prefix and to themselves (a 4-D mask). So every row's logits are those of its own single-turn prompt, at
    about half the tokens (one image's 64 tokens serve its five rows). ``labels``: the answer tokens (+ </s>);
    ``weights``: 1 / the row's answer length at each of them (not a forward argument: :func:`answer_loss`)."""
    seqs, positions, segments, labels, weights = [], [], [], [], []
    for _image, prefix, rows, n_answer in packs:
        ids, pos, seg, lab = list(prefix), list(range(len(prefix))), [0] * len(prefix), [IGNORE] * len(prefix)
        weight = [0.0] * len(prefix)
        for k, (tokens, n) in enumerate(zip(rows, n_answer, strict=True), start=1):
            ids += tokens
            pos += range(len(prefix), len(prefix) + len(tokens))
            seg += [k] * len(tokens)
            lab += [IGNORE] * (len(tokens) - n) + tokens[len(tokens) - n :]
            weight += [0.0] * (len(tokens) - n) + [1 / n] * n
        for column, values in zip((seqs, positions, segments, labels), (ids, pos, seg, lab), strict=True):
            column.append(values)
        weights.append(weight)
    width = max(map(len, seqs))

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        return torch.tensor([[*r, *[value] * (width - len(r))] for r in rows], dtype=torch.long)

    ids, seg = pad(seqs, pad_id), pad(segments, -1)
    q, k = seg.unsqueeze(2), seg.unsqueeze(1)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal & (k != -1) & ((k == 0) | (k == q))
    allowed |= torch.eye(width, dtype=torch.bool) & (q == -1)  # padding attends to itself: no empty softmax row
    dtype = model.get_input_embeddings().weight.dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)
    embeds = model.get_input_embeddings()(ids)
    image = model.model.multi_modal_projector(features)
    slots = (ids == model.config.image_token_id).unsqueeze(-1)
    return {
        "inputs_embeds": embeds.masked_scatter(slots, image.to(embeds.dtype)),
        "attention_mask": mask,
        "position_ids": pad(positions, 0),
        "labels": pad(labels, IGNORE),
        "weights": torch.tensor([[*w, *[0.0] * (width - len(w))] for w in weights]),
    }


def answer_loss(
    hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token cross-entropy on the labelled (answer) tokens, the LM head applied at those positions only
    (the hidden states ``hidden`` of the LM's last layer): their mean (``weights`` None, as transformers'
    causal-LM loss), or each row's mean, then the mean over rows (``weights`` from :func:`packed_batch`), so a
    30-word caption weighs as much as a one-word answer."""
    keep = labels[:, 1:] != IGNORE
    logits = lm_head(hidden[:, :-1][keep]).float()
    ce = torch.nn.functional.cross_entropy(logits, labels[:, 1:][keep], reduction="none")
    if weights is None:
        return ce.mean()
    w = weights[:, 1:][keep]
    return (ce * w).sum() / w.sum()


@torch.no_grad()
def generate_answers(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    images: torch.Tensor,
    user_texts: Sequence[str],
    max_new_tokens: int = 16,
    batch_size: int = 64,
) -> list[str]:
    """Greedy answers, one per (uint8 image [3, H, W], user text), in left-padded batches through the
    standard processor and ``generate`` (the path any LLaVA checkpoint takes)."""
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    texts: list[str] = []
    try:
        for i in range(0, len(user_texts), batch_size):
            prompts = [chat_prompt(tokenizer, t) for t in user_texts[i : i + batch_size]]
            inputs = processor(images=list(images[i : i + batch_size]), text=prompts, padding=True, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = out[:, inputs["input_ids"].shape[1] :]
            texts.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return [t.strip() for t in texts]


# ---- scoring ----------------------------------------------------------------------------------------


def _box(text: str) -> list[float] | None:
    nums = _NUMBER.findall(text)
    return [float(v) for v in nums[:4]] if len(nums) >= 4 and "[" in text else None


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def simple_score(family: str, reference: str, text: str) -> float:
    """Exact match after lower-casing and collapsing whitespace and punctuation; a box answer
    ("[x0, y0, x1, y1]") scores IoU >= 0.5. The default where no caller hands the families' own rules."""
    ref = _box(reference)
    if ref is not None:
        got = _box(text)
        return float(got is not None and _iou(ref, got) >= 0.5)
    return float(re.findall(r"\w+", reference.lower()) == re.findall(r"\w+", text.lower()))


def column_families(corpus: VLMCorpus) -> list[str]:
    """Each row's family from the corpus's own column (``families``, ``family`` or ``tasks``)."""
    for name in ("families", "family", "tasks"):
        values = getattr(corpus, name, None)
        if values is not None:
            return [str(v) for v in values]
    raise ValueError("the VLM corpus names no family per row: hand ZeroShotRules(row_families=...) to score it")


@dataclass(frozen=True)
class ZeroShotRules:
    """How the zero-shot score reads a corpus: each row's family, a family's score of a generated text
    (in [0, 1]) and its generation budget. The command hands the task families' own (the backbones
    layer knows no task); the default reads a family column and scores by :func:`simple_score`."""

    row_families: Callable[[VLMCorpus], list[str]] = column_families
    score: ScoreFn = simple_score
    max_new_tokens: Callable[[str], int] = lambda family: 48  # a caption is ~30 words


def _baselines(train: VLMCorpus, held: VLMCorpus, rules: ZeroShotRules) -> dict[str, dict[str, float]]:
    """Per family: the most frequent training answer (boxes: the mean training box) scored on the held-out
    rows, and chance, 1 / distinct training answers (boxes: none)."""
    train_f, held_f = rules.row_families(train), rules.row_families(held)
    out: dict[str, dict[str, float]] = {"majority": {}, "chance": {}}
    for family in sorted(set(held_f)):
        answers = [a for a, f in zip(train.answers, train_f, strict=True) if f == family]
        refs = [a for a, f in zip(held.answers, held_f, strict=True) if f == family]
        boxes = [_box(a) for a in answers]
        if not answers:
            continue
        if all(b is not None for b in boxes):
            guess = "[" + ", ".join(str(round(v)) for v in np.mean(boxes, axis=0)) + "]"
        else:
            guess = Counter(answers).most_common(1)[0][0]
            out["chance"][family] = round(1 / len(set(answers)), 4)
        out["majority"][family] = round(float(np.mean([rules.score(family, r, guess) for r in refs])), 4)
    return out


def zero_shot(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    corpus: VLMCorpus,
    rules: ZeroShotRules | None = None,
) -> dict[str, dict]:
    """Greedy generation on every row of ``corpus``, family by family with its budget: per family the
    mean score, the rows, and a few (reference, generated) examples."""
    rules = rules or ZeroShotRules()
    families = rules.row_families(corpus)
    out: dict[str, dict] = {"score": {}, "rows": {}, "examples": {}}
    for family in sorted(set(families)):
        rows = [r for r, f in enumerate(families) if f == family]
        images = corpus.images[torch.as_tensor(corpus.image_index[rows])]
        texts = generate_answers(
            model, processor, images, [corpus.user_texts[r] for r in rows], rules.max_new_tokens(family)
        )
        scores = [rules.score(family, corpus.answers[r], t) for r, t in zip(rows, texts, strict=True)]
        out["score"][family] = round(float(np.mean(scores)), 4)
        out["rows"][family] = len(rows)
        out["examples"][family] = [[corpus.answers[r], t] for r, t in zip(rows[:3], texts[:3], strict=True)]
    return out


# ---- pretraining -----------------------------------------------------------------------------------


def pretrain(
    corpus_fn: CorpusFn,
    vocabulary: Sequence[str],
    out_dir: Path = MODEL_DIR,
    steps: int | None = None,
    log: Callable[[str], object] = print,
    rules: ZeroShotRules | None = None,
    config: dict | None = None,
) -> dict:
    """Pretrain the connector and the LM (tower frozen) on ``corpus_fn``'s held-out scenes, score it
    zero-shot per family on a disjoint draw, write the LLaVA directory with provenance and checksums.

    ``corpus_fn(n_images, seed)`` gives images, user texts, answers and the row -> image index of
    scenes no client ever sees (the caller hands it: ``fedbench.tasks.vlm_corpus.vlm_pretrain_corpus``);
    the zero-shot draw is ``seed + 1``; ``rules`` say how to score it (:class:`ZeroShotRules`).
    Teacher-forced cross-entropy on the answer tokens (and </s>), each row's mean then the mean over rows
    (``loss = "row_mean"``: a caption weighs as much as a one-word answer; ``"token_mean"``: transformers'
    rule), AdamW with a one-cycle schedule, one image's rows packed in one sequence (:func:`packed_batch`);
    seeded, on a fixed number of CPU threads (``threads``), so deterministic. Returns the provenance
    written beside the weights.
    """
    cfg = config or load_config()
    pcfg = dict(cfg["pretrain"])
    pcfg["corpus"] = f"{corpus_fn.__module__}:{corpus_fn.__qualname__}"
    steps = steps or pcfg["steps"]
    seed = pcfg["seed"]
    rules = rules or ZeroShotRules()
    if pcfg["loss"] not in ("row_mean", "token_mean"):
        raise ValueError(f"pretrain.loss = {pcfg['loss']!r}: expected 'row_mean' or 'token_mean'")
    threads = torch.get_num_threads()
    torch.set_num_threads(pcfg["threads"])  # reduction order, hence the bits, depends on it
    try:
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        corpus = corpus_fn(pcfg["corpus_images"], seed)
        held = corpus_fn(pcfg["zero_shot_images"], seed + 1)
        model, tokenizer, processor = build_vlm(vocabulary, cfg)
        prompt_ids, answer_ids = encode_rows(
            tokenizer, model.config.image_seq_length, corpus.user_texts, corpus.answers
        )
        unk = tokenizer.unk_token_id
        n_unk = sum(row.count(unk) for row in [*prompt_ids, *answer_ids])
        if n_unk:
            log(f"warning: {n_unk} tokens of the corpus are outside the vocabulary (<unk>)")
        packs = pack_rows(prompt_ids, answer_ids, corpus.image_index, model.config.image_token_id)
        features = vision_features(model, corpus.images)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=pcfg["lr"], weight_decay=pcfg["weight_decay"])
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=pcfg["lr"], total_steps=steps, pct_start=pcfg["pct_start"]
        )
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model.train()
        model.model.vision_tower.eval()
        losses = []
        train_start, train_cpu = time.perf_counter(), time.process_time()
        for step in range(steps):
            chosen = [packs[j] for j in torch.randint(len(packs), (pcfg["batch_images"],), generator=gen).tolist()]
            batch = packed_batch(model, chosen, features[[p[0] for p in chosen]], tokenizer.pad_token_id)
            weights, labels = batch.pop("weights"), batch.pop("labels")
            hidden = model.model(**batch).last_hidden_state
            loss = answer_loss(hidden, model.lm_head, labels, weights if pcfg["loss"] == "row_mean" else None)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if step % 50 == 0 or step == steps - 1:
                took = time.perf_counter() - train_start
                log(f"step {step:4d}/{steps}  answer-token loss {loss.item():.3f}  ({took:.0f} s)")
        train_wall, train_cpu = time.perf_counter() - train_start, time.process_time() - train_cpu
        model.eval()
        result = zero_shot(model, processor, held, rules)
        baselines = _baselines(corpus, held, rules)
        meta = {
            "zero_shot": result["score"],
            "majority": baselines["majority"],
            "chance": baselines["chance"],
            "zero_shot_rows": result["rows"],
            "zero_shot_examples": result["examples"],
            "steps": steps,
            "rows_seen": steps * pcfg["batch_images"] * len(prompt_ids) // len(packs),
            "first_loss": round(losses[0], 4),
            "final_loss": round(float(np.mean(losses[-20:])), 4),
            "train_cpu_s": round(train_cpu, 1),
            "train_wall_s": round(train_wall, 1),
            "cpu_process_s": round(time.process_time() - start_cpu, 1),
            "wall_s": round(time.perf_counter() - start_wall, 1),
            "parameters": sum(p.numel() for p in model.parameters()),
            "trained_parameters": sum(p.numel() for p in params),
            "vocab_size": len(tokenizer),
            "unk_tokens": n_unk,
            "corpus_rows": len(prompt_ids),
            "model": cfg["model"],
            "pretrain": pcfg,
            "score": f"{rules.score.__module__}:{rules.score.__qualname__}",
            "synthetic": True,
        }
        write_dir(model, tokenizer, processor, meta, Path(out_dir), cfg["model"]["save_dtype"])
    finally:
        torch.set_num_threads(threads)
    return meta
