import dataclasses

import pytest

from fedbench.config import toml_file
from fedbench.config.protocol import ProtocolError


@pytest.mark.parametrize("name", toml_file.preset_names())
def test_presets_load_and_validate(name):
    """Every committed preset (the vlm ones too: their methods, [vlm] options and sweeps validate)."""
    proto = toml_file.load(name)
    assert proto.name == name
    assert len(proto.hash) == 12


def test_hash_ignores_name_but_not_numbers():
    p = toml_file.load("smoke")
    assert p.replace(name="other").hash == p.hash
    assert p.replace(seeds=(5, 6)).hash == p.hash  # each record carries its own seed
    assert p.replace(rounds=p.rounds + 1).hash != p.hash
    assert p.replace(local=dataclasses.replace(p.local, lr=0.5)).hash != p.hash


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("rounds = 0", "'rounds' = 0 is invalid: expected an integer >= 1"),
        ("roundz = 3", "unknown protocol field 'roundz'. Valid fields:"),
        ("[data]\nocr_fraction = 1.5", "'data.ocr_fraction' = 1.5 is invalid: expected a number in [0, 1]"),
        ("[data]\nnum_clients = 'four'", "'data.num_clients' must be int"),
        ("[local]\noptimizer = 'sgd'", "'local.optimizer' = 'sgd' is invalid: the field is retired"),
        ("[local]\nmomentum = 0.9", "unknown protocol field 'local.momentum'. Valid fields: local.steps"),
        ("rounds = [", "malformed TOML"),
        ("methods = [{name = 'fedavg-lora', colour = 1}]", "unknown protocol field 'methods[0].colour'"),
    ],
)
def test_bad_fields_are_named(tmp_path, toml, needle):
    path = tmp_path / "p.toml"
    path.write_text(toml)
    with pytest.raises(ProtocolError) as info:
        toml_file.load(str(path))
    assert needle in str(info.value)


def test_unknown_preset_lists_choices():
    with pytest.raises(
        ProtocolError,
        match=r"Unknown preset 'smok'\. Available: default, paper, parity, routing, routing-frozen, smoke",
    ):
        toml_file.load("smok")


def test_method_options_make_labels():
    proto = toml_file.from_dict({"methods": ["fedavg-lora", {"name": "ffa-lora", "options": {"rank": 4}}]})
    assert [m.label for m in proto.methods] == ["fedavg-lora", "ffa-lora[rank=4]"]


def test_retired_optimizer_field_of_older_protocol_files_is_dropped(tmp_path):
    """``local.optimizer`` was validated but never read (AdamW is the one optimiser): it is gone, and
    the protocol.toml of results written before (``optimizer = "adamw"``) still loads, to the same
    protocol as without the line."""
    path = tmp_path / "p.toml"
    path.write_text('rounds = 3\n[local]\nsteps = 4\noptimizer = "adamw"\n')
    old = toml_file.load(str(path))
    path.write_text("rounds = 3\n[local]\nsteps = 4\n")
    assert old == toml_file.load(str(path)) and old.local.steps == 4
    assert "optimizer" not in dataclasses.asdict(old.local)
