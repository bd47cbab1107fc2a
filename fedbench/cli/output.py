"""What the commands print about a results directory: the leaderboard table, a sweep's files, and the
one line for a directory that holds no completed run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedbench.cli.errors import UsageError
from fedbench.cli.main import console
from fedbench.cli.protocol_flags import split_list
from fedbench.config import toml_file


def terminal_width() -> int:
    """COLUMNS, else the terminal's width, else 100 (piped output)."""
    import shutil

    return shutil.get_terminal_size((100, 24)).columns


def render_board(board: Any, fmt: str, columns: str | None) -> str:
    """The leaderboard: a table that fits the terminal, or markdown / CSV (every column unless
    ``columns`` picks some)."""
    from fedbench.reporting.terminal_table import UnknownColumnError, render_terminal, select_columns
    from fedbench.reporting.text import render

    picked = split_list(columns) if columns is not None else None
    try:
        if fmt == "table":
            return render_terminal(board, terminal_width(), picked)
        return render(board if picked is None else select_columns(board, picked), fmt)
    except UnknownColumnError as err:
        raise UsageError(str(err)) from None


def one_results_dir(results: Path) -> None:
    """A results directory of one protocol (not a sweep), or a one-line error that lists the results
    directories beside it."""
    if not results.is_dir():
        parent = results.parent if str(results.parent) else Path(".")
        found = sorted(p.name for p in parent.glob("*/") if p.is_dir() and (p / "runs").is_dir())
        where = f"; results directories in '{parent}': {', '.join(found)}" if found else ""
        raise UsageError(f"results directory '{results}' does not exist{where}")
    written = results / "protocol.toml"
    if written.is_file() and toml_file.load(str(written)).sweep is not None:
        subs = sorted(p.name for p in results.iterdir() if p.is_dir() and "=" in p.name)
        raise UsageError(
            f"'{results}' holds a sweep; point --results at one of its value directories: {', '.join(subs)}"
        )


def completed_runs(build: Callable[[], Any], results: Path | None = None) -> Any:
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


def print_sweep(table: Any, paths: list[Path], results: Path) -> None:
    from fedbench.reporting.sweep import render_sweep

    console.rule("sweep")
    console.print(render_sweep(table), markup=False, highlight=False)
    console.print(f"{', '.join(p.name for p in paths)} in {results}/")
