"""The MoA methods on a LLaVA-1.5-7B-shaped VLM (issue 22, deliverable 5): training tokens per second,
generation throughput, peak GPU memory and one federated round per row, against the LoRA row.

Run on a CUDA machine from the repository root::

    python scripts/vlm_gpu_check.py OUT_DIR [--shape llava-1.5-7b|tiny] [--methods a,b,c]

1. Builds a random-weight LLaVA of the shape (``llava-1.5-7b``: CLIP ViT-L/14 at 336 px, feature layer -2,
   576 image tokens, the 2-layer GELU connector, a Llama-2-7B LM with a 32,064-token vocabulary; ``tiny``
   for a CPU dry run) on the device in bfloat16, and writes it to ``OUT_DIR/model`` as a standard LLaVA
   directory (model, tokenizer with a chat template, processor). The tokenizer is the embedded VLM's
   word-level one over the synthetic scenes' words, padded with filler tokens to the LM's vocabulary.
2. Loads it by path (``llava:OUT_DIR/model``, float32 weights, bfloat16 autocast on CUDA: the run's
   ``resources.amp``) through the code every run uses, and per method row: times training steps at
   the protocol's batch after warm-up (``scripts/gpu_check.py``'s step and timer: CUDA events; stage 1
   and, for the task-expert rows, stage 2), counting the tokens the LM reads per step (every pass:
   fedmix's K passes count K times);
   times one batched greedy generation on the global test set (answers_per_s, and the LM calls it made);
   runs one federated round (``Run.execute``, 2 clients) and notes its wall time; and the peak GPU
   memory of all of it.
3. Writes ``OUT_DIR/vlm_gpu_check.json``: per row, tokens/s, s/step, the step-time ratio to the first
   row (the LoRA row), answers generated per second, round wall time and peak memory.

Random weights: the numbers are costs, not accuracies. Without CUDA it runs on the CPU and says so.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from gpu_check import step_fn, timed  # the CLIP path check's training step and timer (scripts/ is on the path)

from fedbench.api.data import GLOBAL_TEST, PartitionConfig
from fedbench.backends.inprocess import in_process
from fedbench.config.protocol import MethodEntry, Protocol
from fedbench.config.sections import BackboneConfig, EvalConfig, LocalConfig
from fedbench.runtime.server import Run
from fedbench.runtime.training import client_context
from fedbench.staging.prepare import prepare
from fedbench.utils.precision import autocast

SHAPES = {  # (vision tower, LM) as llava-hf/llava-1.5-7b-hf's config.json has them
    "llava-1.5-7b": (
        {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
         "image_size": 336, "patch_size": 14, "projection_dim": 768},
        {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
         "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
        32064,
    ),
    "tiny": (
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
         "image_size": 64, "patch_size": 16, "projection_dim": 32},
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-5},
        2048,
    ),
}  # fmt: skip
METHODS = ("fedavg-lora", "pilot-ctmoa", "mmrouter-moa")  # the LoRA row first: the ratios are to it
STEPS = 10  # local steps of the federated round


def write_checkpoint(out: Path, shape: str, device: torch.device) -> Path:
    """A random-weight LLaVA of ``shape`` written as a standard checkpoint directory; returns its path.
    The layout and processor are the embedded VLM's (:func:`fedbench.backbones.embedded_vlm.llava_layout`)."""
    from transformers import AutoTokenizer, CLIPVisionConfig, LlavaForConditionalGeneration

    from fedbench.backbones.embedded_vlm import MODEL_DIR, SPECIALS, build_tokenizer, llava_layout, set_generation_ids

    vision, text, vocab_size = SHAPES[shape]
    words = sorted(set(AutoTokenizer.from_pretrained(MODEL_DIR).get_vocab()) - set(SPECIALS))
    filler = [f"filler{i:05d}" for i in range(vocab_size - len(SPECIALS) - len(words))]
    tokenizer = build_tokenizer([*words, *filler])
    assert len(tokenizer) == vocab_size, (len(tokenizer), vocab_size)  # no id the LM can write is undecodable
    config, processor = llava_layout(tokenizer, CLIPVisionConfig(hidden_act="quick_gelu", **vision), text)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    set_generation_ids(model, tokenizer)
    path = out / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    processor.save_pretrained(path)
    del model
    return path


def check_protocol(path: Path) -> Protocol:
    """Two clients on the synthetic scenes, every task, one round; the batch of the `vlm` preset's rows
    is too large for a 7B LM's activations, so 4 rows a step (every row alike)."""
    return Protocol(
        name="vlm-gpu-check",
        seeds=(0,),
        rounds=1,
        tasks=("classification", "vqa", "grounding", "ocr_vqa"),
        methods=tuple(MethodEntry(m) for m in METHODS),
        data=PartitionConfig(num_clients=2, train_images=8, test_images=4, global_test_images=8, tasks_per_client=2),
        local=LocalConfig(steps=STEPS, batch_size=4),
        eval=EvalConfig(every=0, batch_size=16),
        backbone=BackboneConfig(name=f"llava:{path}"),
    )


class LMTokens:
    """Counts the tokens the LM reads (its attention mask's ones), over every call."""

    def __init__(self, lm: torch.nn.Module) -> None:
        self.tokens = self.calls = 0
        self.handle = lm.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, _module, args, kwargs) -> None:
        mask, embeds = kwargs.get("attention_mask"), kwargs.get("inputs_embeds")
        self.calls += 1
        self.tokens += int(mask.sum()) if mask is not None and mask.dim() == 2 else embeds.shape[0] * embeds.shape[1]


def time_steps(prep, name: str, stage2: bool, cuda: bool) -> dict:
    """Seconds per training step (:func:`gpu_check.timed`: the median after warm-up, CUDA events on a
    GPU) of :func:`gpu_check.step_fn`'s step, and the LM tokens it reads per step."""
    step, model = step_fn(prep, name, stage2)
    counter = LMTokens(model.backbone.language_model)
    steps = 0

    def counted() -> None:
        nonlocal steps
        steps += 1
        step()

    seconds = timed(counted, cuda)
    counter.handle.remove()
    per_step = counter.tokens / steps
    return {"s_per_step": seconds, "lm_tokens_per_step": per_step, "tokens_per_s": per_step / seconds}


def time_generation(prep, name: str) -> dict:
    """One batched greedy generation of the global test set's first evaluation batch."""
    run = Run(prep, MethodEntry(name), "/tmp/vlm_gpu_check_unused", backend=in_process)
    model = run.build().eval()
    ctx = client_context(prep, prep.infos[0], 0, evaluating=True)
    run.method.prepare_client(model, ctx)
    rows = prep.table.rows(split=GLOBAL_TEST)[: prep.protocol.eval.batch_size]
    counter = LMTokens(model.backbone.language_model)
    if prep.device.type == "cuda":
        torch.cuda.synchronize(prep.device)
    start = time.perf_counter()
    with torch.no_grad(), autocast(prep.device, prep.amp):
        batch, cached = ctx.inputs(model, rows)
        run.method.generate(model, batch, cached, 12, ctx)
    if prep.device.type == "cuda":
        torch.cuda.synchronize(prep.device)
    seconds = time.perf_counter() - start
    counter.handle.remove()
    # LM calls: the prefill and one per new token (fedmix: K of each, one per expert)
    return {"gen_rows": len(rows), "gen_s": seconds, "answers_per_s": len(rows) / seconds, "lm_calls": counter.calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llava-1.5-7b")
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (no CUDA)", "shape": args.shape}
    start = time.perf_counter()
    path = write_checkpoint(args.out, args.shape, device)
    report["write_s"] = time.perf_counter() - start
    methods = args.methods.split(",")
    proto = check_protocol(path).replace(methods=tuple(MethodEntry(m) for m in methods))
    start = time.perf_counter()
    prep = prepare(proto, 0, device=device)
    report["load_and_stage_s"] = time.perf_counter() - start
    report["lm_params"] = sum(p.numel() for p in prep.backbone.language_model.parameters())
    rows = {}
    for name in methods:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        row = {"stage1": time_steps(prep, name, False, cuda)}
        if name in ("pilot-ctmoa", "mmrouter-moa"):
            row["stage2"] = time_steps(prep, name, True, cuda)
        row.update(time_generation(prep, name))
        start = time.perf_counter()
        Run(prep, MethodEntry(name), args.out / "runs" / name, backend=in_process).execute()
        row["round_wall_s"] = time.perf_counter() - start
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    base = rows[methods[0]]["stage1"]["s_per_step"]
    for row in rows.values():
        for stage in ("stage1", "stage2"):
            if stage in row:
                row[stage]["step_ratio_to_" + methods[0]] = row[stage]["s_per_step"] / base
    report["rows"] = rows
    (args.out / "vlm_gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
