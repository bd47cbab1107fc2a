"""Where a number came from: git commit and library versions, recorded with every run."""

from __future__ import annotations

import platform
import subprocess
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

LIBRARIES = ("fedbench", "torch", "torchvision", "open_clip_torch", "numpy", "safetensors", "flwr")


@cache
def git_commit() -> str:
    """HEAD commit of the fedbench checkout (``+dirty`` when the tree has changes), or ``unknown``."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


@cache
def library_versions() -> dict[str, str]:
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            continue
    return out


@cache
def machine() -> dict[str, str | int]:
    """What explains bit-level drift between machines: the CPU model, the SIMD level torch's CPU
    kernels use (AVX2 vs AVX-512 reorder float sums), torch's thread count, and the text renderer
    (Pillow, FreeType) that draws the synthetic suite's signs."""
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
        "torch_threads": torch.get_num_threads(),
        "pillow": pillow,
        "freetype": features.version("freetype2") or "absent",
    }
