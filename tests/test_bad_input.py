"""Results you can trust (issue 18): bad input of every class ends with one line naming it, exit 2,
before anything is written; never a traceback, never a run that "completes" on nonsense.

- Non-finite numbers (``nan``, ``inf``, ``-inf``, ``1e400``) in EVERY float protocol field and EVERY
  float option of EVERY registered method, all found by their annotations (a new one is covered
  without touching this file).
- Malformed presets, duplicate tasks and seeds, one configuration under two spellings, repeated
  option keys.
- ``data check`` on broken shards, empty splits, labels outside the class names, undecodable images,
  and a missing local path that looks like a hub id.
- OSErrors: only a failed write says "a write failed ... rerun to resume".
"""

from __future__ import annotations

import dataclasses
import errno
import math
import re
import typing
from pathlib import Path

import pytest
import real_fixtures as rf
from typer.testing import CliRunner

from fedbench.api.method import create_method
from fedbench.api.options import OptionError, build_config, parse_method_spec
from fedbench.api.registry import METHODS
from fedbench.cli import app
from fedbench.config import protocol as protocol_rules
from fedbench.config import toml_file
from fedbench.config.protocol import Protocol, ProtocolError

runner = CliRunner()
BAD = ("nan", "inf", "-inf", "1e400")  # 1e400 overflows to inf when read


def _one_line_exit_2(args: list[str], needle: str, env: dict | None = None) -> str:
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 2, (result.output, result.exception)
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    assert needle in errors[0], errors[0]
    return errors[0]


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert text and "\n" not in text, text
    return text


# ------------------------------------------------------------------------------ protocol floats


def _protocol_float_fields(cls: type = Protocol, prefix: str = "") -> list[str]:
    """Every float field of the protocol, by annotation (nested tables walked into), plus the fields
    typed Any whose default is a float or that take a fraction (``eval.clients``)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _protocol_float_fields(tp, f"{prefix}{f.name}.")
        elif tp is float or f"{prefix}{f.name}" == "eval.clients":
            out.append(f"{prefix}{f.name}")
    return out


PROTOCOL_FLOATS = _protocol_float_fields()


def _protocol_toml(path: str, literal: str) -> str:
    section, _, leaf = path.rpartition(".")
    return f"[{section}]\n{leaf} = {literal}\n"


@pytest.mark.parametrize("path", PROTOCOL_FLOATS)
def test_every_float_protocol_field_refuses_non_finite_values(tmp_path, path):
    section, _, leaf = path.rpartition(".")
    default = getattr(getattr(Protocol(), section), leaf)
    fine = tmp_path / "fine.toml"  # the same file with a finite value loads: the field is real
    fine.write_text(_protocol_toml(path, "0.5" if isinstance(default, str) else repr(float(default))))
    toml_file.load(str(fine))
    for literal in BAD:
        bad = tmp_path / "bad.toml"
        bad.write_text(_protocol_toml(path, literal))
        with pytest.raises(ProtocolError) as info:
            toml_file.load(str(bad))
        shown = "nan" if literal == "nan" else literal.replace("1e400", "inf")
        message = _one_line(info.value)
        assert message.startswith(f"protocol field '{path}' = {shown} is invalid: not a finite number; expected "), (
            message
        )


def test_a_non_finite_protocol_field_is_one_line_exit_2_before_any_write(tmp_path):
    # the discovery behind the parametrised test above finds the fields (it is not vacuous)
    assert {"local.lr", "local.weight_decay", "data.dirichlet_alpha", "data.quantity_skew"} <= set(PROTOCOL_FLOATS)
    assert {"clients.sample_fraction", "faults.deadline", "resources.num_cpus", "eval.clients"} <= set(PROTOCOL_FLOATS)
    for path, literal in (("local.lr", "inf"), ("data.dirichlet_alpha", "1e400"), ("data.quantity_skew", "nan")):
        preset = tmp_path / "p.toml"
        preset.write_text(_protocol_toml(path, literal))
        results = tmp_path / "results"
        line = _one_line_exit_2(["run", "--preset", str(preset), "--results", str(results)], f"'{path}' = ")
        assert "is invalid: not a finite number; expected a number " in line
        assert not results.exists()


def test_a_non_finite_sweep_value_is_refused(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text(
        'methods = ["fedavg-lora"]\n[sweep]\nfield = "local.weight_decay"\nvalues = [0.0, inf]\n'
        'reference = "fedavg-lora"\n'
    )
    with pytest.raises(ProtocolError) as info:
        toml_file.load(str(preset))
    assert _one_line(info.value) == (
        "protocol field 'sweep.values[1]' = inf is invalid: not a finite number; 'local.weight_decay' expects "
        "a number >= 0"
    )


# -------------------------------------------------------------------------------- method floats


def _float_options() -> list[tuple[str, str]]:
    """(method, option) of every float option of every registered method, by annotation."""
    out = []
    for name in METHODS.names():
        options = METHODS.get(name).Options
        hints = typing.get_type_hints(options)
        out += [(name, f.name) for f in dataclasses.fields(options) if hints[f.name] is float]
    return out


FLOAT_OPTIONS = _float_options()


def test_a_non_finite_method_option_is_one_line_exit_2_before_any_write(tmp_path):
    # the discovery behind the parametrised test above finds the options (it is not vacuous)
    expected = {
        ("fedavg-lora", "alpha"),
        ("fedavg-lora", "dropout"),
        ("feddpa", "local_weight"),
        ("feddpa", "max_weight"),
        ("fedmix", "sparsity_weight"),
        ("pilot-ctmoa", "orth_weight"),
        ("pilot-ctmoa", "router_lr_scale"),
        ("mmrouter-moa", "z_weight"),
        ("mmrouter-moa", "balance_weight"),
    }
    assert expected <= set(FLOAT_OPTIONS)
    results = tmp_path / "results"
    line = _one_line_exit_2(
        ["run", "--methods", "pilot-ctmoa:orth_weight=nan", "--results", str(results)],
        "option 'orth_weight' of method 'pilot-ctmoa' = 'nan' is invalid: not a finite number; expected a number >= 0",
    )
    assert line
    preset = tmp_path / "p.toml"
    preset.write_text('methods = [{name = "mmrouter-moa", options = {router_lr_scale = 1e400}}]\n')
    _one_line_exit_2(
        ["run", "--preset", str(preset), "--results", str(results)],
        "option 'router_lr_scale' of method 'mmrouter-moa' = inf is invalid: not a finite number; "
        "expected a number > 0",
    )
    assert not results.exists()


@pytest.mark.parametrize(("name", "key"), FLOAT_OPTIONS)
def test_every_float_option_of_every_method_refuses_non_finite_values(name, key):
    """As typed on the command line (strings) and as read from TOML (floats): one line naming the option,
    the value and the option's valid range, before the method's own checks (``v > 0`` holds for inf)."""
    for literal in BAD:
        for given in (literal, float(literal)):
            with pytest.raises(OptionError) as info:
                create_method(name, {key: given})
            message = _one_line(info.value)
            head = f"option '{key}' of method '{name}' = {given!r} is invalid: not a finite number; expected a number "
            assert message.startswith(head), message
            assert re.search(r"expected a number (>=? -?\d|in [\[(])", message), message  # the range is named


@dataclasses.dataclass(frozen=True)
class _NewOptions:
    """A plug-in's options with a float and no declared range: still checked finite."""

    weight: float = 1.0
    widths: tuple[float, ...] = (0.5,)


def test_a_new_float_option_is_checked_finite_for_free():
    assert build_config(_NewOptions, {"weight": "0.25", "widths": "0.5+2"}, "method 'new'").widths == (0.5, 2.0)
    for literal in BAD:
        with pytest.raises(OptionError) as info:
            build_config(_NewOptions, {"weight": literal}, "method 'new'")
        assert _one_line(info.value) == (
            f"option 'weight' of method 'new' = '{literal}' is invalid: not a finite number; expected a finite number"
        )
        with pytest.raises(OptionError, match=r"option 'widths' of method 'new' = .* not a finite number"):
            build_config(_NewOptions, {"widths": f"0.5+{literal}"}, "method 'new'")


def test_options_built_directly_are_checked_finite_too():
    from fedbench.adapters.task_experts import TaskExpertOptions
    from fedbench.methods.feddpa import FedDPAOptions
    from fedbench.methods.fedmix import FedMixOptions

    for cls, key in (
        (FedMixOptions, "sparsity_weight"),
        (TaskExpertOptions, "router_lr_scale"),
        (FedDPAOptions, "max_weight"),
    ):
        for value in (math.inf, math.nan):
            with pytest.raises(ValueError, match=f"{key} = {value!r} is invalid: not a finite number; expected"):
                cls(**{key: value})


# ------------------------------------------------------------------------------ malformed presets


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (bytes(range(256)), "is not UTF-8 text (byte 128: invalid start byte): a protocol is a TOML file"),
        (
            b'methods = [{name = "fedavg-lora", options = 3}]\n',
            "'methods[0].options' must be a table of option = value",
        ),
        (b'methods = [{name = "fedavg-lora", options = [1]}]\n', "'methods[0].options' must be a table of option"),
        (b'[[methods]]\nname = "fedavg-lora"\noptions = "rank=4"\n', "'methods[0].options' must be a table of option"),
        (
            b'tasks = ["vqav2"]\n[data]\nsuite = "real"\ntasks_per_client = 1\nsources = {vqav2 = 3}\n',
            "protocol field 'data.sources.vqav2' must be str, got 3",
        ),
    ],
    ids=["binary", "options-int", "options-list", "options-string", "sources-int"],
)
def test_malformed_presets_are_one_line_exit_2(tmp_path, body, needle):
    preset = tmp_path / "p.toml"
    preset.write_bytes(body)
    results = tmp_path / "results"
    _one_line_exit_2(["run", "--preset", str(preset), "--results", str(results)], needle)
    assert not results.exists()


def test_a_directory_given_as_preset_is_said_to_be_one(tmp_path):
    (tmp_path / "p.toml").mkdir()
    _one_line_exit_2(["run", "--preset", str(tmp_path / "p.toml")], "is a directory, not a TOML file")


# ----------------------------------------------------------------------------------- duplicates


def test_duplicate_tasks_and_seeds_are_one_line_exit_2(tmp_path):
    results = tmp_path / "results"
    _one_line_exit_2(
        ["run", "--tasks", "vqa,vqa", "--results", str(results)], "--tasks 'vqa,vqa' names the task 'vqa' twice"
    )
    _one_line_exit_2(["run", "--seeds", "0,1,0", "--results", str(results)], "--seeds '0,1,0' names 0 twice")
    preset = tmp_path / "p.toml"
    preset.write_text('tasks = ["vqa", "grounding", "vqa"]\n')
    _one_line_exit_2(
        ["run", "--preset", str(preset), "--results", str(results)],
        "protocol field 'tasks' lists the task 'vqa' twice: list each task once (tasks: vqa, grounding, vqa)",
    )
    preset.write_text("seeds = [0, 0]\n")
    _one_line_exit_2(["run", "--preset", str(preset), "--results", str(results)], "'seeds' lists the seed 0 twice")
    assert not results.exists()


@pytest.mark.parametrize(
    ("methods", "needle"),
    [
        (
            "fedavg-lora,fedavg-lora:rank=8",
            "method rows 'fedavg-lora' and 'fedavg-lora[rank=8]' are one configuration ('fedavg-lora': ",
        ),
        (
            "fedavg-lora:rank=4:alpha=16,fedavg-lora:alpha=16.0:rank=4",
            "method rows 'fedavg-lora[alpha=16,rank=4]' and 'fedavg-lora[alpha=16.0,rank=4]' are one configuration "
            "('fedavg-lora[rank=4]': ",
        ),
        (
            "pilot-ctmoa:orth_weight=0.1:top_k=2,pilot-ctmoa:top_k=2",
            "method rows 'pilot-ctmoa[orth_weight=0.1,top_k=2]' and 'pilot-ctmoa[top_k=2]' are one configuration",
        ),
    ],
    ids=["default-spelled-out", "float-spelling", "one-default-of-two"],
)
def test_one_configuration_under_two_spellings_is_refused(tmp_path, methods, needle):
    results = tmp_path / "results"
    line = _one_line_exit_2(["run", "--methods", methods, "--results", str(results)], needle)
    assert line.endswith("list it once")
    assert not results.exists()


def test_one_configuration_twice_in_a_protocol_file_is_refused_and_distinct_rows_pass(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text(
        'methods = [{name = "fedavg-lora", options = {rank = 4, dropout = 0.05}}, '
        '{name = "fedavg-lora", options = {rank = "4"}}]\n'
    )
    _one_line_exit_2(
        ["run", "--preset", str(preset)],
        "method rows 'fedavg-lora[dropout=0.05,rank=4]' and 'fedavg-lora[rank=4]' are one configuration",
    )
    preset.write_text('methods = ["fedavg-lora", {name = "fedavg-lora", options = {rank = 4}}]\n')
    protocol_rules.check_method_rows(toml_file.load(str(preset)))  # two configurations: accepted


def test_a_repeated_option_key_is_refused():
    with pytest.raises(OptionError) as info:
        parse_method_spec("fedavg-lora:rank=4:rank=8")
    assert _one_line(info.value) == (
        "method option 'rank' is given twice in 'fedavg-lora:rank=4:rank=8' (rank=4, rank=8): give each option once"
    )
    for command in (
        ["run", "--methods", "fedavg-lora:rank=4: rank =4"],
        ["describe", "fedmix:bottleneck=8:bottleneck=16"],
    ):
        _one_line_exit_2(command, "is given twice in")


# ------------------------------------------------------------------------------------- OSErrors


def test_only_a_failed_write_claims_a_write_and_a_resume(monkeypatch, tmp_path):
    """An OSError that reaches the command names its file and reason; "rerun ... to resume" only for
    what only a write gives (ENOSPC and its kin)."""
    import fedbench.cli.protocol_flags as cli

    cases = [
        (
            OSError(errno.EIO, "Input/output error", "/data/protocol.toml"),
            "cannot use '/data/protocol.toml': Input/output error",
        ),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/x"), "cannot use '/data/x': Is a directory"),
        (OSError("cannot identify image file"), "OSError: cannot identify image file"),
        (
            PermissionError(errno.EACCES, "Permission denied", "/data/in.toml"),
            "cannot use '/data/in.toml': Permission denied",
        ),
    ]
    for err, needle in cases:
        monkeypatch.setattr(cli.toml_file, "load", lambda *_a, err=err: (_ for _ in ()).throw(err))
        line = _one_line_exit_2(["run", "--results", str(tmp_path / "r")], needle)
        assert "write" not in line and "resume" not in line, line
    full = OSError(errno.ENOSPC, "No space left on device", "/r/records.jsonl")
    monkeypatch.setattr(cli.toml_file, "load", lambda *_a: (_ for _ in ()).throw(full))
    _one_line_exit_2(
        ["run", "--results", str(tmp_path / "r")],
        "cannot write '/r/records.jsonl': No space left on device; completed rounds are checkpointed: rerun",
    )


def test_a_feature_cache_that_is_a_file_is_said_to_be_one(tmp_path):
    cache = tmp_path / "cache"
    cache.write_text("not a directory")
    line = _one_line_exit_2(
        ["run", "--results", str(tmp_path / "r"), "--rounds", "1"],
        f"feature cache '{cache}' ($FEDBENCH_CACHE) is a file, not a directory",
        env={"FEDBENCH_CACHE": str(cache)},
    )
    assert "resume" not in line


# ------------------------------------------------------------------------------ local path or hub id


def test_hub_id_or_local_path_rule(tmp_path, monkeypatch):
    from fedbench.utils.checks import is_local_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "file").write_text("x")
    hub = ["lmms-lab/VQAv2", "uoft-cs/cifar100", "a.b/c_d-e"]
    local = ["data/VQAv2", "./x/y", "x/y/z", "/abs/path", "~/x", "file", "plain", "-x/y", "x/", "x/.y"]
    assert [is_local_path(s) for s in hub] == [False] * len(hub)
    assert [is_local_path(s) for s in local] == [True] * len(local)


def test_a_missing_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # data/VQAv2 is a path under it, not the hub's user "data"
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    for source in ("data/VQAv2", "./VQAv2/data", "snapshots/lmms-lab/VQAv2"):
        line = _one_line_exit_2(
            ["data", "check", source, "--task", "vqav2"], f"'{source}' does not exist (a local path)", env=env
        )
        assert "hub" not in line.partition("; get it with")[0]
    (tmp_path / "shard.parquet").write_text("x")
    _one_line_exit_2(
        ["data", "check", "shard.parquet", "--task", "vqav2"], "is a file, not a snapshot directory", env=env
    )


def test_a_missing_local_backbone_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from fedbench.api.backbone import BackboneUnavailable, create_backbone

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(BackboneUnavailable) as info:
        create_backbone("hf:models/clip-vit")
    assert _one_line(info.value) == (
        "backbone 'hf:models/clip-vit' is not on this machine: local path 'models/clip-vit' does not exist (a hub id "
        "is OWNER/NAME, read from the hub cache)"
    )


# ---------------------------------------------------------------------------------- data check


def _shard(root: Path, split: str = "validation") -> Path:
    return root / "data" / f"{split}-00000-of-00001.parquet"


def test_data_check_on_a_text_file_named_like_a_shard(tmp_path):
    _shard(tmp_path).parent.mkdir(parents=True)
    _shard(tmp_path).write_text("question,answer\nwhat?,yes\n")
    _one_line_exit_2(
        ["data", "check", str(tmp_path), "--task", "vqav2"],
        f"dataset 'lmms-lab/VQAv2' split 'validation': '{_shard(tmp_path)}' is not a readable parquet file (",
    )


def test_data_check_on_an_empty_split(tmp_path):
    import pyarrow.parquet as pq

    rf.vqav2(tmp_path, n_images=1)
    pq.write_table(pq.read_table(_shard(tmp_path)).slice(0, 0), _shard(tmp_path))  # the schema, no rows
    _one_line_exit_2(
        ["data", "check", str(tmp_path), "--task", "vqav2"],
        f"dataset 'lmms-lab/VQAv2' split 'validation' ({tmp_path}) has 0 rows "
        "(data/validation-00000-of-00001.parquet): task 'vqav2' needs examples",
    )


def _rewrite(path: Path, column: str, change) -> None:
    """The parquet at ``path`` with ``column`` replaced by ``change(values)``, its HF features kept."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    values = change(table.column(column).to_pylist())
    index = table.schema.get_field_index(column)
    table = table.set_column(index, table.schema.field(index), pa.array(values, table.schema.field(index).type))
    pq.write_table(table, path)


def test_data_check_on_a_label_outside_the_class_names(tmp_path):
    rf.cifar100(tmp_path)
    shard = tmp_path / "cifar100" / "train-00000-of-00001.parquet"
    _rewrite(shard, "fine_label", lambda v: [*v[:3], len(rf.CIFAR_FINE) + 7, *v[4:]])
    _one_line_exit_2(
        ["data", "check", str(tmp_path), "--task", "cifar100"],
        f"dataset 'uoft-cs/cifar100' split 'train' ({tmp_path}): column 'fine_label' row 3: "
        f"label {len(rf.CIFAR_FINE) + 7} is outside its {len(rf.CIFAR_FINE)} class names "
        f"(expected an integer in [0, {len(rf.CIFAR_FINE) - 1}])",
    )


def test_data_check_on_an_image_that_is_not_an_image(tmp_path):
    rf.vqav2(tmp_path)
    _rewrite(_shard(tmp_path), "image", lambda v: [{"bytes": b"GIF89a but not really", "path": "x.gif"}, *v[1:]])
    _one_line_exit_2(
        ["data", "check", str(tmp_path), "--task", "vqav2"],
        "dataset 'lmms-lab/VQAv2' split 'validation' row 0, column 'image': 21 bytes do not decode as an image",
    )
