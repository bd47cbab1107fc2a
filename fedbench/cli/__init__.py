from fedbench.cli.app import app

__all__ = ["app"]
