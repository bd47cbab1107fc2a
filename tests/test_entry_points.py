"""Third-party plug-ins arrive through Python entry points, without touching the repo."""

from importlib.metadata import EntryPoint

from fedbench import registry
from fedbench.method import Method


class ThirdPartyMethod(Method):
    """A method shipped by another package."""


def test_entry_point_method_is_listed_and_loaded(monkeypatch):
    ep = EntryPoint(name="third-party", value=f"{__name__}:ThirdPartyMethod", group="fedbench.methods")

    def fake_entry_points(group=None):
        return [ep] if group == "fedbench.methods" else []

    monkeypatch.setattr(registry, "entry_points", fake_entry_points)
    reg = registry.Registry("method", base=Method, entry_point_group="fedbench.methods")
    assert reg.names() == ["third-party"]
    assert reg.get("third-party") is ThirdPartyMethod
