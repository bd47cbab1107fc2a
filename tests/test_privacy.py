"""The privacy promise, proven on bytes: a tensor a client tags local never reaches the server.

Tags alone prove little (an upload checked by name can still carry a local tensor's values under
another name, e.g. a ``meta.*`` message tensor). So for every registered method (listed when the
tests are collected, so a method added later is included), a tiny run records every byte the
server receives: each client's uploads and requests, and its evaluation replies (the metrics). Then,
for every round and every client that trained, each tensor it tags local (from its stored state
right after that round's training) is searched for, as raw bytes, in

- every uplink message of the run (all clients, all rounds), and the evaluation replies;
- the server part of every checkpoint the server wrote (``server/*`` tensors);
- ``records.jsonl``, as numbers (a run of four consecutive values of the tensor).

Searched are the whole tensor and, for a matrix, each of its rows. Left out, and why:

- pieces under 16 bytes (four float32 values): too short to tell a leak from a coincidence;
- all-zero or constant pieces (a zero-initialised LoRA B, a LayerNorm weight of ones): every model
  holds such runs of bytes, so finding one proves nothing;
- pieces still equal to the shared seeded init: every party builds that init from the seed, so its
  bytes are public (a local tensor a client has not trained yet).

A leaky toy method (a local head copied into a ``meta.*`` tensor, which the name check lets through)
is caught by the same search, so the test can fail.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedbench.api.method import Method
from fedbench.api.registry import METHODS
from fedbench.backends.inprocess import InProcessBackend
from fedbench.config.protocol import EvalConfig, MethodEntry
from fedbench.runtime.checkpoint import Checkpoint
from fedbench.runtime.client import ClientRuntime, trainable_state
from fedbench.runtime.server import Run

MIN_BYTES = 16


class SpyBackend(InProcessBackend):
    """The in-process backend, keeping every reply the server receives and each client's stored
    state right after it trained."""

    def __init__(self, runtime) -> None:
        super().__init__(runtime)
        self.uplinks: list[bytes] = []  # uploads, requests, evaluation replies (as bytes)
        self.trained: list[tuple[int, int, dict[str, torch.Tensor]]] = []  # (round, client, stored state)

    def query(self, messages):
        for reply in super().query(messages):
            self.uplinks.append(reply or b"")
            yield reply

    def train(self, messages):
        for msg, reply in zip(messages, super().train(messages), strict=True):
            if reply is not None:
                self.uplinks.append(reply.upload)
                state = self.runtime.states[msg.client]
                self.trained.append((msg.round, msg.client, {n: t.clone() for n, t in state.items()}))
            yield reply

    def evaluate(self, messages):
        for reply in super().evaluate(messages):
            if reply is not None:
                for array in (reply.own, reply.global_, reply.routing):
                    if array is not None:  # scores and routing weights, as float64 and as float32
                        self.uplinks += [array.tobytes(), array.astype(np.float32).tobytes()]
            yield reply


def _pieces(tensor: torch.Tensor, init: torch.Tensor) -> list[torch.Tensor]:
    """The whole tensor and each row of a matrix, less those too short, constant or still at init."""
    candidates = [(tensor, init)]
    if tensor.dim() >= 2:
        candidates += list(zip(tensor.flatten(1), init.flatten(1), strict=True))
    out = []
    for piece, start in candidates:
        if piece.numel() * piece.element_size() < MIN_BYTES:
            continue
        flat = piece.flatten()
        if bool((flat == flat[0]).all()) or torch.equal(piece, start):
            continue
        out.append(piece.contiguous())
    return out


def _number_runs(value, out: set) -> None:
    """Every run of four consecutive numbers in any list of a record, as float32 bytes."""
    if isinstance(value, dict):
        for v in value.values():
            _number_runs(v, out)
    elif isinstance(value, list):
        numbers = [v for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(numbers) == len(value) and len(numbers) >= 4:
            arr = np.asarray(numbers, dtype=np.float32)
            out.update(arr[i : i + 4].tobytes() for i in range(len(arr) - 3))
        else:
            for v in value:
                _number_runs(v, out)


def leaks(name: str, prep, tmp: Path, monkeypatch, options: dict | None = None) -> tuple[list[str], int, bool]:
    """Run ``name`` on the tiny protocol with every message, checkpoint and record kept; returns the
    local pieces found where the server could read them, how many pieces were searched, and whether
    the method's clients train any local tensor."""
    server_parts: list[bytes] = []
    save = Checkpoint.save

    def keep_server_part(self, next_round, server, clients, init):
        save(self, next_round, server, clients, init)
        manifest = json.loads(self.path.read_text())
        tensors = load_file(str(self.path.with_name(manifest["file"])))
        server_parts.append(
            b"".join(t.numpy().tobytes() for k, t in sorted(tensors.items()) if k.startswith("server/"))
        )

    monkeypatch.setattr(Checkpoint, "save", keep_server_part)
    spies: list[SpyBackend] = []

    def spy(run: Run) -> SpyBackend:
        spies.append(SpyBackend(ClientRuntime(run.prep, run.method)))
        return spies[-1]

    run = Run(prep, MethodEntry(name, options or {}), tmp, backend=spy)
    run.execute()
    backend = spies[0] if spies else None
    model = run.build()
    tags = run.method.tags(model)
    init = trainable_state(model)
    numbers: set[bytes] = set()
    for line in run.records_path.read_text().splitlines():
        _number_runs(json.loads(line), numbers)
    uplink = b"\0".join(backend.uplinks) if backend else b""
    server = b"\0".join(server_parts)
    found, searched = [], 0
    for rnd, client, state in backend.trained if backend else []:
        for tensor_name, tensor in state.items():
            if tags.get(tensor_name) != "local":
                continue
            for piece in _pieces(tensor, init[tensor_name]):
                searched += 1
                raw = piece.numpy().tobytes()
                where = [
                    label
                    for label, hit in (
                        ("uplink", raw in uplink),
                        ("server checkpoint", raw in server),
                        ("records", raw[:16] in numbers),
                    )
                    if hit
                ]
                if where:
                    found.append(
                        f"round {rnd} client {client} {tensor_name} {tuple(piece.shape)} in {', '.join(where)}"
                    )
    return found, searched, run.method.federated and "local" in tags.values()


@pytest.fixture(scope="module")
def private_prep(tiny_prep):
    """TINY, every client sampled every round (each trains in both rounds), scored after the last."""
    proto = tiny_prep.protocol.replace(
        clients=dataclasses.replace(tiny_prep.protocol.clients, sample_fraction=1.0),
        eval=EvalConfig(every=0, batch_size=64),
    )
    return dataclasses.replace(tiny_prep, protocol=proto)


@pytest.mark.parametrize("name", METHODS.names())
def test_no_local_tensor_reaches_the_server(name, private_prep, tmp_path, monkeypatch):
    found, searched, has_local = leaks(name, private_prep, tmp_path, monkeypatch)
    assert not found, f"{name}: local tensor bytes reached the server: {found[:3]}"
    assert searched > 0 or not has_local, f"{name} trains local tensors but none was searched"


@pytest.fixture(scope="module")
def private_vlm_prep(tmp_path_factory):
    """As ``private_prep`` on a generative VLM: a random LLaVA (Llama LM) saved to disk, loaded by path."""
    from conftest import TINY
    from vlm_fixtures import save_tiny_llava

    from fedbench.config.sections import BackboneConfig
    from fedbench.staging.prepare import prepare

    path = save_tiny_llava(tmp_path_factory.mktemp("llava"), "llama")
    proto = dataclasses.replace(
        TINY,
        backbone=BackboneConfig(name=f"llava:{path}"),
        clients=dataclasses.replace(TINY.clients, sample_fraction=1.0),
        eval=EvalConfig(every=0, batch_size=64),
    )
    return prepare(proto, 0, device=torch.device("cpu"))


@pytest.mark.parametrize("name", [n for n in METHODS.names() if "vlm" in METHODS.get(n).families])
def test_no_local_tensor_reaches_the_server_on_a_generative_vlm(name, private_vlm_prep, tmp_path, monkeypatch):
    """The same search on the vlm family, for every method with a form there (the LoRA on the LM, the
    connector experts, FedDPA's local LoRA, pFedMoE's local connector and gate...)."""
    # fedmix's K forward passes per step and per generated token: two experts keep the test short
    options = {"num_experts": 2, "experts_per_client": 1} if name == "fedmix" else None
    found, searched, has_local = leaks(name, private_vlm_prep, tmp_path, monkeypatch, options)
    assert not found, f"{name}: local tensor bytes reached the server: {found[:3]}"
    assert searched > 0 or not has_local, f"{name} trains local tensors but none was searched"


def test_the_search_finds_a_local_tensor_smuggled_in_a_meta_tensor(private_prep, tmp_path, monkeypatch):
    """The name check lets ``meta.*`` tensors through; the byte search must not."""
    from fedbench.api.method import register_method

    base = METHODS.get("fedsa-lora")

    @register_method("toy-leaky")
    class Leaky(base):
        """FedSA-LoRA that also sends its first local answer-side tensor as ``meta.leak``."""

        def upload(self, model, client):
            up = super().upload(model, client)
            name = next(
                n for n, p in model.named_parameters() if p.requires_grad and self.tag(n) == "local" and p.dim() == 2
            )
            return {**up, "meta.leak": dict(model.named_parameters())[name].detach().clone()}

    try:
        found, _, _ = leaks("toy-leaky", private_prep, tmp_path, monkeypatch)
    finally:
        METHODS.unregister("toy-leaky")
    assert found and all("uplink" in f for f in found)
    assert isinstance(Leaky, type) and issubclass(Leaky, Method)


@pytest.mark.parametrize("name", ["fedsa-lora", "fedmix"])
def test_describe_states_the_promise_and_what_crosses(name, tiny_prep):
    from fedbench.cli.describe import privacy_promise

    method = METHODS.get(name)()
    model = ClientRuntime(tiny_prep, method).model
    tags = method.tags(model)
    text = privacy_promise(method, model, tags, tiny_prep)
    n_local = sum(p.numel() for n, p in model.named_parameters() if tags.get(n) == "local")
    assert "never leaves a client" in text
    assert f"({n_local:,} parameters" in text if n_local else "every trainable tensor of this method is shared" in text
    assert "number of training examples" in text and "global-test examples" in text
    assert ("its request (the first half" in text) == (name == "fedmix") and ("meta.*" in text) == (name == "fedmix")
