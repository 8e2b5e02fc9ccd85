"""Vectors for the store from an encoder or from the caller, checked before anything is logged."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ..config import EncoderBackend
from .encoder import TextEncoder
from ..errors import InvalidInputError
from ..vectors import ZERO_NORM, check_vectors, normalise_rows

#: Texts embedded per step of a large batch (one progress-bar step).
CHUNK = 512


class BatchEmbedder(Protocol):
    """Embeds a whole batch somewhere else (a Ray cluster: `ray_embedding.RayEmbedder`) with the
    store's model, loaded there from `model_path` (None: the bundled default)."""

    def embed(self, texts: Sequence[str], model_path: str | None, backend: EncoderBackend,
              progress: bool | None) -> np.ndarray:
        """Shape (n, dim), float32, row i the vector of texts[i]."""
        ...


def embed(encoder: TextEncoder, texts: Sequence[str], dim: int | None) -> np.ndarray:
    """The encoder's vectors of `texts`, shape (n, dim) float32, checked: one row per text, the
    store's width (`dim`; None before the first item) and finite values."""
    return check_embedded(encoder.encode(list(texts)), len(texts), dim)


def check_embedded(vectors: np.ndarray, n: int, dim: int | None) -> np.ndarray:
    """An encoder's output for n texts as float32 (n, dim), checked: one row per text, the store's
    width (`dim`; None before the first item) and finite values."""
    vecs = np.asarray(vectors, dtype=np.float32)
    if vecs.ndim != 2 or len(vecs) != n:
        raise InvalidInputError(f"the encoder must return shape (n, dim) for n texts; got {vecs.shape} "
                                f"for {n} texts")
    if dim is not None and vecs.shape[1] != dim:
        raise InvalidInputError(f"the encoder gives {vecs.shape[1]}-d vectors but this store holds "
                                f"{dim}-d ones; use the store's model")
    if not np.isfinite(vecs).all():
        raise InvalidInputError("the encoder returned NaN or inf; refusing to index it")
    return vecs


def embed_many(encoder: TextEncoder, texts: list[str], dim: int | None, progress: bool | None) -> np.ndarray:
    """`embed` in chunks of CHUNK, with a progress bar (by default when stderr is a terminal)."""
    from tqdm.auto import tqdm

    show = progress if progress is not None else (len(texts) > CHUNK and sys.stderr.isatty())
    parts = []
    with tqdm(total=len(texts), desc="embedding", unit="item", disable=not show) as bar:
        for start in range(0, len(texts), CHUNK):
            parts.append(embed(encoder, texts[start:start + CHUNK], dim))
            bar.update(len(parts[-1]))
    return np.concatenate(parts) if parts else np.zeros((0, encoder.dim), np.float32)


def given_vectors(vectors: np.ndarray, n: int, dim: int) -> np.ndarray:
    """Precomputed text vectors for n items: float32 (n, dim), finite, non-zero; returned at unit
    length."""
    vecs = check_vectors(vectors, dim)
    if len(vecs) != n:
        raise InvalidInputError(f"got {len(vecs)} vectors for {n} items")
    if (np.linalg.norm(vecs, axis=1) < ZERO_NORM).any():
        raise InvalidInputError("vectors must not be all zeros")
    return normalise_rows(vecs)
