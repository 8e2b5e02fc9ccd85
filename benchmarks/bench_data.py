"""Benchmark data: the bundled catalog's real MiniLM vectors, and clustered synthetic catalogs made from them.

A synthetic item is a real catalog vector (its cluster centre) plus Gaussian noise, renormalised:
`v = normalise(c + s * g / sqrt(d))` with `s` drawn per item from [0.5, 1.0], so an item sits at
cosine ~0.7-0.9 from its centre and the catalog keeps the real vectors' topic structure (9,742
clusters of uneven density), not the easy geometry of uniform random points.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from engine import Item
from engine.text.catalog import item_text, read_items

ROOT = Path(__file__).resolve().parent.parent
CATALOG = ROOT / "index_data" / "movielens-small"
CACHE = Path(__file__).resolve().parent / ".cache"
DIM = 384


def catalog_items() -> list[Item]:
    return read_items(CATALOG)


def catalog_vectors(log=print) -> np.ndarray:
    """The catalog embedded once by the default (torch) encoder, cached in benchmarks/.cache/."""
    items_file = CATALOG / "items.parquet"
    key = hashlib.sha256(items_file.read_bytes()).hexdigest()[:16]
    path = CACHE / f"movielens-small-minilm-{key}.npy"
    if path.exists():
        return np.load(path)
    from engine.text.encoder import Encoder

    log(f"embedding the {items_file.parent.name} catalog once (cached in {CACHE.name}/) ...")
    items = catalog_items()
    vecs = Encoder(show_progress=True).encode([item_text(i) for i in items])
    CACHE.mkdir(exist_ok=True)
    np.save(path, vecs)
    (CACHE / f"{path.stem}.json").write_text(json.dumps({"items": len(items), "model": "all-MiniLM-L6-v2",
                                                          "backend": "torch"}))
    return vecs


def synthetic(centres: np.ndarray, n: int, seed: int, chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """n clustered unit vectors around `centres`: (vectors (n, d) float32, cluster of each (n,) int32)."""
    rng = np.random.default_rng(seed)
    d = centres.shape[1]
    cluster = rng.integers(0, len(centres), n).astype(np.int32)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, chunk):
        c = cluster[s:s + chunk]
        scale = rng.uniform(0.5, 1.0, (len(c), 1)).astype(np.float32) / np.sqrt(d)
        v = centres[c] + scale * rng.standard_normal((len(c), d), dtype=np.float32)
        out[s:s + chunk] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out, cluster


def synthetic_items(n: int, prefix: str = "s") -> list[Item]:
    """Items whose texts ("<prefix>-item <i>") key a LookupEncoder; no language model is run for them."""
    return [Item(f"{prefix}{i}", f"{prefix}-item {i}") for i in range(n)]


class LookupEncoder:
    """An encoder (engine.text.encoder.TextEncoder) that returns precomputed vectors for known texts.

    The synthetic catalogs go through the engine's public ingest path without embedding a million
    titles; any other text (a real one-item add) goes to `fallback`, a real Encoder.
    """

    name = "all-MiniLM-L6-v2"
    dim = DIM

    def __init__(self, vectors: np.ndarray, prefix: str = "s", fallback=None) -> None:
        self._vectors, self._prefix, self.fallback = vectors, f"{prefix}-item ", fallback

    def encode(self, texts) -> np.ndarray:
        rows = [self._row(t) for t in texts]
        if all(r is not None for r in rows):
            return self._vectors[np.array(rows, dtype=np.int64)] if rows else np.zeros((0, DIM), np.float32)
        if self.fallback is None:
            raise KeyError("LookupEncoder has no vector for a text and no fallback encoder")
        return self.fallback.encode(list(texts))

    def _row(self, text: str) -> int | None:
        if not text.startswith(self._prefix):
            return None
        tail = text[len(self._prefix):]
        return int(tail) if tail.isdigit() and int(tail) < len(self._vectors) else None


def user_clicks(vectors: np.ndarray, n_users: int, clicks: int, seed: int, pool: int = 20) -> list[np.ndarray]:
    """Per user, `clicks` item rows drawn from one random item's `pool` nearest neighbours (a coherent taste)."""
    import faiss

    rng = np.random.default_rng(seed)
    anchors = rng.choice(len(vectors), n_users, replace=False)
    _, near = faiss.knn(vectors[anchors], vectors, pool, metric=faiss.METRIC_INNER_PRODUCT)
    return [rng.choice(row[row >= 0], clicks, replace=False) for row in near]
