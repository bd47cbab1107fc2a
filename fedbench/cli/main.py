"""The ``fedbench`` command line (typer): the app and its command groups; the commands are in
:mod:`fedbench.cli.run`, :mod:`fedbench.cli.results` and :mod:`fedbench.cli.inspect`."""

from __future__ import annotations

import typer
from rich.console import Console

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
