"""Runs: the server loop and its rows with failure isolation, the client step and its training
loop, evaluation, faults, checkpoints, the client store, run records and results directories.
The server loop is handed a backend (:mod:`fedbench.backends`); it never imports one."""

from fedbench.utils.lazy import lazy_exports

_API = {
    "Run": "server",
    "Federation": "server",
    "run_id_for": "server",
    "run_rows": "rows",
    "RowsFailed": "rows",
    "RowFailure": "rows",
    "recorded_failures": "rows",
    "Backend": "backend",
    "Progress": "backend",
    "ClientRuntime": "client",
    "Message": "client",
    "TrainReply": "client",
    "State": "client",
    "TrainingContext": "training",
    "client_context": "training",
    "EvalReply": "evaluation",
    "Checkpoint": "checkpoint",
    "CheckpointMismatch": "checkpoint",
    "ClientStore": "client_store",
    "ResultsDirError": "results_dir",
}

__all__ = sorted(_API)
__getattr__, __dir__ = lazy_exports(__name__, _API)
