"""The protocol: frozen dataclasses validated on load, read from and written to TOML, and the
presets shipped with fedbench (``config/presets/*.toml``)."""

from fedbench.utils.lazy import lazy_exports

_API = {
    "Protocol": "protocol",
    "MethodEntry": "protocol",
    "ProtocolError": "protocol",
    "load": "protocol",
    "from_dict": "protocol",
    "to_toml": "protocol",
    "preset_names": "protocol",
    "validate": "protocol",
    "canonical_label": "protocol",
}

__all__ = sorted(_API)
__getattr__, __dir__ = lazy_exports(__name__, _API)
