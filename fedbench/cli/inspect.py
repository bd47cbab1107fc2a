"""The commands that show what fedbench has: ``list``, ``describe``, ``data check``, ``backbone``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from fedbench.api.options import parse_method_spec
from fedbench.api.registry import BACKBONES, FAMILIES, METHODS, SUITES, TASKS
from fedbench.cli.errors import UsageError, one_line_errors
from fedbench.cli.main import app, backbone_app, console, data_app
from fedbench.cli.protocol_flags import resolve_protocol
from fedbench.config import toml_file
from fedbench.config.protocol import MethodEntry


@app.command("list")
def list_() -> None:
    """List registered methods, tasks, suites, backbones and presets."""
    table = Table(title="fedbench registry")
    table.add_column("kind")
    table.add_column("names")
    table.add_row("methods", ", ".join(METHODS.names()))
    table.add_row("tasks", ", ".join(f"{n} ({TASKS.get(n).family})" for n in TASKS.names()))
    families = [FAMILIES.get(n) for n in FAMILIES.names()]
    table.add_row("task families", ", ".join(f"{f.name} ({f.metric.name})" for f in families))
    table.add_row("suites", ", ".join(SUITES.names()))
    table.add_row("backbones", ", ".join(BACKBONES.names()))
    table.add_row("presets", ", ".join(toml_file.preset_names()))
    console.print(table)
    console.print("real-data adapters (suite 'real'; [data.sources] TASK = a hub id or a local snapshot directory):")
    for row in SUITES.get("real").adapter_table():
        console.print(
            f"  {row['task']} ({row['family']}): {row['dataset']}; needs columns {row['needs']}; "
            f"splits {row['splits']}; {row['notes']}",
            highlight=False,
            soft_wrap=True,
        )


@app.command()
@one_line_errors
def describe(
    method: str = typer.Argument(..., help="Method name, optionally NAME:key=value."),
    preset: str = typer.Option("smoke", help="Protocol whose tasks and clients size the model and payloads."),
) -> None:
    """Shared vs local modules, parameter counts and bytes one client sends and receives per round."""
    from fedbench.cli.describe import describe_method

    name, options = parse_method_spec(method)
    proto = resolve_protocol(preset, None, None, None, None)
    proto = proto.replace(methods=(MethodEntry(name, options),), sweep=None)
    describe_method(proto, console)


@data_app.command("check")
@one_line_errors
def data_check(
    source: str = typer.Argument(..., help="A local snapshot directory or a hub id (read from the hub cache)."),
    task: str = typer.Option(..., help="The real-data task whose adapter reads it (fedbench list)."),
) -> None:
    """Validate a real dataset's schema against its adapter and print a summary (rows, answer
    vocabulary, images) before a long run."""
    summary = SUITES.get("real").check(source, task)  # the suite plug-in that reads real datasets
    console.print(
        f"{summary['task']}: {summary['dataset']} ({summary['family']}) at {summary['root']}: schema ok",
        highlight=False,
    )
    for split, info in summary["splits"].items():
        console.print(f"  {split}: " + "; ".join(f"{k} {v}" for k, v in info.items()), highlight=False, soft_wrap=True)


def _vlm_zero_shot_rules():
    """The task families' own rules for the embedded VLM's zero-shot score (the backbones layer knows no task):
    each row's family from the corpus's layout (per image a caption row, then one row per task of the suite,
    checked against the prompts), ``score_text`` on a one-row table, the family's ``max_new_tokens``."""
    import numpy as np
    import torch

    from fedbench.api.data import TRAIN, ExampleTable
    from fedbench.backbones.embedded_vlm_pretrain import ZeroShotRules, simple_score
    from fedbench.tasks.families.text_answers import parse_box
    from fedbench.tasks.scenes import TASK_SPECS
    from fedbench.tasks.vlm_corpus import CAPTION_PROMPT

    specs = {spec.family: spec for spec in TASK_SPECS.values()}  # one task per family in the suite
    layout = ["caption", *(spec.family for spec in TASK_SPECS.values())]

    def row_families(corpus) -> list[str]:
        families = layout * len(corpus.images)
        ok = len(families) == len(corpus.user_texts) and all(
            text == CAPTION_PROMPT if f == "caption" else text.endswith(FAMILIES.get(f).instruction)
            for f, text in zip(families, corpus.user_texts, strict=False)
        )
        if not ok:
            raise UsageError("the VLM corpus's rows are not one caption then one row per task, per image")
        return families

    def score(family: str, reference: str, text: str) -> float:
        if family not in specs:  # the caption row: exact match
            return simple_score(family, reference, text)
        spec = specs[family]
        box = parse_box(reference) if not spec.answers else (float("nan"),) * 4
        one = lambda v, dtype=object: np.array([v], dtype=dtype)  # noqa: E731
        table = ExampleTable(
            images=torch.zeros((1, 3, 1, 1), dtype=torch.uint8),
            image_index=one(0, np.int64),
            task=one(spec.name),
            question=one(""),
            ocr_text=one(""),
            label=one(spec.answers.index(reference) if spec.answers else -1, np.int64),
            box=np.array([box], np.float32),
            client=one(0, np.int64),
            split=one(TRAIN, np.int8),
            domain=one(0, np.int64),
        )
        return FAMILIES.get(family).score_text(spec, table, 0, text, "normalized")[0]

    def budget(family: str) -> int:
        return FAMILIES.get(family).max_new_tokens if family in specs else 48

    return ZeroShotRules(row_families, score, budget)


@backbone_app.command("pretrain")
@one_line_errors
def backbone_pretrain(
    steps: int = typer.Option(None, help="Training steps (default: the config's)."),
    out: Path = typer.Option(
        None, help="Output: the CLIP's safetensors, or with --vlm the VLM's directory (default: the committed ones)."
    ),
    vlm: bool = typer.Option(False, "--vlm", help="Pretrain the embedded generative VLM instead of the CLIP."),
) -> None:
    """Reproduce the embedded backbone: CLIP loss on captions of a split no client sees; with --vlm, the
    embedded VLM's connector and LM on captions and questions of held-out scenes."""
    if steps is not None and steps < 1:
        raise UsageError(f"--steps {steps} is invalid: expected an integer >= 1")
    if vlm:
        from fedbench.backbones import embedded_vlm, embedded_vlm_pretrain
        from fedbench.tasks.vlm_corpus import vlm_pretrain_corpus, vlm_vocabulary

        out = out or embedded_vlm.MODEL_DIR
        rules = _vlm_zero_shot_rules()
        meta = embedded_vlm_pretrain.pretrain(vlm_pretrain_corpus, vlm_vocabulary(), out, steps, console.print, rules)
        for family, value in meta["zero_shot"].items():
            baseline = ", ".join(f"{k} {meta[k][family]:.3f}" for k in ("majority", "chance") if family in meta[k])
            console.print(f"zero-shot {family}: {value:.3f} ({baseline})", highlight=False)
        console.print(
            f"on synthetic held-out scenes; {meta['steps']} steps, {meta['train_cpu_s']} s training CPU time "
            f"({meta['cpu_process_s']} s in all); written to {out}",
            highlight=False,
        )
        return
    from fedbench.backbones import embedded
    from fedbench.tasks.scenes import pretrain_corpus, zero_shot_prompts

    out = out or embedded.WEIGHTS_PATH
    meta = embedded.pretrain(pretrain_corpus, zero_shot_prompts, out, steps=steps, log=console.print)
    console.print(
        f"zero-shot accuracy {meta['zero_shot_acc']:.3f} (chance {meta['chance']:.3f}) on synthetic "
        f"held-out scenes; {meta['steps']} steps, {meta['cpu_process_s']} s process CPU time"
    )


@backbone_app.command("info")
@one_line_errors
def backbone_info(
    vlm: bool = typer.Option(False, "--vlm", help="The embedded generative VLM's provenance instead of the CLIP's."),
) -> None:
    """Show the embedded backbone's provenance and zero-shot accuracy (--vlm: the embedded VLM's, per family)."""
    if vlm:
        from fedbench.backbones import embedded_vlm

        sums = embedded_vlm.check_dir()  # the same check as every load
        meta = embedded_vlm.read_meta()
        shown = {k: v for k, v in meta.items() if k != "zero_shot_examples"}
        size = sum((embedded_vlm.MODEL_DIR / name).stat().st_size for name in sums)
        console.print({"directory": str(embedded_vlm.MODEL_DIR), "bytes": size, "files_checked": len(sums), **shown})
        return
    from fedbench.backbones import embedded

    _model, tokenizer, meta = embedded.load_embedded()
    shown = {k: v for k, v in meta.items() if k != "vocab"}
    console.print({"vocab_size": len(tokenizer.vocab), **shown})
