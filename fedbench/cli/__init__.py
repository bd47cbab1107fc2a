"""The ``fedbench`` command line: :data:`app` (typer), with one module per command group."""

from importlib import import_module

from fedbench.cli.main import app

for _group in ("run", "results", "inspect"):  # each registers its commands on the app, in the order of --help
    import_module(f"fedbench.cli.{_group}")

__all__ = ["app"]
