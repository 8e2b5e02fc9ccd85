"""The encoder: torch against the ONNX backends, on real catalog texts through Engine.ingest.

Bulk ingest runs Engine.ingest on the bundled catalog with each Config.encoder_backend, in
alternating rounds (torch, onnx-int8, torch, ...) so that a change of load on a shared machine hits
both; the model is loaded before the clock starts. Agreement is the cosine between each backend's
vector and the torch vector of the same text.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import bench_data as data
import bench_timing as bt
from engine import Config, Engine
from engine.text.catalog import item_text
from engine.text.encoder import Encoder


def available_backends() -> list[str]:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return ["torch"]
    return ["torch", "onnx", "onnx-int8"]


def ingest_rate(backend: str, items, root: Path) -> float:
    """Items per second of Engine.ingest (embedding + index + snapshot) with a fresh encoder cache."""
    eng = Engine.create(Path(tempfile.mkdtemp(dir=root)) / "s", Config(encoder_backend=backend))
    try:
        eng.encoder  # noqa: B018 - load (and for ONNX export once) before timing
        t = time.perf_counter()
        eng.ingest(items, progress=False)
        return len(items) / (time.perf_counter() - t)
    finally:
        eng.close(save=False)


def agreement(backend: str, texts: list[str], reference: np.ndarray) -> dict[str, float]:
    vecs = Encoder(backend=backend, show_progress=False).encode(texts)
    cos = (vecs * reference).sum(1)
    return {"cosine_mean": round(float(cos.mean()), 4), "cosine_min": round(float(cos.min()), 4),
            "cosine_p1": round(float(np.percentile(cos, 1)), 4)}


def single_text(backend: str, texts: list[str], warmup: int = 3) -> dict[str, Any]:
    enc = Encoder(backend=backend, show_progress=False, cache_size=0)
    return bt.summary(bt.time_each(lambda t: enc.encode([t]), texts, warmup))


def run(n_ingest: int, rounds: int, n_agree: int, n_single: int, log=print) -> dict[str, Any]:
    backends = available_backends()
    catalog = data.catalog_items()
    reference = data.catalog_vectors(log)
    rng = np.random.default_rng(3)
    pick = rng.choice(len(catalog), n_agree, replace=False)
    texts = [item_text(catalog[i]) for i in pick]
    out: dict[str, Any] = {"backends": backends, "ingest_items": n_ingest, "rounds": rounds}
    rates: dict[str, list[float]] = {b: [] for b in backends}
    with tempfile.TemporaryDirectory(prefix="kindling-bench-enc-") as root:
        for r in range(rounds):
            chunk = catalog[(r * n_ingest) % len(catalog):][:n_ingest]
            for b in backends:
                rates[b].append(ingest_rate(b, chunk, Path(root)))
                log(f"  ingest round {r} {b}: {rates[b][-1]:.1f} items/s (load {bt.load()[0]})")
    for b in backends:
        out[b] = {"ingest_items_per_s": round(float(np.median(rates[b])), 1),
                  "ingest_rounds": [round(x, 1) for x in rates[b]],
                  "ratio_vs_torch": round(float(np.median(rates[b]) / np.median(rates["torch"])), 2),
                  "single_text": single_text(b, [t + " (single)" for t in texts[:n_single]]),
                  **(agreement(b, texts, reference[pick]) if b != "torch" else {})}
    out["load"] = bt.load()
    return out
