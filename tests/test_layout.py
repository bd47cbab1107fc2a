"""The house's layout holds: CONTRIBUTING's layer diagram is the import contract's, and no module
imports a private name from another (the contract itself is checked by scripts/lint-imports.sh)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
CODE = ("fedbench", "methods", "tasks", "scripts", "benchmarks", "tests")


def _contract_layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    return [re.sub(r"\bfedbench\.", "", layer) for layer in layers]


def test_contributing_diagram_lists_the_contract_layers():
    text = (ROOT / "CONTRIBUTING.md").read_text()
    block = text.split("## Layers: where code goes", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    drawn = [re.split(r"\s{2,}", line.strip())[0] for line in block.splitlines() if line.strip()]
    assert drawn == _contract_layers()


def test_the_contract_names_every_package_of_fedbench():
    packages = {p.parent.name for p in (ROOT / "fedbench").glob("*/__init__.py")} | {"methods", "tasks"}
    named = {name.strip() for layer in _contract_layers() for name in re.split(r"[|:]", layer)}
    assert named == packages


def _private_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedbench"):
            found += [
                f"{path.relative_to(ROOT)}:{node.lineno} {node.module}.{a.name}"
                for a in node.names
                if a.name.startswith("_")
            ]
    return found


def test_no_module_imports_a_private_name_from_another():
    found = [hit for folder in CODE for path in sorted((ROOT / folder).rglob("*.py")) for hit in _private_imports(path)]
    assert found == []


START_UP = """
import sys
from fedbench.cli import app
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    heavy = ("torch", "open_clip", "torchvision", "peft", "transformers", "scipy.stats")
    print("HEAVY", sorted(m for m in heavy if m in sys.modules), file=sys.stderr)
"""


def test_leaderboard_starts_without_torch():
    """`fedbench leaderboard` reads records: it imports no torch nor model libraries (start-up time is
    measured in the closing notes, not asserted here). ``report`` does import torch: it groups tasks
    by family through the task registry, whose plug-ins define torch modules."""
    import subprocess
    import sys

    args = ["leaderboard", "--results", str(ROOT / "results" / "router-diagnostics")]
    run = subprocess.run([sys.executable, "-c", START_UP, *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "HEAVY []" in run.stderr, run.stderr[-500:]
