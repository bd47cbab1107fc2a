import pytest

from fedbench.method import Method, register_method
from fedbench.registry import METHODS, TASKS, Registry, UnknownNameError


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
    with pytest.raises(TypeError, match="must subclass"):
        reg.register("b", int)
    with pytest.raises(TypeError):
        register_method("not-a-method")(int)
