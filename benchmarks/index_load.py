"""Loading a saved index vs rebuilding it from the vectors: what "rebuild when in doubt" would cost.

    python benchmarks/index_load.py [--n 100000] [--kinds flat hnsw] [--out FILE]

N synthetic item vectors (bench_data.synthetic, seed 0, as benchmarks/build.py makes them: [v, 0],
385 wide) are indexed by `VectorIndex.build` (the engine's `rebuild_index`), saved, and loaded
back with `VectorIndex.load` (the layout and id checks of serving/faiss_file included), then the
256-row vector sample `State.vouch_for_index` compares. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_timing as bt  # noqa: E402
from build import make_data  # noqa: E402

from engine.serving.index import VectorIndex  # noqa: E402


def one(kind: str, vectors: np.ndarray, folder: Path) -> dict:
    rows = np.arange(len(vectors))
    t = time.perf_counter()
    idx = VectorIndex(vectors.shape[1], kind)
    idx.build(rows, vectors)
    build_s = time.perf_counter() - t
    path = folder / f"{kind}.faiss"
    idx.save(path)
    del idx
    t = time.perf_counter()
    again = VectorIndex(vectors.shape[1], kind)
    again.load(path, rows, len(rows))
    load_s = time.perf_counter() - t
    sample = np.sort(np.random.default_rng(0).choice(rows, min(256, len(rows)), replace=False))
    t = time.perf_counter()
    ok = again.agrees_on(sample, vectors[sample])
    vouch_s = time.perf_counter() - t
    return {"kind": kind, "build_s": round(build_s, 3), "load_checked_s": round(load_s, 3),
            "vouch_sample_s": round(vouch_s, 5), "agrees": ok, "file_bytes": path.stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--kinds", nargs="+", default=["flat", "hnsw"])
    ap.add_argument("--out")
    args = ap.parse_args()
    vectors, _ = make_data(args.n, 1)
    out = {"n": args.n, "machine": bt.machine(), "runs": []}
    with tempfile.TemporaryDirectory() as d:
        for kind in args.kinds:
            out["runs"].append(one(kind, vectors, Path(d)))
            print(json.dumps(out["runs"][-1]), flush=True)
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
