"""Batch embedding on Ray Data: an actor pool that loads the model once per worker (scale extra).

The driver turns items into text (`catalog.item_text`, exactly as a local ingest does), ships
(row, text) blocks to a fixed pool of actors, each holding one `Encoder` of the store's model, and
scatters the vectors back by row, so the result is in input order whatever order Ray returns
blocks in. `Engine.ingest(items, embedder=RayEmbedder(...))` then adds them in one atomic batch.

Example:
    >>> from engine.text.ray_embedding import RayEmbedder
    >>> with Engine.open("store") as eng:                            # doctest: +SKIP
    ...     eng.ingest(read_items("catalog.parquet"), embedder=RayEmbedder(workers=4))
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import ENCODER_BACKENDS, EncoderBackend
from .. import errors
from ..errors import ClusterError, EngineError, InvalidInputError, MissingExtraError

log = logging.getLogger(__name__)

#: The address that starts a new local Ray instance (Ray's own spelling), and our default.
LOCAL = "local"
INSTALL_HINT = "pip install 'kindling[scale]'"


def import_ray() -> Any:
    """The `ray` module with Ray Data, or MissingExtraError naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401  (ray without the [data] extra lacks pyarrow-backed Data)
    except ImportError as exc:
        raise MissingExtraError(f"embedding on Ray needs ray[data], part of the scale extra "
                                f"({INSTALL_HINT}): {exc}") from exc
    return ray


def quiet_ray_logs() -> None:
    """Ray's and Ray Data's INFO lines off (warnings and errors stay): for the CLI, whose user
    asked for one line of output. A library caller keeps Ray's logging as it configured it."""
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # the core worker's own stderr lines
    import_ray()
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)


@dataclass(frozen=True)
class RayEmbedder:
    """Embeds a batch of texts on Ray Data with a fixed pool of `workers` actors.

    Args:
        address: None or "local" starts a local Ray for the call (and stops it after); "auto" joins
            the cluster running on this machine; "HOST:PORT" or "ray://HOST:10001" joins that
            cluster. A Ray this process has already started (`ray.init`) is used as it is and
            left running. Every node needs kindling and its model installed (the scale extra).
        workers: actors in the pool; each loads the model once and holds `cpus_per_worker` CPUs.
        batch_size: texts per actor call (and per Ray block).
        cpus_per_worker: CPUs Ray reserves per actor; torch runs that many threads in it.
    """

    address: str | None = None
    workers: int = 2
    batch_size: int = 256
    cpus_per_worker: int = 1

    def __post_init__(self) -> None:
        for name in ("workers", "batch_size", "cpus_per_worker"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be a positive int; got {value!r}")
        if self.address is not None and (not isinstance(self.address, str) or not self.address.strip()):
            raise InvalidInputError(f"address must be None or a non-empty string; got {self.address!r}")

    def embed(self, texts: Sequence[str], model_path: str | None = None, backend: EncoderBackend = "torch",
              progress: bool | None = None) -> np.ndarray:
        """The vectors of `texts` in their order: shape (n, dim), float32, unit norm.

        Args:
            model_path: the model folder on the workers (None: the bundled default, resolved there).
            backend: the encoder backend each worker runs ("torch", "onnx", "onnx-int8").
            progress: a progress bar over the returned rows (None: when stderr is a terminal).
        Raises:
            MissingExtraError: ray[data] is not installed.
            ClusterError: Ray could not start or connect, or a worker failed (the message says why);
                a worker's own EngineError (e.g. ModelLoadError) is raised as that class.
        """
        if backend not in ENCODER_BACKENDS:
            raise InvalidInputError(f"backend must be one of {', '.join(ENCODER_BACKENDS)}; got {backend!r}")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise InvalidInputError(f"text #{i} is empty; an embedded text must have non-space characters")
        if not texts:
            raise InvalidInputError("texts must not be empty; there is nothing to embed")
        ray = import_ray()
        with self._connected(ray):
            self._check_cpus(ray)
            try:
                return self._run(ray, texts, model_path, backend, progress)
            except EngineError:
                raise
            except Exception as exc:  # Ray wraps a worker's error in its own types
                raise _worker_error(exc) from exc

    @contextmanager
    def _connected(self, ray: Any) -> Iterator[None]:
        """Ray connected for the block: started (or joined) here and shut down after, or the
        connection this process already has, left as it was."""
        if ray.is_initialized():
            yield
            return
        # Ray's usage statistics would try to reach the internet; Kindling never asks it to.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        address = self.address or LOCAL
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "logging_level": max(logging.INFO, logging.getLogger("ray").level)}
        if address == LOCAL:  # enough CPUs for the pool even where the machine has fewer
            kwargs["num_cpus"] = max(os.cpu_count() or 1, self.workers * self.cpus_per_worker)
        log.info("%s Ray at %r for %d workers", "starting a local" if address == LOCAL else "joining", address,
                 self.workers)
        try:
            ray.init(address=address, **kwargs)
        except Exception as exc:
            raise ClusterError(f"cannot start or join Ray at {address!r}: {exc}") from exc
        try:
            yield
        finally:
            ray.shutdown()

    def _check_cpus(self, ray: Any) -> None:
        """Refuse a pool the cluster cannot hold: Ray would wait for the missing actors forever."""
        need, have = self.workers * self.cpus_per_worker, ray.cluster_resources().get("CPU", 0)
        if have < need:
            raise ClusterError(f"the pool needs {need:g} CPUs ({self.workers} workers x {self.cpus_per_worker}) "
                               f"but the Ray cluster has {have:g}; use fewer workers or a larger cluster")

    def _run(self, ray: Any, texts: list[str], model_path: str | None, backend: EncoderBackend,
             progress: bool | None) -> np.ndarray:
        import pyarrow as pa
        from tqdm.auto import tqdm

        n = len(texts)
        table = pa.table({"row": pa.array(np.arange(n, dtype=np.int64)), "text": pa.array(texts, pa.large_string())})
        blocks = [table.slice(start, self.batch_size) for start in range(0, n, self.batch_size)]
        ds = ray.data.from_arrow(blocks).map_batches(
            EmbedWorker, batch_size=self.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(self.workers, len(blocks))),
            num_cpus=self.cpus_per_worker,
            fn_constructor_kwargs={"model_path": model_path, "backend": backend, "threads": self.cpus_per_worker})
        out: np.ndarray | None = None
        seen = np.zeros(n, dtype=bool)
        hide = None if progress is None else not progress  # None: tqdm shows it on a terminal only
        with _ray_bars_off(ray), tqdm(total=n, desc="embedding on ray", unit="item", disable=hide) as bar:
            for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
                rows, vecs = np.asarray(batch["row"], dtype=np.int64), np.asarray(batch["vector"], np.float32)
                if out is None:
                    out = np.empty((n, vecs.shape[1]), dtype=np.float32)
                if seen[rows].any():
                    raise ClusterError(f"Ray returned row {int(rows[seen[rows]][0])} twice")
                out[rows], seen[rows] = vecs, True
                bar.update(len(rows))
        if out is None or not seen.all():
            raise ClusterError(f"Ray returned {int(seen.sum())} of {n} vectors")
        return out


class EmbedWorker:
    """One Ray actor: the store's model loaded once, then (row, text) batches -> (row, vector).

    Our own load errors (a folder that is no model, custom code refused) are kept and raised on the
    first batch instead: Ray Data replaces an actor that dies in its constructor several times over,
    which only repeats a deterministic failure. Other errors (out of memory, a lost file system)
    stay in the constructor, where those retries may help.
    """

    def __init__(self, model_path: str | None, backend: EncoderBackend, threads: int) -> None:
        import torch

        from .encoder import Encoder

        torch.set_num_threads(threads)  # the CPUs Ray gave this actor, not the whole machine
        self._error: EngineError | None = None
        try:
            self._encoder = Encoder(model_path, show_progress=False, cache_size=0, backend=backend)
        except EngineError as exc:
            self._error = exc

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._error is not None:
            raise self._error
        vectors = self._encoder.encode([str(t) for t in batch["text"]])
        return {"row": batch["row"], "vector": vectors}


@contextmanager
def _ray_bars_off(ray: Any) -> Iterator[None]:
    """Ray Data's own progress bars off for the block (ours counts rows), then put back."""
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    try:
        yield
    finally:
        ctx.enable_progress_bars = saved


def _worker_error(exc: BaseException) -> EngineError:
    """A Ray failure as our error: a worker's EngineError (e.g. a ModelLoadError raised while an
    actor loads the model) as its own class, else a ClusterError with the innermost cause.

    Ray hands a worker's error back as text (a traceback inside RayTaskError or ActorDiedError),
    so the class is found by name in that text, in the cause chain, innermost last."""
    chain, cur = [], exc
    while cur is not None and len(chain) < 20:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for e in chain:
        if isinstance(e, EngineError):
            return _rebuilt(type(e).__name__, _last_line(str(e)))
        found = _ENGINE_ERROR_LINE.findall(str(e))
        if found:
            return _rebuilt(*found[-1])
    return ClusterError(f"embedding on Ray failed: {type(chain[-1]).__name__}: {_last_line(str(chain[-1]))}")


#: The last line of a traceback that ended in one of our errors: "engine.errors.Name: message".
_ENGINE_ERROR_LINE = re.compile(r"^engine\.errors\.(\w+): (.*)$", re.MULTILINE)


def _rebuilt(name: str, message: str) -> EngineError:
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, EngineError)):
        cls = ClusterError
    return cls(f"on a Ray worker: {message}")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
