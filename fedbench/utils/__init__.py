"""Small shared tools with no fedbench dependency above them: seeding, precision, integrity,
timing, FLOP counting, sealed records, input checks and lazy package namespaces."""

from fedbench.utils.lazy import lazy_exports

_API = {
    "derive_seed": "seeding",
    "sample_clients": "seeding",
    "participations": "seeding",
    "autocast": "precision",
    "amp_dtype": "precision",
    "device_index": "precision",
    "IntegrityError": "integrity",
    "sha256_file": "integrity",
    "sha256_bytes": "integrity",
    "read_checked": "integrity",
    "write_atomic": "integrity",
    "ComputeTimer": "timing",
    "device_label": "timing",
    "FlopMeter": "flops",
    "active_meter": "flops",
    "append_records": "records",
    "read_records": "records",
    "read_jsonl": "records",
    "scan_records": "records",
    "DirectoryLock": "records",
    "Bound": "checks",
    "bounded": "checks",
    "check_bounds": "checks",
    "is_finite": "checks",
    "is_local_path": "checks",
    "lazy_exports": "lazy",
}

__all__ = sorted(_API)
__getattr__, __dir__ = lazy_exports(__name__, _API)
