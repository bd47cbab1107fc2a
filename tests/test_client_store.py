"""Clients' stored states on disk (fedbench.runtime.client_store): one immutable file per client and version,
written only when it trains; checkpoints that name them and add only the files of the round; a kill
at any point resumes to the same records; a damaged file is one line naming it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import kill_in_round

from fedbench.backends.inprocess import in_process
from fedbench.config.protocol import EvalConfig, MethodEntry
from fedbench.runtime.checkpoint import Checkpoint
from fedbench.runtime.client_store import ClientStore
from fedbench.runtime.server import Run
from fedbench.utils.integrity import IntegrityError
from fedbench.utils.records import read_jsonl

VOLATILE = {"compute_s", "git_commit", "versions"}
METHOD = "fedsa-lora"  # local state (its B matrices) that must survive rounds and resumes


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def _tensors_in(obj, depth: int = 0) -> int:
    """How many tensors ``obj`` holds, through dicts, lists, tuples, sets and object attributes."""
    if isinstance(obj, torch.Tensor):
        return 1
    if depth > 6:
        return 0
    if isinstance(obj, dict):
        return sum(_tensors_in(v, depth + 1) for v in obj.values())
    if isinstance(obj, list | tuple | set):
        return sum(_tensors_in(v, depth + 1) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return _tensors_in(vars(obj), depth + 1)
    return 0


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"a": torch.full((4,), value), "b": torch.arange(6, dtype=torch.float64).reshape(2, 3) * value}


@pytest.fixture(scope="module")
def prep(tiny_prep):
    """3 clients, 2 trained per round, 3 rounds, evaluated only after the last."""
    protocol = tiny_prep.protocol.replace(rounds=3, eval=EvalConfig(every=0, batch_size=64))
    return replace(tiny_prep, protocol=protocol)


@pytest.fixture(scope="module")
def clean(prep, tmp_path_factory):
    run = Run(prep, MethodEntry(METHOD), tmp_path_factory.mktemp("clean"), backend=in_process)
    run.execute()
    return read_jsonl(run.records_path)


def _trained(rows, r: int) -> set[int]:
    return {row["client"] for row in rows if row["kind"] == "train" and row["round"] == r}


def _files(run: Run) -> dict[str, int]:
    """Every file of the run directory but the records and the lock, relative name -> size."""
    return {
        str(p.relative_to(run.dir)): p.stat().st_size
        for p in run.dir.rglob("*")
        if p.is_file() and p.name not in ("records.jsonl", "lock")
    }


# --- the store alone ---------------------------------------------------------------------------------
def test_each_write_is_a_new_file_and_the_old_one_goes_only_on_commit(tmp_path):
    store = ClientStore(tmp_path)
    store[7] = _state(1.0)
    (first,) = tmp_path.iterdir()
    assert first.name.startswith("7-0-") and store.files()[7].bytes == first.stat().st_size
    store[7] = _state(2.0)
    assert len(list(tmp_path.iterdir())) == 2 and first.read_bytes()  # the file a checkpoint names stays
    assert torch.equal(store[7]["b"], _state(2.0)["b"]) and store[7]["b"].dtype == torch.float64
    assert set(store.written) == {7} and 3 not in store and store.get(3) is None
    store.commit()
    assert [p.name for p in tmp_path.iterdir()] == [store.files()[7].name] and not store.written
    assert _tensors_in(vars(store)) == 0  # an index of names and sizes, no states on the heap


def test_restore_goes_back_to_a_checkpoints_files_and_removes_later_ones(tmp_path):
    store = ClientStore(tmp_path)
    store[1], store[2] = _state(1.0), _state(2.0)
    store.commit()
    named = store.files()
    store[1] = _state(5.0)  # written during the next round, which is then killed
    (tmp_path / "2-1-junk.safetensors.tmp").write_bytes(b"torn")
    again = ClientStore(tmp_path)
    again.restore(named)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in named.values())
    assert torch.equal(again[1]["a"], _state(1.0)["a"]) and list(again) == [1, 2]
    again.restore({})
    assert not list(tmp_path.iterdir()) and len(again) == 0


def test_a_shared_store_finds_the_newest_file_from_any_process(tmp_path):
    one, other = ClientStore(tmp_path, shared=True), ClientStore(tmp_path, shared=True)
    one[11] = _state(1.0)
    other[11] = _state(3.0)  # another worker process of the same node
    one[1] = _state(2.0)
    assert torch.equal(one[11]["a"], _state(3.0)["a"]) and sorted(one) == [1, 11]
    assert sorted(p.name.split("-")[:2] for p in tmp_path.iterdir()) == [["1", "0"], ["11", "1"]]
    del other[11]
    assert 11 not in one and list(one) == [1]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_client_file_is_one_line_naming_it(tmp_path, damage):
    store = ClientStore(tmp_path)
    store[4] = _state(1.0)
    path = tmp_path / store.files()[4].name
    blob = bytearray(path.read_bytes())
    if damage == "flip":
        blob[-3] ^= 0x40
    else:
        blob = blob[:-8]
    path.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError) as err:
        store[4]
    assert "\n" not in str(err.value) and f"stored state of client 4 '{path}' is damaged" in str(err.value)


# --- in a run -----------------------------------------------------------------------------------------
def test_a_run_keeps_only_trained_clients_files_and_no_states_in_memory(prep, tmp_path, monkeypatch):
    run = kill_in_round(prep, tmp_path, monkeypatch, 1, METHOD)
    rows = read_jsonl(run.records_path)
    store = run.backend.runtime.states
    assert isinstance(store, ClientStore) and store is run.checkpoint.clients
    runtime = {k: v for k, v in vars(run.backend.runtime).items() if k not in ("model", "init", "prep", "method")}
    assert _tensors_in(vars(store)) == 0 and _tensors_in(runtime) == 0  # the model and its init, no states
    trained = _trained(rows, 0)
    assert 0 < len(trained) < len(prep.infos)  # a client that did not train has no file
    names = sorted(p.name for p in (run.dir / "clients").iterdir())
    assert [int(n.split("-")[0]) for n in names] == sorted(trained) and sorted(store) == sorted(trained)
    manifest = json.loads(run.checkpoint.path.read_text())
    assert sorted(name for name, _ in manifest["clients"].values()) == names


def test_each_checkpoint_adds_only_the_rounds_files(prep, tmp_path, monkeypatch, clean):
    """The files new after each checkpoint: its server state and the files of the clients trained in
    that round, nothing else (the manifest is rewritten); superseded files are gone once it is in place."""
    added, sizes, before = [], [], {}
    save = Checkpoint.save

    def spy(self, next_round, *args):
        nonlocal before
        save(self, next_round, *args)
        now = _files(run)
        added.append({name for name in now if name not in before or name == "checkpoint.json"})
        sizes.append((self.bytes_written, sum(now[name] for name in added[-1])))
        before = now

    monkeypatch.setattr(Checkpoint, "save", spy)
    run = Run(prep, MethodEntry(METHOD), tmp_path, backend=in_process)
    run.execute()
    rows = read_jsonl(run.records_path)
    assert _stable(rows) == _stable(clean)
    for r, new in enumerate(added):
        clients = {int(Path(name).name.split("-")[0]) for name in new if name.startswith("clients/")}
        assert clients == _trained(rows, r), r
        assert new - {f"clients/{Path(n).name}" for n in new} == {"checkpoint.json", f"server-{r + 1:05d}.safetensors"}
    assert [written for written, _ in sizes] == [on_disk for _, on_disk in sizes]
    assert len(added) == prep.protocol.rounds and not (run.dir / "clients").exists()  # a finished run: removed
    assert not list(run.dir.glob("*.safetensors")) and not run.checkpoint.path.exists()


def _kill_between_client_files_and_manifest(monkeypatch):
    original = Checkpoint.save

    def killed(self, next_round, *args):
        if next_round == 2:  # round 1's client files are written; its server file and manifest are not
            raise KeyboardInterrupt
        original(self, next_round, *args)

    monkeypatch.setattr(Checkpoint, "save", killed)


def _kill_while_writing_the_manifest(monkeypatch):
    import fedbench.runtime.checkpoint as checkpoint

    original = checkpoint.write_atomic

    def killed(path, data):
        if path.name == "checkpoint.json" and b'"round":2' in data:
            raise KeyboardInterrupt  # the server file of round 2 is in place, the manifest is not
        original(path, data)

    monkeypatch.setattr(checkpoint, "write_atomic", killed)


def _kill_after_the_manifest(monkeypatch):
    original = ClientStore.commit
    calls = []

    def killed(self):
        calls.append(1)
        if len(calls) == 2:  # manifest 2 in place; the files it superseded not yet removed
            raise KeyboardInterrupt
        original(self)

    monkeypatch.setattr(ClientStore, "commit", killed)


@pytest.mark.parametrize(
    "kill", [_kill_between_client_files_and_manifest, _kill_while_writing_the_manifest, _kill_after_the_manifest]
)
def test_a_kill_around_the_manifest_resumes_to_identical_records(prep, tmp_path, monkeypatch, clean, kill):
    with monkeypatch.context() as patch:
        kill(patch)
        run = Run(prep, MethodEntry(METHOD), tmp_path, backend=in_process)
        with pytest.raises(KeyboardInterrupt):
            run.execute()
    manifest = json.loads(run.checkpoint.path.read_text())
    named = {name for name, _ in manifest["clients"].values()}
    on_disk = {p.name for p in (run.dir / "clients").iterdir()}
    assert named < on_disk  # files of a newer round (or superseded ones) sit beside those the manifest names
    resumed = Run(prep, MethodEntry(METHOD), tmp_path, backend=in_process)
    events = []
    resumed.progress = lambda event, info: events.append((event, info.get("round")))
    resumed.execute()
    assert ("resume", manifest["round"]) in events
    assert _stable(read_jsonl(resumed.records_path)) == _stable(clean)


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_a_damaged_client_file_stops_the_resume_in_one_line(prep, tmp_path, monkeypatch, damage):
    run = kill_in_round(prep, tmp_path, monkeypatch, 1, METHOD)
    manifest = json.loads(run.checkpoint.path.read_text())
    client, (name, _) = sorted(manifest["clients"].items())[0]
    path = run.dir / "clients" / name
    if damage == "flip":
        blob = bytearray(path.read_bytes())
        blob[-2] ^= 0x01
        path.write_bytes(bytes(blob))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-16])
    else:
        path.unlink()
    with pytest.raises(IntegrityError) as err:
        Run(
            prep, MethodEntry(METHOD), tmp_path, backend=in_process
        ).execute()  # the last round evaluates every client: reads it
    message = str(err.value)
    assert "\n" not in message and f"stored state of client {client} '{path}'" in message
    assert ("is damaged" if damage == "flip" else "is missing" if damage == "missing" else "bytes") in message
