"""The protocol a command runs: a preset or TOML file, with the command line's overrides."""

from __future__ import annotations

import dataclasses
from typing import Any

from fedbench.api.options import parse_method_spec
from fedbench.api.registry import BACKBONES, METHODS, SUITES, TASKS
from fedbench.cli.errors import UsageError
from fedbench.config import protocol as protocol_rules
from fedbench.config import toml_file
from fedbench.config.protocol import MethodEntry, Protocol


def split_list(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def int_list(value: str, what: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in split_list(value))
    except ValueError:
        raise UsageError(f"{what} '{value}' must be comma-separated integers, e.g. 0,1,2") from None
    if not out or min(out) < 0:
        raise UsageError(f"{what} '{value}' must list integers >= 0")
    twice = next((v for i, v in enumerate(out) if v in out[:i]), None)
    if twice is not None:
        raise UsageError(f"{what} '{value}' names {twice} twice: name each once")
    return out


def resolve_protocol(
    preset: str, methods: str | None, tasks: str | None, seeds: str | None, rounds: int | None
) -> Protocol:
    """Load a preset or TOML and apply command-line overrides; every name is validated here."""
    proto = toml_file.load(preset)
    changes: dict[str, Any] = {}
    if methods is not None:
        if not split_list(methods):
            raise UsageError(f"--methods '{methods}' names no method. Available: {', '.join(METHODS.names())}")
        entries = []
        for spec in split_list(methods):
            name, options = parse_method_spec(spec)
            entries.append(MethodEntry(name, options))
        changes["methods"] = tuple(entries)
    if tasks is not None:
        if not split_list(tasks):
            raise UsageError(f"--tasks '{tasks}' names no task. Available: {', '.join(TASKS.names())}")
        changes["tasks"] = tuple(split_list(tasks))
        twice = next((t for i, t in enumerate(changes["tasks"]) if t in changes["tasks"][:i]), None)
        if twice is not None:
            raise UsageError(f"--tasks '{tasks}' names the task '{twice}' twice: name each task once")
        if proto.data.tasks_per_client > len(changes["tasks"]):  # fewer tasks than the preset's per client
            changes["data"] = dataclasses.replace(proto.data, tasks_per_client=len(changes["tasks"]))
    if seeds is not None:
        if not split_list(seeds):
            raise UsageError(f"--seeds '{seeds}' names no seed: give comma-separated integers >= 0, e.g. 0,1,2")
        changes["seeds"] = int_list(seeds, "--seeds")
        if proto.sweep is not None and proto.sweep.seeds is not None:  # every value runs --seeds
            changes["sweep"] = dataclasses.replace(proto.sweep, seeds=None)
    if rounds is not None:
        if rounds < 1:
            raise UsageError(f"--rounds {rounds} is invalid: expected an integer >= 1")
        changes["rounds"] = rounds
    if changes:
        proto = proto.replace(**changes)
    for task in proto.tasks:
        TASKS.get(task)
    for checked in [variant for _, variant in proto.variants()] or [proto]:  # a sweep may vary these
        SUITES.get(checked.data.suite)
        BACKBONES.get(checked.backbone.name.partition(":")[0])
    # unknown method or option, or one configuration under two spellings, fails before any write
    protocol_rules.check_method_rows(proto)
    return proto
