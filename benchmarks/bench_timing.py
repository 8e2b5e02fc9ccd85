"""Timing, memory and machine description for the benchmarks: percentiles, threads, RSS, load."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np


def summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/mean in milliseconds and the count."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if not len(ms):
        return {"n": 0}
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"n": int(len(ms)), "p50_ms": round(p50, 3), "p95_ms": round(p95, 3), "p99_ms": round(p99, 3),
            "mean_ms": round(float(ms.mean()), 3)}


def time_each(fn: Callable[[Any], Any], args: Sequence[Any], warmup: int) -> list[float]:
    """Seconds per call of fn(arg); the first `warmup` calls run but are not kept."""
    for a in args[:warmup]:
        fn(a)
    out = []
    for a in args[warmup:]:
        t = time.perf_counter()
        fn(a)
        out.append(time.perf_counter() - t)
    return out


@contextlib.contextmanager
def request_threads(n: int | None) -> Iterator[None]:
    """Inside the block FAISS (OpenMP, for the calling thread) and torch use `n` threads; None: as shipped.

    A single request is too small to split across cores: on a busy host each OpenMP region waits for
    a second thread to be scheduled. This is the setting OMP_NUM_THREADS=1 gives, applied to requests only.
    """
    if n is None:
        yield
        return
    import faiss
    import torch

    omp, tt = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(n)
    torch.set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(omp)
        torch.set_num_threads(tt)


def _omp_threads(n: int | None) -> None:
    if n is not None:
        import faiss

        faiss.omp_set_num_threads(n)


def throughput(fn: Callable[[Any], Any], args: Sequence[Any], threads: int, per_request: int | None = None
               ) -> float:
    """Calls per second with `threads` threads sharing the work (after one untimed call each)."""
    with request_threads(per_request), ThreadPoolExecutor(threads, initializer=_omp_threads,
                                                          initargs=(per_request,)) as pool:
        list(pool.map(fn, args[:threads]))
        t = time.perf_counter()
        list(pool.map(fn, args))
        return len(args) / (time.perf_counter() - t)


@contextlib.contextmanager
def method_timer(cls: type, name: str) -> Iterator[list[float]]:
    """Record the duration of every call of cls.name (e.g. VectorIndex.build) while inside the block."""
    original = getattr(cls, name)
    spent: list[float] = []

    def timed(self, *a, **kw):
        t = time.perf_counter()
        try:
            return original(self, *a, **kw)
        finally:
            spent.append(time.perf_counter() - t)

    setattr(cls, name, timed)
    try:
        yield spent
    finally:
        setattr(cls, name, original)


@contextlib.contextmanager
def busy_host(n: int) -> Iterator[None]:
    """Inside the block, n other processes each keep a core busy (a pure-Python loop, no I/O):
    the "busy host" the targets are also checked on, made the same way on every run."""
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.5 if n else 0.0)  # scheduled and spinning before the first timing
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def rss_bytes() -> int:
    """Resident memory of this process now, after a garbage collection and returning free heap to the OS."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    """Cores, CPU model, memory and library versions, stored beside every result."""
    import faiss
    import sentence_transformers
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
    mem = next((int(ln.split()[1]) * 1024 for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), 0)
    libs = {"python": platform.python_version(), "numpy": np.__version__, "faiss": faiss.__version__,
            "torch": torch.__version__, "sentence_transformers": sentence_transformers.__version__}
    with contextlib.suppress(ImportError):
        import onnxruntime

        libs["onnxruntime"] = onnxruntime.__version__
    return {"cores": os.cpu_count(), "cpu": cpu, "memory_gb": round(mem / 2**30, 1),
            "simd": [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8") if f in flags],
            "faiss_omp_threads": faiss.omp_get_max_threads(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "libraries": libs}


def finish(result: dict[str, Any], out: Path | None) -> None:
    """Stamp the load average at the end, print the result as JSON and write it to `out` if given."""
    result["load_after"] = load()
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
