"""What a run record carries to explain drift across machines: data fingerprint and machine."""

from __future__ import annotations

import torch
from conftest import TINY

from fedbench.backends.inprocess import in_process
from fedbench.runtime.server import Run
from fedbench.staging.prepare import prepare
from fedbench.utils.records import read_jsonl


def test_run_record_carries_the_data_fingerprint_and_the_machine(tiny_prep, tmp_path):
    run = Run(tiny_prep, TINY.methods[0], tmp_path, backend=in_process)
    run.execute()
    final = next(r for r in read_jsonl(run.records_path) if r["kind"] == "run")
    assert final["data_fingerprint"] == tiny_prep.table.fingerprint()
    assert set(final["machine"]) == {"cpu_model", "torch_cpu_capability", "torch_threads", "pillow", "freetype"}
    assert final["machine"]["torch_threads"] == torch.get_num_threads()


def test_fingerprint_follows_the_data(tiny_prep, backbone):
    again = prepare(TINY, 0, backbone=backbone, device=torch.device("cpu"))
    other = prepare(TINY, 1, backbone=backbone, device=torch.device("cpu"))
    assert again.table.fingerprint() == tiny_prep.table.fingerprint()
    assert other.table.fingerprint() != tiny_prep.table.fingerprint()
