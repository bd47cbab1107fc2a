"""Evaluation that scales: identical client models scored on the global test set once, identical
downloads serialized once, and ``eval.clients`` sampling intermediate evaluations (never the last)."""

from __future__ import annotations

import dataclasses
from importlib import resources

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY
from typer.testing import CliRunner

import fedbench.runtime.server
from fedbench.api.method import create_method
from fedbench.backends.inprocess import in_process
from fedbench.cli import app
from fedbench.config.protocol import EvalConfig, MethodEntry, ProtocolError
from fedbench.config.toml_file import from_dict, load
from fedbench.reporting.board import build_leaderboard
from fedbench.reporting.terminal_table import render_terminal
from fedbench.reporting.text import render
from fedbench.runtime.client import ClientRuntime
from fedbench.runtime.evaluation import eval_clients, model_digest, state_only
from fedbench.runtime.server import Run
from fedbench.staging.prepare import prepare
from fedbench.utils.records import read_jsonl
from fedbench.utils.seeding import derive_seed

# measured, not computed (the FLOP meter counts its first use in a process apart): no evaluation figure
VOLATILE = {"compute_s", "git_commit", "versions", "compute_flops"}
# registered rows: default hooks (reuse may apply) and client-dependent forwards (it must not)
METHODS = ["fedavg-lora", "fedsa-lora", "local-only", "feddpa", "pfedmoe", "fedmix", "mmrouter-moa"]
CLIENT_DEPENDENT = ["feddpa", "pfedmoe", "fedmix", "mmrouter-moa", "pilot-ctmoa"]


def _stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


class CountingRuntime(ClientRuntime):
    """The in-process client step, counting the global-test scorings it ran and reused."""

    evaluated = 0

    def evaluate(self, msg):
        before = 0 if self._global_scores is None else self._global_scores.hits
        reply = super().evaluate(msg)
        self.evaluated += 1
        self.reused = getattr(self, "reused", 0) + self._global_scores.hits - before
        return reply


def _run(prep, name: str, directory, runtime: type[ClientRuntime] = CountingRuntime) -> tuple[list[dict], Run]:
    from fedbench.backends.inprocess import InProcessBackend

    run = Run(prep, MethodEntry(name), directory, backend=lambda r: InProcessBackend(r.runtime))
    run.runtime = runtime(prep, run.method)
    run.execute()
    return read_jsonl(run.records_path), run


@pytest.fixture(scope="module")
def sampled_prep(backbone):
    """Six clients, three rounds each evaluated, intermediate evaluations on a sample of two."""
    proto = TINY.replace(
        rounds=3,
        data=dataclasses.replace(TINY.data, num_clients=6),
        eval=EvalConfig(every=1, batch_size=64, clients=2),
    )
    return prepare(proto, 0, backbone=backbone, device=torch.device("cpu"))


# --- default unchanged ----------------------------------------------------------------------------
def test_default_eval_clients_keeps_the_hash_and_the_protocol_record():
    smoke = load("smoke")
    assert smoke.eval.clients == "all" and not smoke.eval.sampled
    assert smoke.hash == "c94737f5c0bf"  # the smoke preset's hash before eval.clients existed
    assert "clients" not in smoke.as_dict()["eval"]
    sampled = smoke.replace(eval=dataclasses.replace(smoke.eval, clients=2))
    assert sampled.hash != smoke.hash and sampled.as_dict()["eval"]["clients"] == 2


def test_default_evaluation_scores_every_client_every_evaluated_round(tiny_prep, tmp_path):
    rows, _ = _run(tiny_prep, "fedavg-lora", tmp_path)
    evals = [r for r in rows if r["kind"] == "eval"]
    for r in range(TINY.rounds):
        scored = {e["client"] for e in evals if e["round"] == r and e["scope"] == "client_global"}
        assert scored == set(range(TINY.data.num_clients))
    assert not any(k in e for e in evals for k in ("eval_sampled", "sampled_clients", "scored_clients"))


# --- sampled intermediate evaluations -------------------------------------------------------------
def _expected_sample(seed: int, r: int, n: int, k: int) -> list[int]:
    rng = np.random.default_rng(derive_seed(seed, r, "eval-sample"))
    return sorted(rng.choice(n, size=k, replace=False).tolist())


def test_sampled_intermediate_rounds_score_exactly_the_sample_and_the_last_round_all(sampled_prep, tmp_path):
    rows, _ = _run(sampled_prep, "fedavg-lora", tmp_path)
    evals = [r for r in rows if r["kind"] == "eval"]
    samples = [_expected_sample(0, r, 6, 2) for r in (0, 1)]
    for r, want in [(0, samples[0]), (1, samples[1]), (2, list(range(6)))]:
        for scope in ("client", "client_global"):
            assert sorted({e["client"] for e in evals if e["round"] == r and e["scope"] == scope}) == want
        glob = [e for e in evals if e["round"] == r and e["scope"] == "global"]
        assert glob and all(e["sampled_clients"] == len(want) == e["scored_clients"] for e in glob)
        assert all(e["registered_clients"] == 6 and e["eval_sampled"] == (r < 2) for e in glob)


def test_sampling_changes_no_score_of_the_last_round(sampled_prep, backbone, tmp_path):
    """Evaluation never feeds back into training: the last round's scores are those of ``all``."""
    proto = sampled_prep.protocol.replace(eval=dataclasses.replace(sampled_prep.protocol.eval, clients="all"))
    full_prep = prepare(proto, 0, backbone=backbone, device=torch.device("cpu"))
    sampled, _ = _run(sampled_prep, "fedsa-lora", tmp_path / "s")
    full, _ = _run(full_prep, "fedsa-lora", tmp_path / "a")
    ignore = {"run_id", "protocol_hash", "eval_sampled", "sampled_clients", "scored_clients", "registered_clients"}

    def last(rows):
        return [{k: v for k, v in r.items() if k not in ignore} for r in _stable(rows) if r.get("round") == 2]

    assert last(sampled) == last(full)
    assert _stable([r for r in sampled if r["kind"] == "train"]) != []


@pytest.mark.parametrize(("value", "n", "k"), [("all", 7, 7), (3, 7, 3), (0.5, 7, 4), (0.01, 7, 1), (0.01, 1000, 10)])
def test_sample_size(value, n, k):
    cfg = EvalConfig(clients=value)
    assert cfg.sample_size(n) == k
    assert len(eval_clients(cfg, 0, 0, n, final=False)) == k
    assert eval_clients(cfg, 0, 0, n, final=True) == list(range(n))


# --- reuse of identical models' scores ------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_reused_scores_give_the_records_of_scoring_every_client(tiny_prep, tmp_path, monkeypatch, name):
    reused_rows, on = _run(tiny_prep, name, tmp_path / "on")
    monkeypatch.setattr(ClientRuntime, "reuse_global_scores", False)
    fresh_rows, off = _run(tiny_prep, name, tmp_path / "off")
    assert _stable(reused_rows) == _stable(fresh_rows)
    assert off.runtime.reused == 0
    if name in CLIENT_DEPENDENT:  # forward depends on the client: never reused
        assert on.runtime.reused == 0
    if name == "fedavg-lora":  # every client holds the same model at evaluation: scored once per round
        assert on.runtime.reused == TINY.rounds * (TINY.data.num_clients - 1)


@pytest.mark.parametrize("name", CLIENT_DEPENDENT)
def test_methods_whose_forward_reads_the_client_are_never_reused(name):
    assert not state_only(create_method(name, {}))


def test_model_digest_sees_one_changed_value(tiny_prep):
    run = Run(tiny_prep, MethodEntry("fedavg-lora"), "/nonexistent", backend=in_process)
    model = run.build()
    before = model_digest(model)
    param = next(p for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        param.view(-1)[0] = torch.nextafter(param.view(-1)[0], torch.tensor(1.0))
    assert model_digest(model) != before
    assert state_only(run.method)


def test_identical_downloads_are_serialized_once(tiny_prep, tmp_path, monkeypatch):
    calls = []
    original = fedbench.runtime.server.serialize
    monkeypatch.setattr(fedbench.runtime.server, "serialize", lambda p: calls.append(1) or original(p))
    rows, _ = _run(tiny_prep, "fedavg-lora", tmp_path)
    # per round: one training download per distinct task set (FedAvg-LoRA sends the held tasks'
    # tensors), then the one evaluation download every client receives
    infos = {i.client: i.tasks for i in tiny_prep.infos}
    per_round = [{infos[r["client"]] for r in rows if r["kind"] == "train" and r["round"] == q} for q in (0, 1)]
    assert len(calls) == sum(len(sets) + 1 for sets in per_round) < 2 * (TINY.data.num_clients + 2)
    train = [r for r in rows if r["kind"] == "train"]
    assert all(r["down_bytes"] > r["down_bytes_analytic"] > 0 for r in train)


# --- bad values -----------------------------------------------------------------------------------
SMOKE = resources.files("fedbench.config.presets").joinpath("smoke.toml").read_text()


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ('"some"', "protocol field 'eval.clients' = 'some' is invalid: expected \"all\", an integer >= 1"),
        ("0", "protocol field 'eval.clients' = 0 is invalid: expected \"all\", an integer >= 1"),
        ("1.0", "protocol field 'eval.clients' = 1.0 is invalid: expected \"all\", an integer >= 1"),
        ("true", "protocol field 'eval.clients' = True is invalid"),
        ("9", "protocol field 'eval.clients' = 9 is invalid: expected at most data.num_clients = 4 clients"),
    ],
)
def test_bad_eval_clients_is_one_line_exit_2(tmp_path, value, needle):
    path = tmp_path / "bad.toml"
    path.write_text(SMOKE.replace("[eval]\n", f"[eval]\nclients = {value}\n"))
    result = CliRunner().invoke(app, ["run", "--preset", str(path), "--results", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:") and "Traceback" not in result.output
    assert needle in errors[0], errors[0]
    assert not (tmp_path / "r").exists()


def test_from_dict_rejects_a_list():
    with pytest.raises(ProtocolError, match=r"'eval.clients' = \[2\] is invalid"):
        from_dict({"eval": {"clients": [2]}})


# --- the leaderboard says which evaluation was used -----------------------------------------------
def test_leaderboard_names_the_sampled_evaluation(sampled_prep, tiny_prep, tmp_path):
    sampled, _ = _run(sampled_prep, "fedavg-lora", tmp_path / "s")
    df = pd.DataFrame(sampled)
    board = build_leaderboard(df)
    note = "intermediate rounds (converged, per-round curves) scored a seeded sample of 2 of 6 clients"
    assert note in render(board, "markdown")
    assert note in " ".join(render_terminal(board, 200).split())
    csv = render(board, "csv")
    assert "eval_sample" in csv.splitlines()[0] and "2 of 6" in csv
    assert "eval_sample" not in render(board, "markdown").splitlines()[0]
    from fedbench.reporting.board import round_curves

    curves = round_curves(df)
    assert list(curves.index) == [0, 1, 2] and curves["fedavg-lora"].notna().all()

    default, _ = _run(tiny_prep, "fedavg-lora", tmp_path / "d")
    plain = build_leaderboard(pd.DataFrame(default))
    assert "sample" not in render(plain, "markdown") and "eval_sample" not in render(plain, "csv")
