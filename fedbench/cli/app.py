"""The ``fedbench`` command line (typer): run, leaderboard, list, describe, backbone."""

from __future__ import annotations

import dataclasses
import errno
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedbench.api.backbone import BackboneUnavailable
from fedbench.api.data import DataError
from fedbench.api.options import OptionError, parse_method_spec
from fedbench.api.payload import ContractError
from fedbench.api.registry import BACKBONES, FAMILIES, METHODS, SUITES, TASKS, UnknownNameError
from fedbench.backends import BackendError, check_backend
from fedbench.config import protocol as protocol_mod
from fedbench.config.protocol import MethodEntry, Protocol, ProtocolError
from fedbench.runtime.checkpoint import CheckpointMismatch
from fedbench.utils.integrity import IntegrityError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Benchmark federated Mixture-of-Adapters methods.",
)
backbone_app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False, help="Prepare backbones."
)
app.add_typer(backbone_app, name="backbone")
data_app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False, help="Check real datasets."
)
app.add_typer(data_app, name="data")
console = Console()
err_console = Console(stderr=True)

USER_ERRORS = (
    BackendError,
    CheckpointMismatch,
    IntegrityError,
    ProtocolError,
    OptionError,
    UnknownNameError,
    BackboneUnavailable,
    ContractError,
    FileNotFoundError,
    DataError,
)


class UsageError(ValueError):
    """Bad command-line input."""


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input ends with one line on stderr and exit code 2, never a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (*USER_ERRORS, UsageError) as err:
            # escape: messages name labels such as mmrouter-moa[router_inputs=image], not markup
            err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as err:
            err_console.print(f"[bold red]error:[/] {escape(_os_error_line(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print(
                "[bold red]error:[/] interrupted; the run is resumable: rerun the same command to resume "
                "from its last completed round",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(2) from None

    return wrapper


# errors only a write gives (a disk that fills up mid-run, a read-only or over-quota file system): the last
# checkpoint stays resumable. Any other OSError names its file and reason, and claims no write.
WRITE_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS", "EFBIG") if hasattr(errno, name)
)


def _os_error_line(err: OSError) -> str:
    """One line for an OSError that reached the command: a failed write (by its errno) says so and how
    to resume; anything else (an unreadable input, a path that is a file where a directory is needed,
    a permission) names the file and the reason, without claiming a write."""
    reason = err.strerror or str(err) or type(err).__name__
    if err.errno in WRITE_ERRNOS:
        where = f"cannot write '{err.filename}'" if err.filename else "a write failed"
        return f"{where}: {reason}; completed rounds are checkpointed: rerun the same command to resume"
    if err.filename:
        return f"cannot use '{err.filename}': {reason}"
    return f"{type(err).__name__}: {reason}"


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _int_list(value: str, what: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in _split(value))
    except ValueError:
        raise UsageError(f"{what} '{value}' must be comma-separated integers, e.g. 0,1,2") from None
    if not out or min(out) < 0:
        raise UsageError(f"{what} '{value}' must list integers >= 0")
    twice = next((v for i, v in enumerate(out) if v in out[:i]), None)
    if twice is not None:
        raise UsageError(f"{what} '{value}' names {twice} twice: name each once")
    return out


def resolve_protocol(
    preset: str, methods: str | None, tasks: str | None, seeds: str | None, rounds: int | None
) -> Protocol:
    """Load a preset or TOML and apply command-line overrides; every name is validated here."""
    proto = protocol_mod.load(preset)
    changes: dict[str, Any] = {}
    if methods is not None:
        if not _split(methods):
            raise UsageError(f"--methods '{methods}' names no method. Available: {', '.join(METHODS.names())}")
        entries = []
        for spec in _split(methods):
            name, options = parse_method_spec(spec)
            entries.append(MethodEntry(name, options))
        changes["methods"] = tuple(entries)
    if tasks is not None:
        if not _split(tasks):
            raise UsageError(f"--tasks '{tasks}' names no task. Available: {', '.join(TASKS.names())}")
        changes["tasks"] = tuple(_split(tasks))
        twice = next((t for i, t in enumerate(changes["tasks"]) if t in changes["tasks"][:i]), None)
        if twice is not None:
            raise UsageError(f"--tasks '{tasks}' names the task '{twice}' twice: name each task once")
        if proto.data.tasks_per_client > len(changes["tasks"]):  # fewer tasks than the preset's per client
            changes["data"] = dataclasses.replace(proto.data, tasks_per_client=len(changes["tasks"]))
    if seeds is not None:
        if not _split(seeds):
            raise UsageError(f"--seeds '{seeds}' names no seed: give comma-separated integers >= 0, e.g. 0,1,2")
        changes["seeds"] = _int_list(seeds, "--seeds")
        if proto.sweep is not None and proto.sweep.seeds is not None:  # every value runs --seeds
            changes["sweep"] = dataclasses.replace(proto.sweep, seeds=None)
    if rounds is not None:
        if rounds < 1:
            raise UsageError(f"--rounds {rounds} is invalid: expected an integer >= 1")
        changes["rounds"] = rounds
    if changes:
        proto = proto.replace(**changes)
    for task in proto.tasks:
        TASKS.get(task)
    for checked in [variant for _, variant in proto.variants()] or [proto]:  # a sweep may vary these
        SUITES.get(checked.data.suite)
        BACKBONES.get(checked.backbone.name.partition(":")[0])
    # unknown method or option, or one configuration under two spellings, fails before any write
    protocol_mod.check_method_rows(proto)
    return proto


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"results path '{directory}' is not writable: {err.strerror or err}") from None


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
    _check_writable(results)
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
    (results / "protocol.toml").write_text(protocol_to_toml(proto))
    (results / "command.txt").write_text(command)
    failures = []
    for i, (value, variant) in enumerate(variants, start=1):
        console.rule(f"{sweep.field} = {value} ({i}/{len(variants)})")
        failures += _run_protocol(
            variant, results / sweep.dir_name(value), plots, command, backend, feature_cache, plan
        )
    table, paths = write_sweep_report(proto, results, plots)
    _print_sweep(table, paths, results)
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


def _print_sweep(table: Any, paths: list[Path], results: Path) -> None:
    from fedbench.reporting.sweep import render_sweep

    console.rule("sweep")
    console.print(render_sweep(table), markup=False, highlight=False)
    console.print(f"{', '.join(p.name for p in paths)} in {results}/")


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
    from fedbench.reporting.board import build_leaderboard, build_usage, plot, render
    from fedbench.runtime.results_dir import skip_reason
    from fedbench.runtime.server import RowsFailed
    from fedbench.staging.prepare import Prepared
    from fedbench.utils.records import read_records

    _check_writable(results)
    console.print(
        f"protocol [bold]{proto.name}[/] ({proto.hash}): {len(proto.methods)} method row(s) x "
        f"{len(proto.seeds)} seed(s), {proto.rounds} rounds, backbone {proto.backbone.name}"
    )
    (results / "protocol.toml").write_text(protocol_to_toml(proto))
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
    board = _completed_runs(lambda: build_leaderboard(records, with_failed=True), results)
    console.print(_render_board(board, "table", None), markup=False, highlight=False, soft_wrap=True)
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
    text = set(prep.store.text.origins)
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


def protocol_to_toml(proto: Protocol) -> str:
    import tomli_w

    body = proto.as_dict()
    body["methods"] = [m["name"] if not m["options"] else m for m in body["methods"]]
    head = f"# protocol hash {proto.hash}\n"
    if proto.sweep is not None:
        head = (
            f"# sweep protocol (hash {proto.hash}): [sweep] values replace the {proto.sweep.field} below; each\n"
            "# variant's records carry its own hash, written in <field>=<value>/protocol.toml\n"
        )
    return head + tomli_w.dumps(body)


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
    proto = protocol_mod.load(str(toml))
    if proto.sweep is None:
        raise UsageError(
            f"'{toml}' declares no [sweep]; for one protocol use `fedbench leaderboard --results {results}`"
        )
    _check_writable(results)
    table, paths = write_sweep_report(proto, results, plots)
    _print_sweep(table, paths, results)


@app.command()
@one_line_errors
def leaderboard(
    results: Path = typer.Option(..., help="Results directory written by `fedbench run`."),
    format: str = typer.Option("table", "--format", help="table, markdown or csv."),
    out: Path = typer.Option(None, help="Write to this file instead of standard output."),
    plots: Path = typer.Option(None, help="Also write PNG plots into this directory."),
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
        plot,
        render,
    )
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
    if written.is_file() and protocol_mod.load(str(written)).sweep is not None:
        raise UsageError(
            f"'{results}' holds a sweep (one results directory per value): run `fedbench sweep-report "
            f"--results {results}`, or point --results at one of its <field>=<value> directories"
        )
    records = read_records(results)
    _completed_runs(lambda: check_one_protocol(records), results)
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
                board = _completed_runs(
                    lambda: build_steps(records, [m.label for m in protocol_mod.load(str(written)).methods])
                )
            else:
                board = _completed_runs(lambda: build_versus(records, versus))
        except UnknownRowError as err:
            raise UsageError(str(err)) from None
    else:
        board = _completed_runs(
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
    text = _render_board(board, format, columns) if not (usage or versus is not None or steps) else None
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
        _check_writable(plots)
        for path in plot(records, plots):
            err_console.print(f"wrote {path}")


def _terminal_width() -> int:
    """COLUMNS, else the terminal's width, else 100 (piped output)."""
    import shutil

    return shutil.get_terminal_size((100, 24)).columns


def _render_board(board: Any, fmt: str, columns: str | None) -> str:
    """The leaderboard: a table that fits the terminal, or markdown / CSV (every column unless
    ``columns`` picks some)."""
    from fedbench.reporting.board import render
    from fedbench.reporting.terminal_table import UnknownColumnError, render_terminal, select_columns

    picked = _split(columns) if columns is not None else None
    try:
        if fmt == "table":
            return render_terminal(board, _terminal_width(), picked)
        return render(board if picked is None else select_columns(board, picked), fmt)
    except UnknownColumnError as err:
        raise UsageError(str(err)) from None


def _one_results_dir(results: Path) -> None:
    """A results directory of one protocol (not a sweep), or a one-line error that lists the results
    directories beside it."""
    if not results.is_dir():
        parent = results.parent if str(results.parent) else Path(".")
        found = sorted(p.name for p in parent.glob("*/") if p.is_dir() and (p / "runs").is_dir())
        where = f"; results directories in '{parent}': {', '.join(found)}" if found else ""
        raise UsageError(f"results directory '{results}' does not exist{where}")
    written = results / "protocol.toml"
    if written.is_file() and protocol_mod.load(str(written)).sweep is not None:
        subs = sorted(p.name for p in results.iterdir() if p.is_dir() and "=" in p.name)
        raise UsageError(
            f"'{results}' holds a sweep; point --results at one of its value directories: {', '.join(subs)}"
        )


def _completed_runs(build: Callable[[], Any], results: Path | None = None) -> Any:
    """``build()``, with "no completed run", "two completed runs of a seed" and records of several
    protocols (in ``results``) as one-line errors."""
    from fedbench.reporting.board import MixedProtocolsError

    try:
        return build()
    except MixedProtocolsError as err:
        raise UsageError(f"'{results}': {err}" if results is not None else str(err)) from None
    except ValueError as err:
        if "completed run" not in str(err):
            raise
        raise UsageError(str(err)) from None


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

    _one_results_dir(results)
    out = out or results / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--out '{out}' must name an .html file (the PNGs are written beside it)")
    _check_writable(out.parent)
    paths = _completed_runs(lambda: write_report(results, out), results)
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
    _one_results_dir(results)
    records = read_records(results)
    try:
        table = _completed_runs(lambda: build_compare(records, target, task), results)
    except CompareError as err:
        raise UsageError(str(err)) from None
    text = render_compare(table, format, _terminal_width())
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


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
    table.add_row("presets", ", ".join(protocol_mod.preset_names()))
    console.print(table)
    from fedbench.tasks.real import adapter_table

    console.print("real-data adapters (suite 'real'; [data.sources] TASK = a hub id or a local snapshot directory):")
    for row in adapter_table():
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
    from fedbench.tasks.real import check

    summary = check(source, task)
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

    if steps is not None and steps < 1:
        raise UsageError(f"--steps {steps} is invalid: expected an integer >= 1")
    meta = embedded.pretrain(out or embedded.WEIGHTS_PATH, steps=steps, log=console.print)
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


__all__ = ["app"]
