"""Real-data adapters on fixture snapshots in each dataset's schema, VQA scoring, and a smoke run.

Every fixture is written inside its test (``real_fixtures``: parquet with embedded PNG images, in the
layout ``huggingface-cli download --repo-type dataset REPO --local-dir DIR`` leaves), loaded through
the adapter and ``fedbench data check``, and checked against the adapter's mapping.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import real_fixtures as rf
import torch
from typer.testing import CliRunner

from fedbench.api.batch import Batch
from fedbench.api.data import GLOBAL_TEST, TRAIN, ExampleTable
from fedbench.api.family import family_of
from fedbench.api.registry import FAMILIES, TASKS
from fedbench.cli import app
from fedbench.staging.feature_cache import cache_root
from fedbench.tasks import real
from fedbench.tasks.families.vqa_soft import answer_scores, majority_answer, normalize_answer, vqa_accuracy

runner = CliRunner()


@pytest.fixture(autouse=True)
def _caches(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FEDBENCH_HF_CACHE", str(tmp_path / "hf"))


# ------------------------------------------------------------------------------------------ VQA scoring


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("Two", "2"),
        ("the dog.", "dog"),
        ("A red car!", "red car"),
        ("dont", "don't"),
        ("yes.", "yes"),
        ("1,000", "1000"),
        ("left-side", "left side"),
        ("  none\n", "0"),
    ],
)
def test_official_answer_normalisation(raw, normal):
    assert normalize_answer(raw) == normal


def test_vqa_accuracy_leave_one_out_by_hand():
    # a answered by m of 10 humans: m subsets see m-1 matches, 10-m see m; min(1, matches/3), mean
    for m, expected in ((0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)):
        answers = ["cat"] * m + ["dog"] * (10 - m)
        assert vqa_accuracy("cat", answers) == pytest.approx(expected)
    # normalisation before matching: "two" / "2" / "2." are one answer
    assert vqa_accuracy("2", ["two", "2.", "2"] + ["three"] * 7) == pytest.approx(0.9)
    assert answer_scores(["yes"] * 3 + ["no"] * 7) == pytest.approx({"yes": 0.9, "no": 1.0})
    assert vqa_accuracy("Ann", ["ann"]) == 1.0 and vqa_accuracy("Bob", ["ann"]) == 0.0  # one answer: exact
    assert majority_answer(["Two", "2", "three"]) == "2"


def test_vqa_soft_family_scores_predictions_and_majority():
    fam = FAMILIES.get("vqa_soft")
    assert (fam.metric.name, fam.metric.higher_is_better, fam.metric.aggregate) == ("vqa_accuracy", True, "mean")
    ids = torch.tensor([[0, 1, -1], [1, -1, -1]])
    scores = torch.tensor([[1.0, 0.3, 0.0], [0.6, 0.0, 0.0]])
    logits = torch.tensor([[0.1, 2.0, 0.0], [0.0, 0.0, 3.0]])  # predicts answer 1, then answer 2
    batch = Batch(*([None] * 7), torch.tensor([0, 1]), None, None, answer_ids=ids, answer_scores=scores)
    assert fam.correct(logits, batch).tolist() == pytest.approx([0.3, 0.0])
    n = 4
    table = ExampleTable(
        torch.zeros(1, 3, 4, 4, dtype=torch.uint8), np.zeros(n, np.int64), np.array(["t"] * n, object),
        np.array(["q"] * n, object), np.array([""] * n, object), np.array([1, 1, 0, 1]), np.zeros((n, 4), np.float32),
        np.zeros(n, np.int64), np.array([TRAIN, TRAIN, GLOBAL_TEST, GLOBAL_TEST], np.int8), np.zeros(n, np.int64),
        answer_ids=np.array([[1, -1]] * 2 + [[0, 1], [1, -1]]),
        answer_scores=np.array([[1, 0]] * 2 + [[1, 0.6], [0.3, 0]]),
    )  # fmt: skip
    spec = TASKS.get("vqav2")
    assert fam.majority(spec, table, np.array([0, 1]), np.array([2, 3])) == pytest.approx((0.6 + 0.3) / 2)


def test_every_family_declares_its_metric_and_rules():
    for name in FAMILIES.names():
        fam = FAMILIES.get(name)
        assert fam.name == name and fam.metric.name and fam.metric.aggregate == "mean"
        for hook in ("output", "head", "loss", "correct", "majority"):
            assert getattr(type(fam), hook) is not getattr(type(fam).__mro__[-2], hook, None)
    assert family_of(TASKS.get("grounding")).metric.name == TASKS.get("grounding").metric == "acc_iou50"
    assert TASKS.get("refcoco").metric == "acc_iou50" and TASKS.get("vqav2").metric == "vqa_accuracy"
    with pytest.raises(ValueError, match="family 'nope' not in"):
        from fedbench.api.task import TaskSpec

        TaskSpec("x", "nope", "real")


# ------------------------------------------------------------------------------- adapters on fixtures


def _check(root, task):
    result = runner.invoke(app, ["data", "check", str(root), "--task", task])
    assert result.exit_code == 0, result.output
    assert "schema ok" in result.output
    return result.output


def test_vqav2_adapter_normalises_the_ten_answers(tmp_path):
    rf.vqav2(tmp_path / "vqav2")
    out = _check(tmp_path / "vqav2", "vqav2")
    assert "examples 36" in out and "images 12" in out and "human_answers_per_example 10.0" in out
    adapter = real.ADAPTERS["vqav2"]
    ex = real.read_examples(tmp_path / "vqav2", adapter, "validation")
    assert len(ex) == 36 and all(len(a) == 10 for a in ex.answers)
    assert {majority_answer(a) for a in ex.answers} == {"yes", "no", "2", "red", "dog"}  # "two", "a dog", "Yes."
    assert ex.domain_names == ("number", "other", "yes/no")  # natural domain: answer type


def test_textvqa_adapter_carries_ocr_tokens(tmp_path):
    rf.textvqa(tmp_path / "tv")
    out = _check(tmp_path / "tv", "textvqa")
    assert "ocr_tokens_per_example 3.0" in out and "validation:" in out
    ex = real.read_examples(tmp_path / "tv", real.ADAPTERS["textvqa"], "train")
    assert ex.ocr[0] == "STOP open 24h" and ex.answers[0] == ["stop"] * 9 + ["unanswerable"]


def test_ocrvqa_adapter_expands_parallel_lists(tmp_path):
    rf.ocrvqa(tmp_path / "ocr")
    _check(tmp_path / "ocr", "ocrvqa")
    ex = real.read_examples(tmp_path / "ocr", real.ADAPTERS["ocrvqa"], "train")
    assert len(ex) == 30 and ex.question[:3].tolist()[1] == "What is the genre of this book?"
    assert ex.answers[:3] == [["Ann"], ["Travel"], ["No"]] and ex.ocr[0] == "Book 0 by Ann"
    assert ex.row[:4].tolist() == [0, 0, 0, 1]  # three questions share the first image


def test_cifar100_adapter_reads_class_names_from_a_config_folder(tmp_path):
    rf.cifar100(tmp_path / "c")
    out = _check(tmp_path / "c", "cifar100")
    assert "answers 5" in out and "test:" in out
    ex = real.read_examples(tmp_path / "c", real.ADAPTERS["cifar100"], "train")
    assert ex.classes == tuple(rf.CIFAR_FINE) and ex.answers[1] == ["aquarium_fish"]


def test_domainnet_adapter_looks_domains_up_in_the_features(tmp_path):
    rf.domainnet(tmp_path / "d")
    out = _check(tmp_path / "d", "domainnet")
    assert "'clipart', 'infograph'" in out
    ex = real.read_examples(tmp_path / "d", real.ADAPTERS["domainnet"], "train")
    assert ex.domain_names == tuple(rf.DOMAINS) and ex.domain[:4].tolist() == [0, 0, 1, 1]


def test_refcoco_adapter_one_example_per_expression_and_boxes(tmp_path):
    boxes = rf.refcoco(tmp_path / "r")
    out = _check(tmp_path / "r", "refcoco")
    assert "examples 32" in out and "first_box_unit_xyxy [0.1, 0.1, 0.6, 0.6]" in out
    ex = real.read_examples(tmp_path / "r", real.ADAPTERS["refcoco"], "val")
    assert ex.question[:2].tolist() == ["the thing on the left 0", "left object 0"]
    (x, y, w, h), iw, ih = boxes[1]
    unit = real.xywh_to_unit_xyxy(ex.box_xywh[2:3], np.array([[iw, ih]]))[0]
    assert unit.tolist() == pytest.approx([x / iw, y / ih, (x + w) / iw, (y + h) / ih])


def test_missing_or_malformed_dataset_is_one_line_exit_2(tmp_path, monkeypatch):
    result = runner.invoke(app, ["data", "check", str(tmp_path / "absent"), "--task", "vqav2"])
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and "lmms-lab/VQAv2" in line
    assert "huggingface-cli download --repo-type dataset lmms-lab/VQAv2 --local-dir DIR" in line
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    result = runner.invoke(app, ["data", "check", "lmms-lab/textvqa", "--task", "textvqa"])
    assert result.exit_code == 2 and "not in the hub cache" in result.output
    rf.textvqa(tmp_path / "tv")  # a TextVQA snapshot is not a RefCOCO one: the missing columns are named
    result = runner.invoke(app, ["data", "check", str(tmp_path / "tv"), "--task", "refcoco"])
    assert result.exit_code == 2 and "no 'val' parquet files" in result.output


def test_list_shows_the_real_adapters():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    for name in ("vqav2", "gqa", "textvqa", "ocrvqa", "cifar100", "domainnet", "refcoco", "refcoco_plus", "refcocog"):
        assert name in result.output
    assert "lmms-lab/VQAv2" in result.output and "fine_label" in result.output and "lmms-lab/GQA" in result.output


# ---------------------------------------------------------------------------------- smoke on all six

SMOKE = """
name = "real-fixtures"
seeds = [0]
rounds = 2
tasks = {tasks}
methods = ["fedavg-lora"]

[data]
suite = "real"
num_clients = 7
train_images = 8
test_images = 2
global_test_images = 4
tasks_per_client = 1
image_size = 32

[data.sources]
{sources}

[local]
steps = 1
batch_size = 4

[eval]
every = 0
batch_size = 64
"""


def test_smoke_run_on_every_fixture_dataset(tmp_path):
    tasks = list(rf.WRITERS)
    for task, write in rf.WRITERS.items():
        write(tmp_path / task)
    sources = "\n".join(f'{t} = "{tmp_path / t}"' for t in tasks)
    proto = tmp_path / "real.toml"
    proto.write_text(SMOKE.format(tasks=json.dumps(tasks), sources=sources))
    result = runner.invoke(app, ["run", "--preset", str(proto), "--results", str(tmp_path / "out"), "--no-plots"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for f in (tmp_path / "out" / "runs").glob("*/records.jsonl") for line in f.open()]
    last = max(r["round"] for r in records if r["kind"] == "eval")
    glob_ = {r["task"]: r for r in records if r["kind"] == "eval" and r["scope"] == "global" and r["round"] == last}
    assert set(glob_) == set(tasks)
    assert {t: glob_[t]["metric"] for t in tasks} == {
        "vqav2": "vqa_accuracy",
        "textvqa": "vqa_accuracy",
        "ocrvqa": "accuracy",
        "cifar100": "accuracy",
        "domainnet": "accuracy",
        "refcoco": "acc_iou50",
        "gqa": "accuracy",
    }
    assert all(0.0 <= r["value"] <= 1.0 for r in glob_.values())
    majority = {r["task"] for r in records if r["kind"] == "majority"}
    assert majority == set(tasks)
    board = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "acc_vqav2" in board and "acc_refcoco" in board and "acc_gqa" in board
    print(board)


def test_partition_natural_domains_and_training_only_vocabulary(tmp_path):
    from fedbench.api.data import ClientPlan, PartitionConfig

    rf.domainnet(tmp_path / "d")
    rf.vqav2(tmp_path / "v", n_images=30)
    config = PartitionConfig(
        suite="real", num_clients=4, train_images=4, test_images=2, global_test_images=10, image_size=16,
        sources={"domainnet": str(tmp_path / "d"), "vqav2": str(tmp_path / "v")},
    )  # fmt: skip
    plans = [ClientPlan(c, (("domainnet", "vqav2")[c % 2],), 4, 2, (1.0,), None, c < 2) for c in range(4)]
    table = real.build_real(plans, config, ["domainnet", "vqav2"], seed=0)
    dn = table.task == "domainnet"
    for client in (0, 2):  # the task's first and second client: one natural domain each
        domains = set(table.domain[dn & (table.client == client)].tolist())
        assert len(domains) == 1
    assert table.meta["domains"]["domainnet"] == rf.DOMAINS
    vq = table.task == "vqav2"
    train = vq & (table.split == TRAIN)
    vocab = table.meta["answers"]["vqav2"]
    assert set(vocab) == {vocab[i] for i in table.label[train]}  # every answer comes from a training row
    assert (table.label[train] >= 0).all()
    # global-test rows keep their VQA scores against the vocabulary; unseen answers score nothing
    glob = vq & (table.split == GLOBAL_TEST)
    assert table.answer_scores[glob].max() <= 1.0 and (table.answer_ids[glob] < len(vocab)).all()
    images = table.images
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 16, 16)
    cached = [np.load(f, mmap_mode="r") for f in (cache_root() / "images").glob("*.npy") if ".sizes" not in f.name]
    assert [c.shape for c in cached] == [tuple(images.shape)]  # the table's images are the on-disk cache
    assert np.array_equal(cached[0], images.numpy())


def test_a_damaged_image_cache_is_one_line_naming_the_file(tmp_path):
    """The image cache's sha256 is recorded when it is written and checked on every read: a cache
    file cut short (a full disk, a kill) stops with one line naming it, never deep in numpy."""
    from fedbench.api.data import ClientPlan, PartitionConfig
    from fedbench.utils.integrity import IntegrityError

    rf.cifar100(tmp_path / "c")
    config = PartitionConfig(
        suite="real", num_clients=2, train_images=4, test_images=2, global_test_images=4, image_size=16,
        sources={"cifar100": str(tmp_path / "c")},
    )  # fmt: skip
    plans = [ClientPlan(c, ("cifar100",), 4, 2, (1.0,), None, False) for c in range(2)]
    first = real.build_real(plans, config, ["cifar100"], seed=0).images.clone()
    assert torch.equal(real.build_real(plans, config, ["cifar100"], seed=0).images, first)  # the checked cache
    cache = next(f for f in (cache_root() / "images").glob("*.npy") if ".sizes" not in f.name)
    cache.write_bytes(cache.read_bytes()[:-100])
    with pytest.raises(IntegrityError, match=f"image cache '{cache}' is missing or damaged") as err:
        real.build_real(plans, config, ["cifar100"], seed=0)
    assert "\n" not in str(err.value) and "rebuilt on the next run" in str(err.value)


def test_a_hub_id_reads_the_hub_cache_offline(tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "datasets--lmms-lab--textvqa"
    rf.textvqa(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    out = _check("lmms-lab/textvqa", "textvqa")
    assert commit in out and "examples 24" in out


# ------------------------------------------------------------------------------------------------- GQA


def test_gqa_adapter_joins_questions_to_their_images(tmp_path):
    joins = rf.gqa(tmp_path / "g")
    out = _check(tmp_path / "g", "gqa")
    assert "examples 40" in out and "images 10" in out and "image_rows 11" in out  # 11: one image no one asks
    assert "examples 20" in out and "natural_structural 5" in out
    adapter = real.ADAPTERS["gqa"]
    for split in ("train", "testdev"):
        ex = real.read_examples(tmp_path / "g", adapter, split)
        ids = real.load_split(tmp_path / "g", adapter, split, images=True)["id"]
        assert [ids[r] for r in ex.row] == list(joins[split].values())  # each question -> its image's row
        assert ex.image_key.tolist() == list(joins[split].values())
        assert ex.row.tolist() != list(range(len(ex)))  # the image config's order is not the questions'
    assert {majority_answer(a) for a in ex.answers} == {"yes", "no", "left", "2", "table"}  # "two" -> "2"
    assert ex.natural["structural"][0] == tuple(sorted(rf.GQA_STRUCTURAL))
    assert ex.natural["detailed"][0] == tuple(f"type{k}" for k in range(7))


def test_gqa_missing_images_are_one_line_naming_them(tmp_path):
    from datasets import Features, Image, Value

    rf.gqa(tmp_path / "g")
    shard = tmp_path / "g" / "train_balanced_images" / "train-00000-of-00001.parquet"
    shard.unlink()
    result = runner.invoke(app, ["data", "check", str(tmp_path / "g"), "--task", "gqa"])
    assert result.exit_code == 2 and "\n" not in result.output.strip()
    assert "no 'train' parquet files" in result.output and "train_balanced_images/train-NNNNN" in result.output
    assert '--include "train_balanced_*" --include "testdev_balanced_*"' in result.output
    one = {"id": ["n0"], "image": [rf.solid((1, 2, 3))]}
    rel = "train_balanced_images/train-00000-of-00001.parquet"
    rf._write(tmp_path / "g", rel, one, Features(id=Value("string"), image=Image()))
    result = runner.invoke(app, ["data", "check", str(tmp_path / "g"), "--task", "gqa"])
    assert result.exit_code == 2 and "36 question(s) name an image that 'train_balanced_images' lacks" in result.output
    assert "(first: imageId 'n1')" in result.output


def test_gqa_rows_show_the_image_their_question_names(tmp_path):
    from fedbench.api.data import ClientPlan, PartitionConfig

    rf.gqa(tmp_path / "g")
    config = PartitionConfig(
        suite="real", num_clients=2, train_images=6, test_images=2, global_test_images=6, image_size=16,
        sources={"gqa": str(tmp_path / "g")},
    )  # fmt: skip
    plans = [ClientPlan(c, ("gqa",), 6, 2, (1.0,), None, False) for c in range(2)]
    table = real.build_real(plans, config, ["gqa"], seed=0)
    assert (table.split == GLOBAL_TEST).sum() == 6 and (table.split == TRAIN).any()
    for r in range(len(table)):
        image_id = table.question[r].rsplit(" ", 1)[1].rstrip("?")
        pixel = table.images[table.image_index[r], :, 0, 0].tolist()
        assert pixel == list(rf.gqa_color(image_id)), (r, table.question[r])
    vocab = table.meta["answers"]["gqa"]
    assert set(vocab) <= {"yes", "no", "left", "2", "table"} and (table.label[table.split == TRAIN] >= 0).all()


# ------------------------------------------------------------------------------------ natural splits


def test_natural_groups_by_hand():
    codes = np.array([0] * 5 + [1] * 3 + [2] * 3 + [3])
    # largest first to the lighter client: 0 (5) -> c0, 1 (3) -> c1, 2 (3) -> c1, 3 (1) -> c0
    assert [g.tolist() for g in real.natural_groups(codes, 4, 2, group=True)] == [[0, 3], [1, 2]]
    assert [g.tolist() for g in real.natural_groups(codes, 6, 4, group=False)] == [[0], [1], [2], [3]]
    three = np.array([1, 1, 3, 4])  # values 1, 3, 4 present: five clients share them in turn
    assert [g.tolist() for g in real.natural_groups(three, 5, 5, group=True)] == [[1], [3], [4], [1], [3]]


def _natural_table(tmp_path, natural_splits, tasks, n_clients, seed=0):
    from fedbench.api.data import ClientPlan, PartitionConfig

    config = PartitionConfig(
        suite="real", num_clients=n_clients, train_images=8, test_images=2, global_test_images=6, image_size=16,
        sources={t: str(tmp_path / t) for t in tasks}, natural_splits=natural_splits,
    )  # fmt: skip
    plans = [ClientPlan(c, (tasks[c % len(tasks)],), 8, 2, (1.0,), None, False) for c in range(n_clients)]
    return real.build_real(plans, config, tasks, seed=seed)


def test_vqav2_question_types_are_the_clients_data(tmp_path):
    rf.vqav2(tmp_path / "vqav2", n_images=30)
    table = _natural_table(tmp_path, {"vqav2": "question_type"}, ["vqav2"], 2)
    names = table.meta["domains"]["vqav2"]
    assert names == sorted(rf.QUESTION_TYPES) and table.meta["partitioning"] == {"vqav2": "natural:question_type"}
    held = []
    for client in (0, 1):
        rows = np.flatnonzero(table.client == client)
        assert len(rows) > 0
        for r in rows:  # the domain column is the question's own type, looked up from the data
            words = table.question[r].split()  # "question J about image I?"
            i, j = int(words[4].rstrip("?")), int(words[1])
            assert names[table.domain[r]] == rf.QUESTION_TYPES[(i * 3 + j) % 5]
        held.append(set(table.domain[rows].tolist()))
    assert held[0] and held[1] and not held[0] & held[1]  # each type (a group of them) is one client's
    assert held[0] | held[1] == set(range(5))  # five types, two clients: every type dealt to one of them
    default = _natural_table(tmp_path, {}, ["vqav2"], 2)  # without the option: answer types, as before
    assert default.meta["domains"]["vqav2"] == ["number", "other", "yes/no"] and "partitioning" not in default.meta


def test_gqa_structural_types_one_per_client(tmp_path):
    rf.gqa(tmp_path / "gqa", n_images=20)
    table = _natural_table(tmp_path, {"gqa": "structural"}, ["gqa"], 6)
    names = table.meta["domains"]["gqa"]
    assert names == sorted(rf.GQA_STRUCTURAL)
    held = [set(table.domain[(table.client == c) & (table.split == TRAIN)].tolist()) for c in range(6)]
    assert all(len(h) == 1 for h in held) and set().union(*held) == set(range(5))
    assert held[5] == held[0]  # six clients, five types: the sixth shares the first's


def test_bad_natural_split_or_partitioner_is_one_line_naming_the_choices(tmp_path):
    from fedbench.config.protocol import ProtocolError
    from fedbench.config.toml_file import from_dict

    rf.vqav2(tmp_path / "vqav2")
    bad = r"'data.natural_splits.vqav2' = 'colour' .* question_type, answer_type, none"
    with pytest.raises(ProtocolError, match=bad):
        _natural_table(tmp_path, {"vqav2": "colour"}, ["vqav2"], 2)
    with pytest.raises(ProtocolError, match="names task 'gqa', which the protocol does not run"):
        _natural_table(tmp_path, {"gqa": "structural"}, ["vqav2"], 2)
    base = {"tasks": ["vqav2"], "data": {"suite": "real", "tasks_per_client": 1}}
    for data, message in (
        ({"partitioner": "dirichlet-ish"}, "expected one of iid, dirichlet, inner_dirichlet, pathological"),
        ({"partitioner": "pathological"}, "'data.classes_per_client' = 0 is invalid with partitioner 'pathological'"),
        ({"partitioner": "dirichlet", "dirichlet_alpha": 0.0}, "'data.dirichlet_alpha' = 0.0 is invalid"),
    ):
        proto = from_dict({**base, "data": {**base["data"], **data}})
        with pytest.raises(ProtocolError, match=message) as err:
            real.check_partition_options(proto.data, ["vqav2"])
        assert "\n" not in str(err.value)
    with pytest.raises(ProtocolError, match=r"'data\.partitioner' = 'iid' is invalid: it applies to suite 'real' only"):
        from_dict({"data": {"partitioner": "iid"}})  # the embedded suite keeps its own partition
    assert {"natural_splits", "partitioner", "classes_per_client"}.isdisjoint(from_dict({}).as_dict()["data"])


# ------------------------------------------------------------------------------ flwr-datasets partitioners


def _flwr_table(tmp_path, partitioner, seed=0, sizes=(8, 8, 8, 8), **extra):
    from fedbench.api.data import ClientPlan, PartitionConfig

    rf.cifar100(tmp_path / "c", n=200)
    config = PartitionConfig(
        suite="real", num_clients=len(sizes), test_images=2, global_test_images=6, image_size=16,
        sources={"cifar100": str(tmp_path / "c")}, partitioner=partitioner, **extra,
    )  # fmt: skip
    plans = [ClientPlan(c, ("cifar100",), n - 2, 2, (1.0,), None, False) for c, n in enumerate(sizes)]
    return real.build_real(plans, config, ["cifar100"], seed=seed)


def _labels(table, client):
    return table.label[table.client == client]


def test_flwr_pathological_partitioner_gives_each_client_its_classes(tmp_path):
    table = _flwr_table(tmp_path, "pathological", classes_per_client=1)
    assert table.meta["partitioning"] == {"cifar100": "flwr:pathological"}
    held = [set(_labels(table, c).tolist()) for c in range(4)]
    assert all(len(h) == 1 for h in held) and len(set().union(*held)) == 4  # one class each, all different
    two = _flwr_table(tmp_path, "pathological", classes_per_client=2)
    held = [set(_labels(two, c).tolist()) for c in range(4)]
    assert all(1 <= len(h) <= 2 for h in held) and len(set().union(*held)) == 5


def test_flwr_dirichlet_skews_labels_and_iid_does_not(tmp_path):
    skewed = _flwr_table(tmp_path, "dirichlet", dirichlet_alpha=0.05)
    iid = _flwr_table(tmp_path, "iid")
    assert iid.meta["partitioning"] == {"cifar100": "flwr:iid"}

    def top_share(table):  # mean over clients of the share of the client's most frequent label
        return np.mean([np.bincount(_labels(table, c)).max() / len(_labels(table, c)) for c in range(4)])

    def distinct(table):  # mean over clients of the number of labels a client holds
        return np.mean([len(set(_labels(table, c).tolist())) for c in range(4)])

    assert top_share(skewed) >= 0.6 and top_share(iid) <= 0.5 and distinct(skewed) < distinct(iid) - 1
    assert all(len(_labels(iid, c)) == 8 for c in range(4))


def test_flwr_inner_dirichlet_keeps_the_plans_sizes(tmp_path):
    table = _flwr_table(tmp_path, "inner_dirichlet", sizes=(4, 8, 16, 30), dirichlet_alpha=0.5)
    assert [len(_labels(table, c)) for c in range(4)] == [4, 8, 16, 30]  # the plans' quantity skew


def test_flwr_partition_is_seeded_and_leaves_box_tasks_iid(tmp_path):
    a, b = _flwr_table(tmp_path, "dirichlet", seed=3), _flwr_table(tmp_path, "dirichlet", seed=3)
    c = _flwr_table(tmp_path, "dirichlet", seed=4)
    assert np.array_equal(a.label, b.label) and np.array_equal(a.client, b.client)
    assert torch.equal(a.images, b.images) and not np.array_equal(a.label, c.label)
    from fedbench.api.data import ClientPlan, PartitionConfig

    rf.refcoco(tmp_path / "r")
    config = PartitionConfig(
        suite="real", num_clients=2, train_images=4, test_images=2, global_test_images=4, image_size=16,
        sources={"refcoco": str(tmp_path / "r")}, partitioner="dirichlet",
    )  # fmt: skip
    plans = [ClientPlan(k, ("refcoco",), 4, 2, (1.0,), None, False) for k in range(2)]
    table = real.build_real(plans, config, ["refcoco"], seed=0)
    assert table.meta["partitioning"] == {"refcoco": "flwr:iid"}  # no labels to skew: split IID


NATURAL_SMOKE = SMOKE.replace("tasks_per_client = 1", 'tasks_per_client = 1\npartitioner = "dirichlet"')


def test_smoke_run_with_question_type_clients_and_a_flwr_partitioner(tmp_path):
    tasks = ["gqa", "vqav2", "cifar100"]
    rf.gqa(tmp_path / "gqa", n_images=20)
    rf.vqav2(tmp_path / "vqav2", n_images=20)
    rf.cifar100(tmp_path / "cifar100", n=120)
    sources = "\n".join(f'{t} = "{tmp_path / t}"' for t in tasks)
    sources += '\n\n[data.natural_splits]\ngqa = "structural"\nvqav2 = "question_type"'
    proto = tmp_path / "real.toml"
    proto.write_text(NATURAL_SMOKE.format(tasks=json.dumps(tasks), sources=sources))
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", "--preset", str(proto), "--results", str(out), "--no-plots"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for f in (out / "runs").glob("*/records.jsonl") for line in f.open()]
    last = max(r["round"] for r in records if r["kind"] == "eval")
    evals = {r["task"]: r for r in records if r["kind"] == "eval" and r["scope"] == "global" and r["round"] == last}
    assert set(evals) == set(tasks) and evals["gqa"]["metric"] == "accuracy"
    assert all(0.0 <= r["value"] <= 1.0 for r in evals.values())
    saved = (out / "protocol.toml").read_text()
    assert 'partitioner = "dirichlet"' in saved and 'gqa = "structural"' in saved
