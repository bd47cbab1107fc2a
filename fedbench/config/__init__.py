"""The protocol: frozen dataclasses and their rules (:mod:`~fedbench.config.protocol`,
:mod:`~fedbench.config.sections`), typed values from TOML (:mod:`~fedbench.config.coerce`), TOML in
and out (:mod:`~fedbench.config.toml_file`), and the presets shipped with fedbench
(``config/presets/*.toml``)."""

from fedbench.utils.lazy import lazy_exports

_API = {
    "Protocol": "protocol",
    "MethodEntry": "protocol",
    "ProtocolError": "protocol",
    "SweepConfig": "protocol",
    "load": "toml_file",
    "from_dict": "toml_file",
    "to_toml": "toml_file",
    "preset_names": "toml_file",
    "validate": "protocol",
    "check_method_rows": "protocol",
    "canonical_label": "protocol",
}

__all__ = sorted(_API)
__getattr__, __dir__ = lazy_exports(__name__, _API)
