"""Backend parity table: per results directory (one per backend, same protocol), per method row:
mean accuracy, MB up, MB down, the wall time of the whole directory's run (from its records'
file times) and whether every record equals the first directory's (all fields but timings and the
backend's own byte count).

    python scripts/backend_parity.py runs/parity-inprocess runs/parity-flower-sim runs/parity-flower-deploy
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedbench.utils.records import read_jsonl

SKIP = {"compute_s", "backend", "machine", "up_bytes_flower", "down_bytes_flower", "git_commit"}


def runs(results: Path) -> dict[str, list[dict]]:
    return {p.parent.name: read_jsonl(p) for p in sorted(results.glob("runs/*/records.jsonl"))}


def same(a: list[dict], b: list[dict]) -> bool:
    strip = lambda rows: [{k: v for k, v in r.items() if k not in SKIP} for r in rows]  # noqa: E731
    return strip(a) == strip(b)


def main(dirs: list[str]) -> None:
    base = runs(Path(dirs[0]))
    print("| backend | method | mean_acc | MB up | MB down | wall s (all rows) | records identical to first |")
    print("|---|---|---:|---:|---:|---:|---|")
    for d in dirs:
        path = Path(d)
        wall = (path / "wall_s.txt").read_text().strip() if (path / "wall_s.txt").is_file() else "?"
        for run_id, rows in runs(path).items():
            glob = [r for r in rows if r["kind"] == "eval" and r["scope"] == "global"]
            last = max(r["round"] for r in glob)
            acc = sum(r["value"] for r in glob if r["round"] == last) / sum(1 for r in glob if r["round"] == last)
            train = [r for r in rows if r["kind"] == "train"]
            up, down = sum(r["up_bytes"] for r in train) / 1e6, sum(r["down_bytes"] for r in train) / 1e6
            backend = rows[-1].get("backend", "?")
            print(
                f"| {backend} | {rows[0]['label']} | {acc:.4f} | {up:.3f} | {down:.3f} | {wall} | "
                f"{'yes' if same(base.get(run_id, []), rows) else 'NO'} |"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
