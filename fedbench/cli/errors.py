"""Every user error of a command as one line and exit 2, no traceback; what a command writes is checked first."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from fedbench.cli.main import err_console

# (module, class) of every error that is the user's input, not a bug: looked up where it is raised
# from, so a command imports no module just to name its errors (a module not imported raised none)
USER_ERRORS = (
    ("fedbench.backends", "BackendError"),
    ("fedbench.runtime.checkpoint", "CheckpointMismatch"),
    ("fedbench.utils.integrity", "IntegrityError"),
    ("fedbench.config.protocol", "ProtocolError"),
    ("fedbench.api.options", "OptionError"),
    ("fedbench.api.registry", "UnknownNameError"),
    ("fedbench.api.backbone", "BackboneUnavailable"),
    ("fedbench.api.payload", "ContractError"),
    ("fedbench.api.data", "DataError"),
)


def user_errors() -> tuple[type[BaseException], ...]:
    """The user-error classes of the modules imported so far, with :class:`FileNotFoundError` and
    :class:`UsageError`."""
    found = tuple(getattr(sys.modules[m], name) for m, name in USER_ERRORS if m in sys.modules)
    return (*found, FileNotFoundError, UsageError)


class UsageError(ValueError):
    """Bad command-line input."""


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input ends with one line on stderr and exit code 2, never a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except user_errors() as err:
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


def check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"results path '{directory}' is not writable: {err.strerror or err}") from None
