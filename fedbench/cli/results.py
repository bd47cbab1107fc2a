"""The commands that read a results directory: ``leaderboard``, ``report``, ``compare``, ``sweep-report``."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import typer

from fedbench.cli.errors import UsageError, check_writable, one_line_errors
from fedbench.cli.main import app, console, err_console
from fedbench.cli.output import completed_runs, one_results_dir, print_sweep, render_board, terminal_width
from fedbench.config import toml_file


@app.command("sweep-report")
@one_line_errors
def sweep_report(
    results: Path = typer.Option(..., help="Results directory of a sweep written by `fedbench run`."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Also write sweep_gain.png."),
) -> None:
    """Rebuild sweep.md, sweep.csv and sweep_gain.png of a sweep's results directory from its records."""
    from fedbench.reporting.sweep import write_sweep_report

    if not results.is_dir():
        raise UsageError(f"results directory '{results}' does not exist")
    toml = results / "protocol.toml"
    if not toml.is_file():
        raise UsageError(f"'{results}' holds no protocol.toml: not a results directory written by `fedbench run`")
    proto = toml_file.load(str(toml))
    if proto.sweep is None:
        raise UsageError(
            f"'{toml}' declares no [sweep]; for one protocol use `fedbench leaderboard --results {results}`"
        )
    check_writable(results)
    table, paths = write_sweep_report(proto, results, plots)
    print_sweep(table, paths, results)


@app.command()
@one_line_errors
def leaderboard(
    results: Path = typer.Option(..., help="Results directory written by `fedbench run`."),
    format: str = typer.Option("table", "--format", help="table, markdown or csv."),
    out: Path = typer.Option(None, help="Write to this file instead of standard output."),
    plots: Path = typer.Option(
        None, help="Also write PNG plots into this directory (with --versus ROW, versus_ROW.png: the paired gains)."
    ),
    usage: bool = typer.Option(False, "--usage", help="Render the expert-usage matrix (task × expert) instead."),
    versus: str = typer.Option(
        None,
        "--versus",
        metavar="ROW",
        help="Render each row's paired difference to ROW (95% t-interval over seeds; * excludes 0, † after Holm).",
    ),
    steps: bool = typer.Option(
        False, "--steps", help="Render each row minus the row above it in the protocol's row order (a ladder)."
    ),
    columns: str = typer.Option(
        None,
        "--columns",
        help="Comma-separated leaderboard columns, e.g. method,mean_acc,total_mb (default: a terminal table shows "
        "what fits its width, markdown and csv every column).",
    ),
) -> None:
    """Render the leaderboard (mean with its 95% t-interval over seeds, ± std) of a results directory.

    In a terminal (``--format table``) it shows the columns a reader needs first and as many more as
    the width allows (``COLUMNS``, else the terminal's, else 100); ``--columns`` picks any set."""
    from fedbench.reporting.board import (
        UnknownRowError,
        build_leaderboard,
        build_steps,
        build_usage,
        build_versus,
        check_one_protocol,
        failed_rows,
        in_flight_runs,
    )
    from fedbench.reporting.plot_layout import save_png
    from fedbench.reporting.plots import plot, plot_versus
    from fedbench.reporting.text import render
    from fedbench.utils.records import read_records

    formats = ("table", "markdown", "csv")
    if format not in formats:
        raise UsageError(f"--format '{format}' is invalid. Choose one of: {', '.join(formats)}")
    if sum((usage, versus is not None, steps)) > 1:
        raise UsageError("--usage, --versus and --steps render different tables; choose one")
    if columns is not None and (usage or versus is not None or steps):
        raise UsageError("--columns picks leaderboard columns; it does not apply to --usage, --versus or --steps")
    if not results.is_dir():
        raise UsageError(f"results directory '{results}' does not exist")
    written = results / "protocol.toml"
    if written.is_file() and toml_file.load(str(written)).sweep is not None:
        raise UsageError(
            f"'{results}' holds a sweep (one results directory per value): run `fedbench sweep-report "
            f"--results {results}`, or point --results at one of its <field>=<value> directories"
        )
    records = read_records(results)
    completed_runs(lambda: check_one_protocol(records), results)
    pending = in_flight_runs(records)
    completed = "completed" in records and bool((records["kind"].eq("run") & records["completed"].eq(True)).any())
    if pending and not completed and not failed_rows(records):
        raise UsageError(
            f"nothing in '{results}' is complete yet: {len(pending)} run(s) in flight (or interrupted, resumable "
            f"by rerunning their `fedbench run`): {', '.join(pending)}"
        )
    if steps and not written.is_file():
        raise UsageError(f"--steps reads the row order from '{written}', which does not exist")
    if versus is not None or steps:
        try:
            if steps:
                board = completed_runs(
                    lambda: build_steps(records, [m.label for m in toml_file.load(str(written)).methods])
                )
            else:
                board = completed_runs(lambda: build_versus(records, versus))
        except UnknownRowError as err:
            raise UsageError(str(err)) from None
    else:
        board = completed_runs(
            lambda: build_usage(records) if usage else build_leaderboard(records, with_failed=True), results
        )
    if pending:
        err_console.print(
            f"note: {len(pending)} run(s) in flight (or interrupted), not counted: {', '.join(pending)}",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
    if usage and board.empty:
        raise UsageError(f"no expert-usage records in '{results}': none of its methods has a router or gate")
    text = render_board(board, format, columns) if not (usage or versus is not None or steps) else None
    text = text or render(board, format)
    if out is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        tmp = out.with_name(out.name + ".tmp")
        try:
            tmp.write_text(text)
            tmp.replace(out)
        except OSError as err:
            raise UsageError(f"cannot write '{out}': {err.strerror or err}") from None
        finally:
            if tmp.is_file():
                tmp.unlink()
    if plots is not None:
        check_writable(plots)
        written_plots = plot(records, plots)
        if versus is not None:
            order = [m.label for m in toml_file.load(str(written)).methods] if written.is_file() else None
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", versus)
            written_plots.append(save_png(plot_versus(board, order), plots / f"versus_{name}.png"))
        for path in written_plots:
            err_console.print(f"wrote {path}")


@app.command()
@one_line_errors
def report(
    results: Path = typer.Option(..., help="Results directory written by `fedbench run`."),
    out: Path = typer.Option(None, help="HTML page to write (default: RESULTS/report.html); PNGs go beside it."),
) -> None:
    """Write a self-contained HTML report of a results directory, its plots as PNGs beside it.

    The page holds the sortable leaderboard, accuracy vs communication (Pareto front), accuracy per
    round per task family, bytes per round, per-client accuracy, expert usage, and the protocol, its
    hash, library versions and device; the PNGs are <stem>_<plot>.png."""
    from fedbench.reporting.html import write_report

    one_results_dir(results)
    out = out or results / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--out '{out}' must name an .html file (the PNGs are written beside it)")
    check_writable(out.parent)
    paths = completed_runs(lambda: write_report(results, out), results)
    console.print(f"wrote {paths[0]} and beside it {', '.join(p.name for p in paths[1:])}", soft_wrap=True)


@app.command()
@one_line_errors
def compare(
    results: Path = typer.Option(..., help="Results directory written by `fedbench run`."),
    target: float = typer.Option(..., help="Target accuracy on the global test set, in [0, 1]."),
    task: str = typer.Option(None, help="Only this task (or task family, or mean_acc); default: each family."),
    format: str = typer.Option("table", "--format", help="table, markdown or csv."),
) -> None:
    """Rounds and bytes each row needed to first reach a target accuracy, relative to fedavg-lora.

    Per row and task family: the first evaluated round at which the seed-mean global-test accuracy
    reaches --target, and the uplink, downlink and total MB sent until then, or `not reached`."""
    from fedbench.reporting.compare import FORMATS, CompareError, build_compare, render_compare
    from fedbench.utils.records import read_records

    if format not in FORMATS:
        raise UsageError(f"--format '{format}' is invalid. Choose one of: {', '.join(FORMATS)}")
    if not 0.0 <= target <= 1.0:
        raise UsageError(f"--target {target:g} is outside [0, 1]: give an accuracy as a fraction, e.g. 0.35")
    one_results_dir(results)
    records = read_records(results)
    try:
        table = completed_runs(lambda: build_compare(records, target, task), results)
    except CompareError as err:
        raise UsageError(str(err)) from None
    text = render_compare(table, format, terminal_width())
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
