"""Peak memory of the real-data path at VQAv2-validation size (generated data, not VQAv2).

Writes a parquet snapshot in the lmms-lab/VQAv2 schema with ROWS rows (default 214,354, the size of
its validation split; ~5 questions per image, tiny PNGs so that the file stays small), then measures
in fresh processes the peak resident memory (ru_maxrss) of each stage:

1. ``read``: ``datasets`` loads the parquet (memory-mapped Arrow) and the adapter reads every example's
   question, ten answers and answer type (no image decoded);
2. ``build``: the suite builds a federated table (``--clients`` clients x ``--train`` training examples,
   a ``--global-test`` global test set): partition, answer vocabulary, VQA scores, and the selected
   images decoded once into the memory-mapped on-disk cache;
3. ``rebuild``: the same with the image cache already on disk (what a resumed run or a Flower node does).

    python scripts/vqav2_scale.py --out /tmp/vqav2_scale [--rows 214354]

Prints a Markdown table (stage, peak RSS, wall seconds). Run on an idle machine for stable times.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def write(root: Path, rows: int, per_image: int = 5, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Features, Image, Value
    from PIL import Image as PILImage

    features = Features(
        {
            "question_type": Value("string"),
            "multiple_choice_answer": Value("string"),
            "answers": [{"answer": Value("string"), "answer_confidence": Value("string"), "answer_id": Value("int64")}],
            "image_id": Value("int64"),
            "answer_type": Value("string"),
            "question_id": Value("int64"),
            "question": Value("string"),
            "image": Image(),
        }
    )
    rng = np.random.default_rng(seed)
    vocab = [f"answer{i}" for i in range(3000)] + ["yes", "no", "2", "two", "red"]
    schema = features.arrow_schema
    out = root / "data" / "validation-00000-of-00001.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = pq.ParquetWriter(out, schema)
    pngs = []
    for _ in range(64):
        buf = io.BytesIO()
        PILImage.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    chunk = 10_000
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        ids = np.arange(start, start + n)
        picks = rng.zipf(1.3, (n, 10)) % len(vocab)
        answers = [
            [{"answer": vocab[a], "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(row)]
            for row in picks
        ]
        data = {
            "question_type": ["what is"] * n,
            "multiple_choice_answer": [vocab[row[0]] for row in picks],
            "answers": answers,
            "image_id": (ids // per_image).tolist(),
            "answer_type": ["other"] * n,
            "question_id": ids.tolist(),
            "question": [f"what is shown in picture {i // per_image}, question {i}?" for i in ids],
            "image": [{"bytes": pngs[(i // per_image) % len(pngs)], "path": f"{i // per_image}.png"} for i in ids],
        }
        writer.write_table(pa.Table.from_pydict(data, schema=schema))
    writer.close()


def stage(kind: str, root: str, clients: int, train: int, global_test: int) -> None:
    """Run in a fresh process; prints a JSON line with the peak RSS and the wall time."""
    t0 = time.perf_counter()
    from fedbench.api.data import ClientPlan, PartitionConfig
    from fedbench.tasks import real

    adapter = real.ADAPTERS["vqav2"]
    if kind == "read":
        ex = real.read_examples(Path(root), adapter, "validation")
        n = len(ex)
    else:
        config = PartitionConfig(
            suite="real", num_clients=clients, train_images=train, test_images=max(1, train // 5),
            global_test_images=global_test, image_size=64, sources={"vqav2": root},
        )  # fmt: skip
        plans = [ClientPlan(c, ("vqav2",), train, max(1, train // 5), (1.0,), None, c % 2 == 0) for c in range(clients)]
        table = real.build_real(plans, config, ["vqav2"], 0)
        n = len(table)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    wall = round(time.perf_counter() - t0, 1)
    print(json.dumps({"stage": kind, "rows": n, "peak_rss_mb": round(peak), "wall_s": wall}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=214_354)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--global-test", type=int, default=5000)
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = args.out / "VQAv2"
    if args.stage:
        stage(args.stage, str(root), args.clients, args.train, args.global_test)
        return
    if not (root / "data").is_dir():
        t0 = time.perf_counter()
        write(root, args.rows)
        print(f"wrote {args.rows} rows in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    env = {**os.environ, "FEDBENCH_CACHE": str(args.out / "cache"), "FEDBENCH_HF_CACHE": str(args.out / "hf")}
    size_mb = sum(f.stat().st_size for f in root.rglob("*.parquet")) / 1e6
    lines = [
        f"Generated lmms-lab/VQAv2-schema table: {args.rows:,} rows, parquet {size_mb:.0f} MB; "
        f"{args.clients} clients x {args.train} training examples, global test {args.global_test}, 64 px images.",
        "",
        "| stage | rows | peak RSS (MB) | wall (s) |",
        "|---|---:|---:|---:|",
    ]
    for kind in ("read", "build", "rebuild"):
        cmd = [sys.executable, __file__, "--out", str(args.out), "--stage", kind.replace("rebuild", "build")]
        cmd += ["--clients", str(args.clients), "--train", str(args.train), "--global-test", str(args.global_test)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rec = json.loads(out)
        lines.append(f"| {kind} | {rec['rows']:,} | {rec['peak_rss_mb']:,} | {rec['wall_s']} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
