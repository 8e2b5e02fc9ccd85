"""Embedding a catalog on Ray Data (2 actors) against the local encoder, in one run.

    python benchmarks/ray_ingest.py [--items N] [--workers 2] [--batch-size 256] [--out FILE]

The bundled movielens-small catalog (all 9,742 items unless --items) is embedded twice with the
real MiniLM model: by the local encoder in this process (`embed_many`, as `Engine.ingest` does,
torch on every core; the model is loaded before the clock starts), and by `RayEmbedder` on a local
Ray started here with one CPU per worker (each actor loads the model and runs one torch thread).

Ray's figures: the start of the local Ray; a warm-up call with one text per actor (about the fixed
cost of a call: the pool's actors started, the model loaded on each); the full call, whose items
per second include that cost; and the rate past it, (n - warm-up items) / (full - warm-up).
Agreement: the cosine of each Ray vector to the local one, row by row; then both sets of vectors go
through `Engine.add_items` into two stores and the top-10 `similar_items` of 100 items are
compared. Prints one JSON object (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import catalog_items  # noqa: E402
from bench_timing import finish, load, machine  # noqa: E402

from engine import Engine  # noqa: E402
from engine.text.catalog import item_text  # noqa: E402
from engine.text.embedding import embed_many  # noqa: E402
from engine.text.encoder import Encoder  # noqa: E402
from engine.text.ray_embedding import RayEmbedder, import_ray, quiet_ray_logs  # noqa: E402


def local(texts: list[str]) -> tuple[np.ndarray, dict[str, float]]:
    t = time.perf_counter()
    enc = Encoder(show_progress=False, cache_size=0)
    loaded = time.perf_counter() - t
    t = time.perf_counter()
    vecs = embed_many(enc, texts, None, progress=False)
    took = time.perf_counter() - t
    return vecs, {"model_load_s": round(loaded, 2), "embed_s": round(took, 2),
                  "items_per_s": round(len(texts) / took, 1), "load_after": load()}


def on_ray(texts: list[str], workers: int, batch_size: int) -> tuple[np.ndarray, dict[str, float]]:
    ray = import_ray()
    quiet_ray_logs()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t = time.perf_counter()
    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    started = time.perf_counter() - t
    try:
        warm_n = min(len(texts), workers)  # one text per actor: the pool's start and model loads
        t = time.perf_counter()
        RayEmbedder(workers=workers, batch_size=1).embed(texts[:warm_n], progress=False)
        warm = time.perf_counter() - t
        t = time.perf_counter()
        vecs = RayEmbedder(workers=workers, batch_size=batch_size).embed(texts, progress=False)
        full = time.perf_counter() - t
    finally:
        ray.shutdown()
    past = (len(texts) - warm_n) / (full - warm) if full > warm and len(texts) > warm_n else None
    return vecs, {"ray_start_s": round(started, 2), "warmup_items": warm_n, "warmup_call_s": round(warm, 2),
                  "embed_s": round(full, 2), "items_per_s": round(len(texts) / full, 1),
                  "items_per_s_past_fixed_cost": None if past is None else round(past, 1),
                  "items_per_s_with_ray_start": round(len(texts) / (full + started), 1), "load_after": load()}


def neighbours_agree(items, a: np.ndarray, b: np.ndarray, probes: int = 100) -> float:
    """The share of top-10 similar items that two stores, built from vectors a and b, agree on."""
    with tempfile.TemporaryDirectory(prefix="kindling-ray-bench-") as tmp:
        engines = []
        for name, vecs in (("local", a), ("ray", b)):
            eng = Engine.create(Path(tmp) / name, encoder=_NoEncoder(a.shape[1]))
            eng.add_items(items, vectors=vecs)
            engines.append(eng)
        ids = [items[i].item_id for i in np.random.default_rng(0).choice(len(items), probes, replace=False)]
        same = [len({r.item_id for r in engines[0].similar_items(i, 10)}
                    & {r.item_id for r in engines[1].similar_items(i, 10)}) / 10 for i in ids]
        for eng in engines:
            eng.close(save=False)
    return round(float(np.mean(same)), 4)


class _NoEncoder:
    """Stands in for the model where every vector is given (add_items(vectors=...))."""

    name = "given-vectors"

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def encode(self, texts):  # pragma: no cover - never called: the vectors are given
        raise AssertionError("no text is embedded here")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=0, help="the first N catalog items (0: all)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    items = catalog_items()
    items = items[:args.items] if args.items else items
    texts = [item_text(i) for i in items]
    result = {"items": len(texts), "workers": args.workers, "batch_size": args.batch_size,
              "machine": machine(), "load_before": load()}
    print(f"{len(texts)} items, load {result['load_before']}", flush=True)
    ref, result["local"] = local(texts)
    print(json.dumps({"local": result["local"]}), flush=True)
    vecs, result["ray"] = on_ray(texts, args.workers, args.batch_size)
    print(json.dumps({"ray": result["ray"]}), flush=True)
    cos = (vecs * ref).sum(1) / (np.linalg.norm(vecs, axis=1) * np.linalg.norm(ref, axis=1))
    result["cosine"] = {"min": round(float(cos.min()), 6), "median": round(float(np.median(cos)), 6),
                        "rows_below_0.9999": int((cos < 0.9999).sum())}
    result["similar_top10_overlap"] = neighbours_agree(items, ref, vecs)
    result["ray_vs_local_speed"] = round(result["ray"]["items_per_s"] / result["local"]["items_per_s"], 2)
    finish(result, args.out)


if __name__ == "__main__":
    main()
