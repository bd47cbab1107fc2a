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


@backbone_app.command("pretrain")
@one_line_errors
def backbone_pretrain(
    steps: int = typer.Option(None, help="Contrastive steps (default: the config's)."),
    out: Path = typer.Option(None, help="Output safetensors (default: the committed embedded weights)."),
) -> None:
    """Reproduce the embedded backbone: CLIP loss on captions of a split no client sees."""
    from fedbench.backbones import embedded
    from fedbench.tasks.scenes import pretrain_corpus, zero_shot_prompts

    if steps is not None and steps < 1:
        raise UsageError(f"--steps {steps} is invalid: expected an integer >= 1")
    out = out or embedded.WEIGHTS_PATH
    meta = embedded.pretrain(pretrain_corpus, zero_shot_prompts, out, steps=steps, log=console.print)
    console.print(
        f"zero-shot accuracy {meta['zero_shot_acc']:.3f} (chance {meta['chance']:.3f}) on synthetic "
        f"held-out scenes; {meta['steps']} steps, {meta['cpu_process_s']} s process CPU time"
    )


@backbone_app.command("info")
@one_line_errors
def backbone_info() -> None:
    """Show the embedded backbone's provenance and zero-shot accuracy."""
    from fedbench.backbones import embedded

    _model, tokenizer, meta = embedded.load_embedded()
    shown = {k: v for k, v in meta.items() if k != "vocab"}
    console.print({"vocab_size": len(tokenizer.vocab), **shown})
