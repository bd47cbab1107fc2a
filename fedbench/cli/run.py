"""``fedbench run``: a protocol's rows over its seeds into a results directory, with progress."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedbench.backends import check_backend
from fedbench.cli.errors import UsageError, check_writable, one_line_errors
from fedbench.cli.main import app, console, err_console
from fedbench.cli.output import completed_runs, print_sweep, render_board
from fedbench.cli.protocol_flags import resolve_protocol
from fedbench.config import toml_file
from fedbench.config.protocol import Protocol


def _check_outside_package(results: Path) -> None:
    package = Path(__file__).resolve().parents[1]
    if results.resolve().is_relative_to(package):
        raise UsageError(
            f"results path '{results}' is inside the installed fedbench package ({package}): "
            "choose a directory outside it"
        )


@app.command()
@one_line_errors
def run(
    preset: str = typer.Option("smoke", help="Preset name (smoke, default) or path to a protocol .toml."),
    methods: str = typer.Option(None, help="Comma-separated methods, each NAME or NAME:key=value:key=value."),
    tasks: str = typer.Option(None, help="Comma-separated task names (see `fedbench list`)."),
    seeds: str = typer.Option(
        None, help="Comma-separated seeds, e.g. 0,1,2; in a sweep every value runs them (replacing sweep.seeds)."
    ),
    rounds: int = typer.Option(None, help="Override the number of rounds."),
    results: Path = typer.Option(None, help="Results directory (default: runs/<protocol name>)."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write PNG plots next to the leaderboard."),
    backend: str = typer.Option(
        "inprocess", help="Who moves the messages: inprocess, flower-sim (Flower's simulation engine), flower-deploy."
    ),
    feature_cache: bool = typer.Option(
        True,
        "--feature-cache/--no-feature-cache",
        help="Keep frozen-tower image features on disk under $FEDBENCH_CACHE/features (default "
        "~/.cache/fedbench), keyed by backbone weights, images and preprocessing, so later seeds and runs "
        "reuse them; --no-feature-cache computes them in memory once per seed. Results are identical.",
    ),
    device: str = typer.Option(
        None, help="auto (CUDA when present), cpu, cuda or cuda:N; default: the protocol's \\[resources] device."
    ),
    rerun_changed: bool = typer.Option(
        False,
        "--rerun-changed",
        help="Rerun the rows of RESULTS whose records were made by other code (another code digest: the .py "
        "files of fedbench/, methods/, tasks/ and the row's plug-ins), replacing their records; without it "
        "such rows are refused.",
    ),
) -> None:
    """Run every method row of a protocol over its seeds and print the leaderboard.

    With a ``\\[sweep]`` table, each swept value runs into ``RESULTS/<field>=<value>/`` (a complete results
    directory; over its own seeds where the table gives ``seeds``, one list per value, unless --seeds),
    then ``sweep.md``, ``sweep.csv`` and ``sweep_gain.png`` are written into RESULTS.

    RESULTS holds one protocol (its hash in ``RESULTS/.fedbench``): a run of another protocol into it,
    or into a directory fedbench did not write, is refused before anything is written. A completed row
    is skipped when its records were made by the same code; one made by other code is refused unless
    --rerun-changed (fedbench/runtime/results_dir.py)."""
    from fedbench.runtime.results_dir import ResultsDirError, apply_plan, plan_run

    proto = resolve_protocol(preset, methods, tasks, seeds, rounds)
    if device is not None:
        proto = _on_device(proto, device)
    results = results or Path("runs") / proto.name
    _check_outside_package(results)
    try:
        plan = plan_run(proto, results, rerun_changed)
    except ResultsDirError as err:
        raise UsageError(str(err)) from None
    check_writable(results)
    command = " ".join(["fedbench", *sys.argv[1:]]) + "\n"
    check_backend(backend)
    if feature_cache:
        _check_cache_outside(results)
    try:
        apply_plan(plan)
    except ResultsDirError as err:
        raise UsageError(str(err)) from None
    for row in plan.replaced():
        console.print(f"rerun {row.run_id}: its records were made by other code (--rerun-changed)", soft_wrap=True)
    if proto.sweep is None:
        _exit_if_failed(_run_protocol(proto, results, plots, command, backend, feature_cache, plan))
        return
    from fedbench.reporting.sweep import write_sweep_report

    sweep, variants = proto.sweep, proto.variants()
    console.print(
        f"sweep [bold]{proto.name}[/]: {sweep.field} = {', '.join(map(str, sweep.values))} "
        f"({len(variants)} variant(s)), gains over {sweep.reference}"
    )
    (results / "protocol.toml").write_text(toml_file.to_toml(proto))
    (results / "command.txt").write_text(command)
    failures = []
    for i, (value, variant) in enumerate(variants, start=1):
        console.rule(f"{sweep.field} = {value} ({i}/{len(variants)})")
        failures += _run_protocol(
            variant, results / sweep.dir_name(value), plots, command, backend, feature_cache, plan
        )
    table, paths = write_sweep_report(proto, results, plots)
    print_sweep(table, paths, results)
    _exit_if_failed(failures)


def _on_device(proto: Protocol, device: str) -> Protocol:
    """``--device``: the protocol with its ``resources.device`` replaced (out of the hash), checked here."""
    from fedbench.config.protocol import DEVICES
    from fedbench.staging.prepare import resolve_device

    if device not in DEVICES and not device.startswith("cuda:"):
        raise UsageError(f"--device '{device}' is unknown; choose one of: {', '.join(DEVICES)}, cuda:N")
    try:
        resolve_device(device)
    except ValueError as err:
        raise UsageError(f"--device '{device}': {err}") from None
    return proto.replace(resources=dataclasses.replace(proto.resources, device=device))


def _exit_if_failed(failures: list) -> None:
    """After every other row ran and the leaderboard was written: one line per failed row, exit 1."""
    for f in failures:
        err_console.print(
            f"[bold red]error:[/] row {escape(f.label)} (seed {f.seed}) failed: {escape(f.error)}",
            highlight=False,
            soft_wrap=True,
        )
    if failures:
        raise typer.Exit(1)


def _run_protocol(
    proto: Protocol,
    results: Path,
    plots: bool,
    command: str,
    backend: str = "inprocess",
    feature_cache: bool = False,
    plan: Any = None,
) -> list:
    """One protocol (no sweep) into ``results``: records, leaderboard, expert usage, plots. Returns
    the rows that failed (every other row ran; the leaderboard shows them as ``failed``). ``plan``
    (:func:`fedbench.runtime.results_dir.plan_run`) says why a skipped row is skipped."""
    from fedbench.backends import run_backend
    from fedbench.reporting.board import build_leaderboard, build_usage
    from fedbench.reporting.plots import plot
    from fedbench.reporting.text import render
    from fedbench.runtime.results_dir import skip_reason
    from fedbench.runtime.rows import RowsFailed
    from fedbench.staging.prepare import Prepared
    from fedbench.utils.records import read_records

    check_writable(results)
    console.print(
        f"protocol [bold]{proto.name}[/] ({proto.hash}): {len(proto.methods)} method row(s) x "
        f"{len(proto.seeds)} seed(s), {proto.rounds} rounds, backbone {proto.backbone.name}"
    )
    (results / "protocol.toml").write_text(toml_file.to_toml(proto))
    (results / "command.txt").write_text(command)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        rows_bar = progress.add_task("rows", total=len(proto.methods) * len(proto.seeds))
        rounds_bar = progress.add_task("rounds", total=proto.rounds)
        clients_bar = progress.add_task("clients", total=1)

        def on_event(event: str, info: dict[str, Any]) -> None:
            if event == "start":
                progress.update(
                    rounds_bar,
                    completed=info["start"],
                    total=info["rounds"],
                    description=f"rounds  {info['label']}",
                )
            elif event == "round":
                progress.update(rounds_bar, completed=info["round"])
                progress.update(clients_bar, completed=0)
            elif event == "client":
                progress.update(clients_bar, advance=1)
            elif event == "resume":
                progress.console.print(
                    f"resumed {info['run_id']} from round {info['round'] + 1} "
                    f"(rounds 1-{info['round']} restored from its checkpoint)"
                )
            elif event == "skip":
                why = escape(skip_reason(plan, info["run_id"]))
                progress.console.print(f"[dim]skip (already complete): {info['run_id']}{why}[/]", soft_wrap=True)
            elif event == "wait":
                progress.console.print(f"waiting for {info['run_id']}: another process ({info['holder']}) runs it")
            elif event == "drop":
                progress.console.print(
                    f"[dim]client {info['client']} dropped in round {info['round']}: {escape(info['error'])}[/]",
                    soft_wrap=True,
                )
            elif event == "failed":
                progress.console.print(
                    f"[bold red]row {escape(info['label'])} (seed {info['seed']}) failed:[/] {escape(info['error'])}; "
                    "the other rows go on",
                    soft_wrap=True,
                )

            elif event == "row":
                progress.advance(rows_bar)

        staged: list[Prepared] = []  # the seed being run: where its features came from is told after it

        def on_seed(prep: Prepared) -> None:
            _tell_features(progress.console, staged)
            staged[:] = [prep]
            if prep.seed == proto.seeds[0] and "zero_shot_acc" in prep.backbone.meta:
                meta = prep.backbone.meta
                progress.console.print(
                    f"backbone {prep.backbone.name}: zero-shot accuracy {meta['zero_shot_acc']:.3f} "
                    f"(chance {meta['chance']:.3f}) on held-out synthetic scenes"
                )
            clients_per_round = max(1, round(proto.clients.sample_fraction * proto.data.num_clients))
            progress.update(clients_bar, total=clients_per_round)

        failures = []
        try:
            run_backend(backend, proto, results, on_event, on_seed, feature_cache)
        except RowsFailed as err:
            failures = err.failures
        _tell_features(progress.console, staged)
    records = read_records(results)
    board = completed_runs(lambda: build_leaderboard(records, with_failed=True), results)
    console.print(render_board(board, "table", None), markup=False, highlight=False, soft_wrap=True)
    (results / "leaderboard.md").write_text(render(board, "markdown"))
    (results / "leaderboard.csv").write_text(render(board, "csv"))
    written = "leaderboard.md/.csv"
    completed = "failed" not in board or board["failed"].isna().any()
    usage = build_usage(records) if completed else board.iloc[:0]
    if not usage.empty:
        (results / "expert_usage.md").write_text(render(usage, "markdown"))
        (results / "expert_usage.csv").write_text(render(usage, "csv"))
        written += ", expert_usage.md/.csv"
    if plots and completed:
        plot(records, results)
    console.print(f"records, {written}{' and plots' if plots and completed else ''} in {results}/")
    return failures


def _tell_features(out: Console, staged: list) -> None:
    """One line on where a seed's frozen image features and text embeddings came from (provenance
    only: never in records)."""
    if not staged:
        return
    prep = staged.pop()
    said = []
    if prep.features.origin is not None:
        entry = escape(str(prep.features.entry))
        said.append(
            "image features "
            + {
                "memory": "computed in memory (not cached on disk)",
                "disk": f"read from the disk cache {entry}",
                "computed": f"computed and written to the disk cache {entry}",
            }[prep.features.origin]
        )
    text = set(prep.store.text.origins) if prep.store.text is not None else set()  # none on a VLM
    if text:
        said.append(
            "text embeddings "
            + {
                frozenset({"memory"}): "computed in memory",
                frozenset({"disk"}): "read from the disk cache",
                frozenset({"computed"}): "computed and written to the disk cache",
            }.get(frozenset(text), "partly read from the disk cache")
        )
    if said:
        out.print(f"[dim]seed {prep.seed}: frozen {'; '.join(said)}[/]", soft_wrap=True, highlight=False)


def _check_cache_outside(results: Path) -> None:
    """The feature cache (derived data) never lands inside the package or the results directory."""
    from fedbench.staging.feature_cache import cache_root

    cache = cache_root().resolve()
    if cache.exists() and not cache.is_dir():
        raise UsageError(
            f"feature cache '{cache}' ($FEDBENCH_CACHE) is a file, not a directory: point FEDBENCH_CACHE at a "
            "directory, or run with --no-feature-cache"
        )
    for what, path in (("the installed fedbench package", Path(__file__).resolve().parents[1]), ("--results", results)):
        if cache.is_relative_to(path.resolve()):
            raise UsageError(
                f"feature cache '{cache}' ($FEDBENCH_CACHE) is inside {what} ({path}): point FEDBENCH_CACHE "
                "elsewhere, or run with --no-feature-cache"
            )
