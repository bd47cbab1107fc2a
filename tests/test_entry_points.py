"""Third-party plug-ins arrive through Python entry points, without touching the repo, and are
checked like the in-repo ones."""

from importlib.metadata import EntryPoint

import pytest

from fedbench.api import registry
from fedbench.api.method import Method, create_method
from fedbench.api.options import OptionError
from fedbench.api.task import TaskSpec


class ThirdPartyMethod(Method):
    """A method shipped by another package."""


class NamedByItsEntryPoint(Method):
    """A method shipped by another package, named only by its entry point."""


class ThirdPartyLoRA(registry.METHODS.get("fedavg-lora")):
    """Another package's variant of a registered method (whose class carries the parent's name)."""


class NotAMethod:
    """A class that forgot to subclass Method."""


THIRD_PARTY_TASK = TaskSpec("third", family="vqa", suite="scenes", answers=("yes", "no"))


def _entry_points(monkeypatch, group, value, name="third-party"):
    ep = EntryPoint(name=name, value=f"{__name__}:{value}", group=group)
    monkeypatch.setattr(registry, "entry_points", lambda group=None: [ep] if group == ep.group else [])


def test_entry_point_method_is_listed_and_loaded(monkeypatch):
    _entry_points(monkeypatch, "fedbench.methods", "ThirdPartyMethod")
    reg = registry.Registry("method", base=Method, entry_point_group="fedbench.methods")
    assert reg.names() == ["third-party"]
    assert reg.get("third-party") is ThirdPartyMethod


@pytest.mark.parametrize(
    ("value", "name", "parent"),
    [("NamedByItsEntryPoint", "third-party", ""), ("ThirdPartyLoRA", "lora-v2", "fedavg-lora")],
)
def test_entry_point_method_carries_its_registered_name(monkeypatch, value, name, parent):
    """In the real method registry, next to the in-repo methods: the entry point's name, not the
    parent class's (or ""), in option errors and ``describe``; the parent keeps its own."""
    cls = globals()[value]
    monkeypatch.setattr(cls, "name", cls.name)  # restored after the test
    assert cls.name == parent
    registry.METHODS.names()  # the in-repo methods, discovered before the entry point arrives
    monkeypatch.setattr(registry.METHODS, "_items", dict(registry.METHODS._items))
    monkeypatch.setattr(registry.METHODS, "_loaded", False)
    _entry_points(monkeypatch, "fedbench.methods", value, name=name)
    assert registry.METHODS.get(name) is cls and cls.name == name
    assert create_method(name).describe()["method"] == name
    with pytest.raises(OptionError, match=f"^unknown option 'nope' for method '{name}'"):
        create_method(name, {"nope": 1})
    if parent:
        assert registry.METHODS.get(parent).name == parent


def test_entry_point_task_instance_is_loaded(monkeypatch):
    _entry_points(monkeypatch, "fedbench.tasks", "THIRD_PARTY_TASK", name="third")
    reg = registry.Registry(
        "task", base="fedbench.api.task:TaskSpec", instance=True, entry_point_group="fedbench.tasks"
    )
    assert reg.get("third") is THIRD_PARTY_TASK


@pytest.mark.parametrize(
    ("group", "value", "base", "instance", "needle"),
    [
        (
            "fedbench.methods",
            "NotAMethod",
            "fedbench.api.method:Method",
            False,
            f"method 'third-party' (entry point '{__name__}:NotAMethod' in group 'fedbench.methods') must be "
            f"a subclass of fedbench.api.method.Method; got class {__name__}.NotAMethod",
        ),
        (
            "fedbench.tasks",
            "ThirdPartyMethod",
            "fedbench.api.task:TaskSpec",
            True,
            "task 'third-party' (entry point",
        ),
        ("fedbench.suites", "THIRD_PARTY_TASK", None, False, "suite 'third-party' (entry point"),
    ],
)
def test_entry_point_of_the_wrong_kind_is_refused_in_one_line(monkeypatch, group, value, base, instance, needle):
    _entry_points(monkeypatch, group, value)
    reg = registry.Registry(group.split(".")[1][:-1], base=base, instance=instance, entry_point_group=group)
    with pytest.raises(TypeError) as info:
        reg.names()
    assert str(info.value).startswith(needle) and "\n" not in str(info.value)
