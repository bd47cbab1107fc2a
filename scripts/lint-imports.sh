#!/usr/bin/env bash
# Check the import contracts of pyproject.toml ([tool.importlinter]) with lint-imports.
# methods/ and tasks/ install as fedbench.methods and fedbench.tasks (package-dir mapping), which
# lint-imports cannot follow; so this lays the three folders out as one package in a temporary copy
# and runs lint-imports there, against the repository's own contracts.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp -r "$root/fedbench" "$tmp/fedbench"
cp -r "$root/methods" "$tmp/fedbench/methods"
cp -r "$root/tasks" "$tmp/fedbench/tasks"
cd "$tmp"
lint-imports --config "$root/pyproject.toml" --no-cache "$@"
