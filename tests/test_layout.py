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
