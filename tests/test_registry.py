import pytest

from fedbench.api.method import Method, register_method
from fedbench.api.registry import BACKBONES, METHODS, SUITES, TASKS, Registry, UnknownNameError
from fedbench.api.task import TaskSpec


def test_unknown_name_suggests_and_lists_choices():
    with pytest.raises(UnknownNameError) as info:
        METHODS.get("fedavg-lroa")
    msg = str(info.value)
    assert "Unknown method 'fedavg-lroa'" in msg
    assert "Did you mean: fedavg-lora?" in msg
    assert "ffa-lora" in msg and "fedsa-lora" in msg


def test_discovery_finds_in_repo_plugins():
    assert {"fedavg-lora", "ffa-lora", "fedsa-lora"} <= set(METHODS.names())
    assert {"classification", "vqa", "grounding", "ocr_vqa"} <= set(TASKS.names())


def test_duplicate_name_and_wrong_base_are_refused():
    reg: Registry = Registry("thing", base=Method)
    reg.register("a", Method)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", type("Other", (Method,), {}))
    with pytest.raises(TypeError, match="must be a subclass"):
        reg.register("b", int)
    with pytest.raises(TypeError):
        register_method("not-a-method")(int)


class NotAMethod:
    """Has a method's look, not its base."""

    def tag(self, name):
        return "shared"


@pytest.mark.parametrize(
    ("registry", "obj", "needle"),
    [
        (
            METHODS,
            NotAMethod,
            "method 'bad' must be a subclass of fedbench.api.method.Method; got class test_registry.NotAMethod",
        ),
        (METHODS, Method(), "method 'bad' must be a subclass of fedbench.api.method.Method; got Method <"),
        (
            TASKS,
            TaskSpec,
            "task 'bad' must be an instance of fedbench.api.task.TaskSpec; got class fedbench.api.task.TaskSpec",
        ),
        (TASKS, {"family": "vqa"}, "task 'bad' must be an instance of fedbench.api.task.TaskSpec; got dict {'family'"),
        (SUITES, "scenes", "suite 'bad' must be a callable; got str 'scenes'"),
        (BACKBONES, None, "backbone 'bad' must be a callable; got NoneType None"),
    ],
)
def test_each_registry_checks_what_it_holds_in_one_line(registry, obj, needle):
    with pytest.raises(TypeError) as info:
        registry.register("bad", obj)
    assert str(info.value).startswith(needle) and "\n" not in str(info.value)
    assert "bad" not in registry


def test_the_in_repo_plugins_pass_their_checks():
    for registry in (METHODS, TASKS, SUITES, BACKBONES):
        for name in registry.names():
            registry.check(name, registry.get(name))
