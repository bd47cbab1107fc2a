"""The on-disk frozen-feature cache: same records with and without it, read back instead of recomputed,
a new entry whenever a key part changes, and a damaged entry recomputed with one warning naming it."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY

from fedbench.api.backbone import Backbone
from fedbench.backends.inprocess import in_process
from fedbench.config.protocol import MethodEntry
from fedbench.runtime.rows import run_rows
from fedbench.staging.feature_cache import FORMAT, FeatureCache, cache_root, entry_key, features_dir, key_parts
from fedbench.staging.prepare import prepare
from fedbench.utils.records import read_jsonl

VOLATILE = {"compute_s", "git_commit", "versions"}
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """A private FEDBENCH_CACHE: these tests never touch ~/.cache."""
    monkeypatch.setenv("FEDBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def encode_calls(monkeypatch) -> list[int]:
    """The batch size of every image-tower pass, on any backbone."""
    calls: list[int] = []
    original = Backbone.encode_image

    def counting(self, images):
        calls.append(len(images))
        return original(self, images)

    monkeypatch.setattr(Backbone, "encode_image", counting)
    return calls


def _records(results: Path) -> list[list[dict]]:
    runs = sorted((results / "runs").glob("*/records.jsonl"))
    assert runs, f"no run under {results}"
    return [[{k: v for k, v in r.items() if k not in VOLATILE} for r in read_jsonl(p)] for p in runs]


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "features").glob("*") if (p / "entry.json").is_file())


def test_records_identical_with_and_without_the_disk_cache_and_a_warm_run_skips_the_towers(
    tmp_path, cache, encode_calls
):
    proto = TINY.replace(rounds=1, methods=(MethodEntry("pilot-ctmoa"), MethodEntry("fedmix")))
    run_rows(proto, tmp_path / "memory", feature_cache=False, backend=in_process)
    assert not cache.exists()  # off: nothing written anywhere
    in_memory_passes = len(encode_calls)
    assert in_memory_passes > 0
    run_rows(proto, tmp_path / "cold", feature_cache=True, backend=in_process)
    assert len(_entries(cache)) == 1
    encode_calls.clear()
    run_rows(
        proto, tmp_path / "warm", feature_cache=True, backend=in_process
    )  # a later `fedbench run`: features read from disk
    assert encode_calls == []
    memory = _records(tmp_path / "memory")
    assert _records(tmp_path / "cold") == memory
    assert _records(tmp_path / "warm") == memory


def test_loaded_features_equal_computed_ones_bit_for_bit(backbone, cache, encode_calls):
    computed = prepare(TINY, 0, backbone=backbone, device=CPU)  # in memory, as without the cache
    cold = prepare(TINY, 0, backbone=backbone, device=CPU, feature_cache=True)
    warm = prepare(TINY, 0, backbone=backbone, device=CPU, feature_cache=True)
    every = torch.arange(len(computed.store.images))
    tokens, pooled = computed.features.get(every)
    assert computed.features.origin == "memory" and computed.features.entry is None
    assert all(torch.equal(a, b) for a, b in zip(cold.features.get(every), (tokens, pooled), strict=True))
    assert cold.features.origin == "computed" and cold.features.entry.parent == features_dir()
    encode_calls.clear()
    got = warm.features.get(every)
    assert warm.features.origin == "disk" and encode_calls == []
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, (tokens, pooled), strict=True))
    # a subset indexes the stored rows exactly as the in-memory cache does
    some = torch.as_tensor([3, 0, 3, 1])
    assert all(torch.equal(a, b) for a, b in zip(warm.features.get(some), computed.features.get(some), strict=True))
    assert cache_root() == cache


def test_a_seed_drawing_other_images_gets_its_own_entry(backbone, cache):
    for seed in (0, 1):
        prep = prepare(TINY, seed, backbone=backbone, device=CPU, feature_cache=True)
        prep.features.get(torch.as_tensor([0]))
        assert prep.features.origin == "computed"
    assert len(_entries(cache)) == 2


def _parts(backbone: Backbone, images: torch.Tensor, batch_size: int = 64) -> dict:
    return key_parts(backbone, images, batch_size)


def test_every_key_part_changes_the_entry(backbone, tiny_prep):
    images = tiny_prep.store.images
    base = _parts(backbone, images)
    assert base["format"] == FORMAT and entry_key(base) == entry_key(_parts(backbone, images.clone()))

    other_weights = copy.deepcopy(backbone)
    with torch.no_grad():
        next(other_weights.image_tower.parameters()).view(-1)[0] += 1e-3
    other_size = copy.deepcopy(backbone)
    other_size.image_size = backbone.image_size // 2
    other_norm = copy.deepcopy(backbone)
    other_norm.std = backbone.std * 2
    one_pixel = images.clone()
    one_pixel.view(-1)[-1] ^= 1
    bigger = prepare(
        TINY.replace(data=dataclasses.replace(TINY.data, image_size=TINY.data.image_size + 8)),
        0,
        backbone=backbone,
        device=CPU,
    )
    variants = {
        "backbone weights": _parts(other_weights, images),
        "tower input size": _parts(other_size, images),
        "normalisation": _parts(other_norm, images),
        "one pixel": _parts(backbone, one_pixel),
        "image size of the data": _parts(backbone, bigger.store.images),
        "fewer images": _parts(backbone, images[:-1]),
        "batch size": _parts(backbone, images, batch_size=32),
        "autocast": key_parts(backbone, images, 64, torch.bfloat16),
    }
    keys = {name: entry_key(parts) for name, parts in variants.items()}
    assert entry_key(base) not in keys.values(), keys
    assert len(set(keys.values())) == len(keys), keys


def _cold_entry(backbone: Backbone, prep) -> tuple[Path, tuple[torch.Tensor, torch.Tensor]]:
    """A finished on-disk entry of ``prep``'s images, and the features computed in memory."""
    every = torch.arange(len(prep.store.images))
    cold = FeatureCache(backbone, prep.store.images, 64, disk=features_dir())
    cold.get(every)
    assert cold.origin == "computed"
    return cold.entry, FeatureCache(backbone, prep.store.images, 64).get(every)


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete entry.json", "other key in entry.json"])
def test_a_damaged_entry_is_recomputed_with_one_warning_naming_it(backbone, tiny_prep, encode_calls, damage):
    entry, expected = _cold_entry(backbone, tiny_prep)
    tokens = entry / "tokens.npy"
    if damage == "flip a byte":
        data = bytearray(tokens.read_bytes())
        data[-1] ^= 0xFF
        tokens.write_bytes(bytes(data))
        named = tokens
    elif damage == "truncate":
        tokens.write_bytes(tokens.read_bytes()[:1000])
        named = tokens
    elif damage == "delete entry.json":  # a writer killed before its last rename
        (entry / "entry.json").unlink()
        named = entry / "entry.json"
    else:
        meta = json.loads((entry / "entry.json").read_text())
        meta["parts"]["batch_size"] = 1
        (entry / "entry.json").write_text(json.dumps(meta))
        named = entry / "entry.json"
    every = torch.arange(len(tiny_prep.store.images))
    again = FeatureCache(backbone, tiny_prep.store.images, 64, disk=features_dir())
    encode_calls.clear()
    with pytest.warns(RuntimeWarning, match="feature cache") as caught:
        got = again.get(every)
    assert len(caught) == 1 and str(named) in str(caught[0].message)
    assert again.origin == "computed" and encode_calls  # recomputed, not read
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    healed = FeatureCache(backbone, tiny_prep.store.images, 64, disk=features_dir())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rewritten: read back without a warning
        healed.get(every)
    assert healed.origin == "disk"


def test_cli_flag_turns_the_disk_cache_off_and_says_where_features_came_from(tmp_path, cache):
    from test_cli import TINY_FIELDS, _toml
    from typer.testing import CliRunner

    from fedbench.cli import app

    proto = _toml(tmp_path / "p.toml", {**TINY_FIELDS, "methods": ["pilot-ctmoa"], "rounds": 1})
    runner = CliRunner()

    def run(name: str, *flags: str) -> str:
        args = ["run", "--preset", str(proto), "--results", str(tmp_path / name), "--no-plots", *flags]
        result = runner.invoke(app, args, env={"COLUMNS": "300"})
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())

    assert "features computed in memory" in run("off", "--no-feature-cache") and not cache.exists()
    assert "computed and written to the disk cache" in run("cold")
    assert "read from the disk cache" in run("warm")
    assert len(_entries(cache)) == 1
    assert _records(tmp_path / "warm") == _records(tmp_path / "off")


def test_cli_refuses_a_feature_cache_inside_the_results_directory(tmp_path, monkeypatch):
    from test_cli import _fails_cleanly

    monkeypatch.setenv("FEDBENCH_CACHE", str(tmp_path / "out" / "cache"))
    _fails_cleanly(["run", "--results", str(tmp_path / "out")], "is inside --results")
    assert not (tmp_path / "out" / "cache").exists()


def test_features_keep_their_precision_whoever_fills_them_first(backbone, tiny_prep):
    """The first ``get`` may come from a training step under autocast: the features are still computed
    in the run's precision (float32 here), so an entry never depends on which pass filled it."""
    every = torch.arange(len(tiny_prep.store.images))
    plain = FeatureCache(backbone, tiny_prep.store.images, 64).get(every)
    under_autocast = FeatureCache(backbone, tiny_prep.store.images, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = under_autocast.get(every)
    assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(got, plain, strict=True))


@pytest.fixture
def text_calls(monkeypatch) -> list[int]:
    """The number of strings of every text-tower call, on any backbone."""
    calls: list[int] = []
    original = Backbone.encode_text

    def counting(self, texts, batch_size=256):
        calls.append(len(texts))
        return original(self, texts, batch_size)

    monkeypatch.setattr(Backbone, "encode_text", counting)
    return calls


def test_text_embeddings_are_read_back_bit_for_bit_and_a_warm_prepare_skips_the_text_tower(backbone, cache, text_calls):
    computed = prepare(TINY, 0, backbone=backbone, device=CPU)
    assert computed.store.text.origins == ["memory", "memory"] and not cache.exists()  # questions, OCR words
    cold = prepare(TINY, 0, backbone=backbone, device=CPU, feature_cache=True)
    assert cold.store.text.origins == ["computed", "computed"]
    assert len([p for p in (cache / "text").glob("*") if (p / "entry.json").is_file()]) == 2
    text_calls.clear()
    warm = prepare(TINY, 0, backbone=backbone, device=CPU, feature_cache=True)
    assert warm.store.text.origins == ["disk", "disk"] and text_calls == []
    for prep in (cold, warm):
        for name in ("question", "ocr", "ocr_mask"):
            got, want = getattr(prep.store, name), getattr(computed.store, name)
            assert got.dtype == want.dtype and torch.equal(got, want), name


def test_every_text_key_part_changes_the_entry(backbone):
    from fedbench.staging.feature_cache import text_key_parts

    texts = ["what color is the ball", "how many cars"]
    base = entry_key(text_key_parts(backbone, texts))
    assert base == entry_key(text_key_parts(backbone, list(texts)))
    other_weights = copy.deepcopy(backbone)
    with torch.no_grad():
        next(other_weights.towers.transformer.parameters()).view(-1)[0] += 1e-3  # the text tower's
    other_name = copy.deepcopy(backbone)
    other_name.name = "another-tokenizer"
    variants = {
        "order": text_key_parts(backbone, texts[::-1]),
        "one character": text_key_parts(backbone, ["what color is the balls", "how many cars"]),
        "split differently": text_key_parts(backbone, ["what color is the ballhow", " many cars"]),
        "one string fewer": text_key_parts(backbone, texts[:1]),
        "text-tower weights": text_key_parts(other_weights, texts),
        "backbone name": text_key_parts(other_name, texts),
    }
    keys = {what: entry_key(parts) for what, parts in variants.items()}
    assert base not in keys.values() and len(set(keys.values())) == len(keys), keys


def test_a_damaged_text_entry_is_recomputed_with_one_warning_naming_it(backbone, cache, text_calls):
    from fedbench.staging.row_store import TextEncoder

    texts = ["what color is the ball", "how many cars"]
    want = TextEncoder(backbone, cache / "text")(texts)
    (entry,) = [p for p in (cache / "text").glob("*") if (p / "entry.json").is_file()]
    damaged = entry / "embeddings.npy"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    again = TextEncoder(backbone, cache / "text")
    text_calls.clear()
    with pytest.warns(RuntimeWarning, match="feature cache") as caught:
        got = again(texts)
    assert len(caught) == 1 and str(damaged) in str(caught[0].message)
    assert again.origins == ["computed"] and text_calls == [2] and torch.equal(got, want)
