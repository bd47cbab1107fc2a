"""Where a number came from: git commit, library versions and a digest of the code, recorded with
every run.

The **code digest** (:func:`code_digest`) names the source that produced a run: every ``.py`` file,
tracked by git or not, of the packages ``fedbench`` (``fedbench/``), ``fedbench.methods`` (``methods/``)
and ``fedbench.tasks`` (``tasks/``), each as its relative path and the SHA-256 of its bytes, plus,
for a plug-in outside them (an entry point or any module that registers a method, task, suite,
backbone or task family the row uses), its module's source file and the version of the
distribution that ships it. :func:`code_manifest` keeps the per-file digests, so a changed run can
be told which files changed (:func:`changed_code`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping
from functools import cache
from importlib.metadata import PackageNotFoundError, entry_points, packages_distributions, version
from pathlib import Path
from typing import Any

import torch

LIBRARIES = ("fedbench", "torch", "torchvision", "open_clip_torch", "numpy", "safetensors", "flwr")
# the folders whose source makes the numbers: (name in the manifest, the package installed from it)
CODE_PACKAGES = (("fedbench", "fedbench"), ("methods", "fedbench.methods"), ("tasks", "fedbench.tasks"))
PLUGIN_GROUPS = ("fedbench.methods", "fedbench.tasks", "fedbench.suites", "fedbench.backbones", "fedbench.families")


@cache
def git_commit(root: Path | None = None) -> str:
    """HEAD commit of the fedbench checkout (``+dirty`` when a tracked file has changes, or when an
    untracked, not ignored ``.py`` file lies in one of the source folders ``fedbench/``, ``methods/``,
    ``tasks/``: a new method file changes numbers as an edited one does), or ``unknown``."""
    root = Path(__file__).resolve().parents[2] if root is None else Path(root)
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    folders = {name for name, _ in CODE_PACKAGES}
    dirty = any(
        not line.startswith("??")
        or (line[3:].strip('"').endswith(".py") and line[3:].strip('"').split("/", 1)[0] in folders)
        for line in status
        if line.strip()
    )
    return head + ("+dirty" if dirty else "")


@cache
def library_versions() -> dict[str, str]:
    """Versions of the libraries that make the numbers, and of every installed distribution that
    provides fedbench plug-ins through entry points (``fedbench.methods``, ``fedbench.tasks``, ...)."""
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            continue
    for group in PLUGIN_GROUPS:
        for ep in entry_points(group=group):
            dist = getattr(ep, "dist", None)
            if dist is not None and dist.name not in out:
                out[dist.name] = dist.version
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def code_roots() -> list[tuple[str, Path]]:
    """(manifest name, folder) of each source package: in a checkout ``fedbench/``, ``methods/`` and
    ``tasks/``; in an installed copy the package folders (``fedbench/methods`` named ``methods``)."""
    roots = []
    for name, package in CODE_PACKAGES:
        spec = importlib.util.find_spec(package)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if locations:
            roots.append((name, Path(locations[0]).resolve()))
    return roots


def source_files(roots: Iterable[tuple[str, Path]] | None = None) -> dict[str, str]:
    """``<folder>/<relative path>`` -> SHA-256 of every ``.py`` file (tracked or not) under the
    source folders (:func:`code_roots`); a folder nested in another (an installed ``fedbench/methods``)
    counts under its own name only."""
    roots = [(name, Path(folder)) for name, folder in (code_roots() if roots is None else roots)]
    out = {}
    for name, folder in roots:
        nested = [f for _, f in roots if f != folder and f.is_relative_to(folder)]
        for path in sorted(folder.rglob("*.py")):
            if "__pycache__" in path.parts or any(path.is_relative_to(n) for n in nested):
                continue
            out[f"{name}/{path.relative_to(folder).as_posix()}"] = _sha256(path.read_bytes())
    return out


def _plugin_modules(protocol: Any, entry: Any) -> set[str]:
    """Modules outside the source folders that define what the row uses: its method class (and the
    method classes it derives from), and the tasks, task families, suites and backbone of ``protocol``."""
    from fedbench.api.method import Method
    from fedbench.api.registry import BACKBONES, FAMILIES, METHODS, SUITES, TASKS

    used: list[tuple[str, str, Any]] = []
    cls = METHODS.get(entry.name)
    used += [("fedbench.methods", entry.name, c) for c in inspect.getmro(cls) if issubclass(c, Method)]
    for task in protocol.tasks:
        spec = TASKS.get(task)
        used += [("fedbench.tasks", task, spec), ("fedbench.families", spec.family, FAMILIES.get(spec.family))]
    used.append(("fedbench.suites", protocol.data.suite, SUITES.get(protocol.data.suite)))
    backbone = protocol.backbone.name.partition(":")[0]
    used.append(("fedbench.backbones", backbone, BACKBONES.get(backbone)))
    modules = set()
    for group, name, obj in used:
        if inspect.isclass(obj) or inspect.isfunction(obj):
            modules.add(obj.__module__)
            continue
        modules.add(type(obj).__module__)  # an instance: its class's module, and the entry point that made it
        for ep in entry_points(group=group):
            if ep.name == name:
                try:
                    if ep.load() is obj:
                        modules.add(ep.module)
                except Exception:  # an entry point that does not load is not the one the registry holds
                    continue
    roots = [folder for _, folder in code_roots()]
    out = set()
    for module in modules:
        path = getattr(sys.modules.get(module), "__file__", None)
        if path and not any(Path(path).resolve().is_relative_to(r) for r in roots):
            out.add(module)
    return out


def plugin_code(protocol: Any, entry: Any) -> dict[str, str]:
    """``plugin:<module>`` -> SHA-256 of its source file, and ``plugin-version:<distribution>`` -> the
    version of the distribution that ships it (none for a loose module), for every plug-in module
    the row uses (:func:`_plugin_modules`)."""
    out = {}
    dists = packages_distributions()
    for module in sorted(_plugin_modules(protocol, entry)):
        path = Path(sys.modules[module].__file__)
        out[f"plugin:{module}"] = _sha256(path.read_bytes()) if path.is_file() else "unreadable"
        for dist in dists.get(module.partition(".")[0], []):
            try:
                out[f"plugin-version:{dist}"] = version(dist)
            except PackageNotFoundError:
                continue
    return out


def code_manifest(protocol: Any, entry: Any) -> dict[str, str]:
    """Everything the code digest of one row covers, key -> digest (or version): the source files
    (:func:`source_files`) and the row's plug-ins (:func:`plugin_code`). Read from disk each call."""
    return {**source_files(), **plugin_code(protocol, entry)}


def manifest_digest(manifest: Mapping[str, str]) -> str:
    """The code digest of a manifest: SHA-256 of its sorted ``key`` and value lines, 16 hex digits."""
    return _sha256("".join(f"{k}\0{v}\n" for k, v in sorted(manifest.items())).encode())[:16]


def code_digest(protocol: Any, entry: Any) -> str:
    """The code digest of the row ``entry`` of ``protocol`` (see the module docstring), read from
    disk once per process and row (records call it often); :func:`code_manifest` reads it afresh."""
    key = (entry.name, tuple(protocol.tasks), protocol.data.suite, protocol.backbone.name)
    if key not in _DIGESTS:
        _DIGESTS[key] = manifest_digest(code_manifest(protocol, entry))
    return _DIGESTS[key]


_DIGESTS: dict[tuple, str] = {}


def changed_code(before: Mapping[str, str], now: Mapping[str, str]) -> list[str]:
    """The keys (files, plug-ins, versions) whose digest differs between two manifests, or that one
    of them lacks, sorted."""
    return sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))


@cache
def _host() -> dict[str, str | int]:
    """The parts of :func:`machine` that cannot change while the process runs (read once)."""
    from PIL import __version__ as pillow
    from PIL import features

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "pillow": pillow,
        "freetype": features.version("freetype2") or "absent",
    }


def machine() -> dict[str, str | int]:
    """What explains bit-level drift between machines: the CPU model, the SIMD level torch's CPU
    kernels use (AVX2 vs AVX-512 reorder float sums), torch's thread count (read now: a process may
    set it between runs), and the text renderer (Pillow, FreeType) that draws the synthetic suite's
    signs."""
    host = _host()
    return {
        **{k: host[k] for k in ("cpu_model", "torch_cpu_capability")},
        "torch_threads": torch.get_num_threads(),
        **{k: host[k] for k in ("pillow", "freetype")},
    }
