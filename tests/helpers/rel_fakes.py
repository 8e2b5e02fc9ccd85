"""Shared pieces of the reliability tests: a small deterministic encoder and state fingerprints.

Imported by tests/test_reliability_*.py and by the subprocess workers in this folder (which put
this folder on sys.path themselves), so it depends on nothing but the engine and the stdlib.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine import Engine, Item

DIM = 32


class FakeEncoder:
    """Bag-of-hashed-words text vectors: texts sharing words get close vectors. Deterministic."""

    name = "fake-hash-32"
    dim = DIM

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for r, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError("empty text")
            for word in text.lower().split():
                h = hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest()
                out[r, h[0] % self.dim] += 1.0 if h[1] & 1 else -1.0
                out[r, h[2] % self.dim] += 0.5
            out[r] /= max(float(np.linalg.norm(out[r])), 1e-6)
        return out


def items(prefix: str, n: int, start: int = 0) -> list[Item]:
    """n items whose texts share topic words, so similar-item queries have real neighbours."""
    topics = ["space robots", "romantic comedy", "cooking show", "war history", "jazz music"]
    return [Item(f"{prefix}{i}", f"Title {prefix}{i}", f"{topics[i % 5]} episode {i % 7} {prefix}",
                 (topics[i % 5].split()[0],)) for i in range(start, start + n)]


def make_store(path: Path, n_items: int = 50, prefix: str = "m", **config: Any) -> Engine:
    from engine import Config

    eng = Engine.create(path, Config(**config) if config else None, encoder=FakeEncoder())
    if n_items:
        eng.add_items(items(prefix, n_items))
        eng.save()
    return eng


def disk_state(path: Path) -> dict[str, str]:
    """File name -> sha256 of every file in the store except the lock."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(path).iterdir()) if p.is_file() and p.name != "LOCK"}


def fingerprint(eng: Engine) -> dict[str, Any]:
    """What a caller can observe of a store: counts, generation, pending log records, files on disk."""
    st = eng.stats()
    return {"stats": {k: st[k] for k in ("generation", "items", "live_items", "users", "removed_items",
                                         "events", "pending_log_records", "index")},
            "disk": disk_state(eng.path)}


def temp_files(path: Path) -> list[str]:
    return sorted(p.name for p in Path(path).iterdir() if ".tmp-" in p.name)


def generation_files(path: Path) -> list[str]:
    return sorted(p.name for p in Path(path).iterdir() if p.name not in ("LOCK", "manifest.json"))


def env_long() -> bool:
    return os.environ.get("KINDLING_LONG", "") not in ("", "0")


WORKER = Path(__file__).resolve().parent / "rel_worker.py"


def worker_env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


class Zygote:
    """Client of rel_worker.py's fork server: real child processes without re-importing engine."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(WORKER), "zygote"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=worker_env())
        assert self.proc.stdout.readline().strip() == "zygote"

    def spawn(self, out: Path, mode: str, *args: object) -> int:
        """Fork a child running `mode`; its stdout goes to `out`, its stderr to `out`.err."""
        self.proc.stdin.write(" ".join([str(out), mode, *map(str, args)]) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


_SHARED: list[Zygote] = []


def shared_zygote() -> Zygote:
    """One fork server for the whole test session (starting one costs seconds of imports)."""
    if not _SHARED or _SHARED[0].proc.poll() is not None:
        import atexit

        _SHARED[:] = [Zygote()]
        atexit.register(_SHARED[0].close)
    return _SHARED[0]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def kill9(pid: int, timeout: float = 30.0) -> None:
    """SIGKILL a child and wait until the kernel has reaped it (its locks are gone then)."""
    os.kill(pid, signal.SIGKILL)
    stop = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > stop:
            raise AssertionError(f"process {pid} survived SIGKILL")
        time.sleep(0.002)


def wait_for_line(out: Path, prefix: str, pid: int, timeout: float = 60.0) -> None:
    stop = time.monotonic() + timeout
    while time.monotonic() < stop:
        if out.exists() and out.read_text().startswith(prefix):
            return
        if not alive(pid):
            err = Path(str(out) + ".err")
            raise AssertionError(f"worker died: {err.read_text() if err.exists() else ''}")
        time.sleep(0.003)
    raise AssertionError(f"worker never printed {prefix!r}")
