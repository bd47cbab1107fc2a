"""End-to-end runs on the tiny protocol: determinism, resume, a toy plug-in, the leaderboard."""

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fedbench.api.method import Method, register_method
from fedbench.api.registry import METHODS
from fedbench.backends.inprocess import in_process
from fedbench.config.protocol import MethodEntry
from fedbench.reporting.board import build_leaderboard
from fedbench.reporting.text import render
from fedbench.runtime.server import Run
from fedbench.utils.records import read_jsonl, read_records

VOLATILE = {"compute_s", "git_commit", "versions"}


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def test_same_seed_gives_identical_records(tiny_prep, tmp_path):
    a = Run(tiny_prep, MethodEntry("fedavg-lora"), tmp_path / "a", backend=in_process).execute()
    b = Run(tiny_prep, MethodEntry("fedavg-lora"), tmp_path / "b", backend=in_process).execute()
    rows_a = read_jsonl(tmp_path / "a" / "runs" / a / "records.jsonl")
    rows_b = read_jsonl(tmp_path / "b" / "runs" / b / "records.jsonl")
    assert _stable(rows_a) == _stable(rows_b)
    train = [r for r in rows_a if r["kind"] == "train"]
    assert train and all(r["up_bytes"] > r["up_bytes_analytic"] > 0 for r in train)
    assert all(r["timer"] == "process_cpu" for r in train)


@pytest.mark.parametrize("method", ["fedsa-lora", "centralized"])  # centralized: one pooled trainer's state
def test_killed_run_resumes_to_the_same_numbers(tiny_prep, tmp_path, monkeypatch, method):
    clean = Run(tiny_prep, MethodEntry(method), tmp_path / "clean", backend=in_process).execute()
    original = Run._round

    def crash_on_second_round(self, r, *args, **kwargs):
        if r == 1:
            raise KeyboardInterrupt
        return original(self, r, *args, **kwargs)

    monkeypatch.setattr(Run, "_round", crash_on_second_round)
    with pytest.raises(KeyboardInterrupt):
        Run(tiny_prep, MethodEntry(method), tmp_path / "killed", backend=in_process).execute()
    monkeypatch.setattr(Run, "_round", original)
    resumed = Run(tiny_prep, MethodEntry(method), tmp_path / "killed", backend=in_process)
    assert resumed.checkpoint.path.is_file()
    resumed.execute()
    a = read_jsonl(tmp_path / "clean" / "runs" / clean / "records.jsonl")
    b = read_jsonl(resumed.records_path)
    assert _stable(a) == _stable(b)


@dataclass(frozen=True)
class ToyOptions:
    head_only: bool = True


def test_toy_method_registered_in_a_test_module_runs_without_harness_changes(tiny_prep, tmp_path):
    @register_method("toy-local-heads")
    class ToyLocalHeads(Method):
        """Heads only, kept local: nothing crosses the network but an empty payload."""

        Options = ToyOptions

        def tag(self, name):
            return "local"

    try:
        run_id = Run(tiny_prep, MethodEntry("toy-local-heads"), tmp_path, backend=in_process).execute()
        rows = read_jsonl(tmp_path / "runs" / run_id / "records.jsonl")
        train = [r for r in rows if r["kind"] == "train"]
        assert all(r["up_bytes_analytic"] == 0 for r in train)
        board = build_leaderboard(read_records(tmp_path))
        assert list(board["method"])[-1] == "majority"
        assert "toy-local-heads" in set(board["method"])
        assert board.set_index("method").loc["toy-local-heads", "params_shared"] == 0
    finally:
        METHODS.unregister("toy-local-heads")


def test_leaderboard_has_method_rows_majority_and_synthetic_label(tiny_prep, tmp_path):
    for name in ("fedavg-lora", "ffa-lora"):
        Run(tiny_prep, MethodEntry(name), tmp_path, backend=in_process).execute()
    board = build_leaderboard(read_records(tmp_path))
    assert list(board["method"])[-1] == "majority"
    assert {"fedavg-lora", "ffa-lora"} <= set(board["method"])
    for task in ("classification", "vqa", "grounding", "ocr_vqa"):
        assert f"acc_{task}" in board.columns
    md = render(board, "markdown")
    assert "SYNTHETIC" in md
    fed = board.set_index("method").loc["fedavg-lora"]
    ffa = board.set_index("method").loc["ffa-lora"]
    assert fed["up_mb_per_round"] > ffa["up_mb_per_round"] > 0


def test_completed_run_is_skipped_not_redone(tiny_prep, tmp_path):
    run = Run(tiny_prep, MethodEntry("fedavg-lora"), tmp_path, backend=in_process)
    run.execute()
    before = run.records_path.read_bytes()
    events = []
    Run(tiny_prep, MethodEntry("fedavg-lora"), tmp_path, lambda e, i: events.append(e), backend=in_process).execute()
    assert events == ["skip"] and run.records_path.read_bytes() == before
    assert torch.get_num_threads() >= 1


def test_routed_methods_get_an_expert_usage_plot(tiny_prep, tmp_path):
    from fedbench.reporting.plots import plot

    Run(tiny_prep, MethodEntry("pfedmoe"), tmp_path, backend=in_process).execute()
    paths = plot(read_records(tmp_path), tmp_path / "plots")
    assert [p.name for p in paths] == ["acc_vs_comm.png", "acc_per_round.png", "expert_usage.png"]
    assert all(p.stat().st_size > 0 for p in paths)


FRESH_PROCESS = """
import hashlib, sys
import torch
sys.path.insert(0, sys.argv[1])
from conftest import TINY
from fedbench.runtime.checkpoint import Checkpoint
from fedbench.config.protocol import MethodEntry
from fedbench.runtime.server import Run
from fedbench.staging.prepare import prepare
from fedbench.backends.inprocess import in_process

torch.set_num_threads(2)
digest = hashlib.sha256()
save = Checkpoint.save


def capture(self, next_round, server, clients, init):  # every round's server and client states, bit for bit
    for state in (server, *(clients[c] for c in sorted(clients))):
        for name in sorted(state):
            digest.update(name.encode() + state[name].numpy().tobytes())
    save(self, next_round, server, clients, init)


Checkpoint.save = capture
prep = prepare(TINY, 0, device=torch.device("cpu"))
for name in ("fedavg-lora", "feddpa", "mmrouter-moa"):
    Run(prep, MethodEntry(name), sys.argv[2], backend=in_process).execute()
print(digest.hexdigest())
"""


def test_fresh_processes_reach_bit_identical_states(tmp_path):
    """Reproducible across processes, not only within one: allocations and thread pools differ between
    interpreters, and an order-dependent reduction (e.g. accumulating repeated rows on 2 threads) shows
    up as different weights. Tower LoRA (the image tower in the gradient path), FedDPA's two passes and
    a routed method run in two fresh interpreters with 2 threads; every round's states must match."""
    tests = str(Path(__file__).parent)
    digests = [
        subprocess.run(
            [sys.executable, "-c", FRESH_PROCESS, tests, str(tmp_path / str(i))],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[-1]
        for i in range(2)
    ]
    assert len(digests[0]) == 64 and digests[0] == digests[1]
