"""A `kindling serve` subprocess for tests: started on a free port, ready when /healthz answers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
#: The first profile or item embeds text in the server: it loads the model then (seconds).
TIMEOUT = httpx.Timeout(180.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, client: httpx.Client, output: Callable[[], str],
               limit_s: float = 120.0) -> None:
    """Return once the server `proc` answers GET /healthz with 200 through `client`; fail with its
    `output()` if it exits first or is not ready after `limit_s`."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{output()}")
        try:
            if client.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"server not ready after {limit_s}s:\n{output()}")


class Server:
    """`python -m engine.cli serve STORE` in a subprocess, its log in a file."""

    def __init__(self, store: Path, log: Path, key_file: Path | None = None, extra: list[str] | None = None) -> None:
        self.store, self.log_path, self.port = store, log, free_port()
        args = [sys.executable, "-m", "engine.cli", "serve", str(store), "--port", str(self.port), *(extra or [])]
        if key_file is not None:
            args += ["--api-key-file", str(key_file)]
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=TIMEOUT)
        self._wait_ready()

    def _wait_ready(self, limit_s: float = 120.0) -> None:
        wait_ready(self.proc, self.client, self.output, limit_s)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.client.close()
        self.log.close()
        return code


def serve_copy(root: Path, template: Path, key: str | None = None) -> Server:
    """A server over a private copy of the store `template` made in `root`, with `key` for writes."""
    shutil.copytree(template, root / "store")
    key_file = None
    if key is not None:
        key_file = root / "key"
        key_file.write_text(key + "\n")
    return Server(root / "store", root / "server.log", key_file)
