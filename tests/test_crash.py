"""An acknowledged event survives SIGKILL: real subprocesses, killed the moment they say it is recorded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine import Engine

from conftest import FakeEncoder

KINDLING = Path(sys.executable).parent / "kindling"
TIMEOUT = 60


@pytest.fixture
def store(small_store_path: Path) -> Path:
    return small_store_path


def _kill_when(proc: subprocess.Popen, marker: str) -> list[str]:
    """Read stdout until a line containing `marker`, then SIGKILL the process at once."""
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line.strip())
            if marker in line:
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=TIMEOUT)
    return seen


def _history(store: Path, user: str) -> list[str]:
    with Engine.open(store, encoder=FakeEncoder(), read_only=True) as eng:
        return eng.user_history(user)


def test_kindling_feedback_killed_right_after_it_returns(store):
    proc = subprocess.Popen([str(KINDLING), "feedback", str(store), "--user", "u1", "--item", "space-1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = _kill_when(proc, "recorded click")
    assert seen and "recorded click of u1 on space-1" in seen[-1], (seen, proc.stderr.read())
    assert _history(store, "u1") == ["space-1"]
    # and the store is writable again: the killed writer's lock died with it
    with Engine.open(store, encoder=FakeEncoder()) as eng:
        eng.record("u1", "space-2", "click")
    assert _history(store, "u1") == ["space-1", "space-2"]


WORKER = textwrap.dedent("""
    import sys, time
    from engine import Engine
    eng = Engine.open(sys.argv[1])                      # writable; never saved, never closed
    for n in range(int(sys.argv[2])):
        eng.record("u2", ["food-0", "food-1", "food-2", "ball-0"][n % 4], "click")
        print(f"acked {n}", flush=True)
    time.sleep(120)
""")


def test_library_process_killed_after_acks_loses_nothing(store):
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(store), "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = _kill_when(proc, "acked 0")
    assert seen == ["acked 0"], proc.stderr.read()
    assert proc.returncode == -signal.SIGKILL
    assert _history(store, "u2") == ["food-0"]


def test_killed_mid_stream_keeps_every_acknowledged_event(store):
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(store), "400"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = _kill_when(proc, "acked 25")
    assert seen[-1] == "acked 25", proc.stderr.read()
    history = _history(store, "u2")
    # every event acknowledged before the kill is there; one in flight may or may not be
    assert len(history) >= 26
    assert history[:26] == [["food-0", "food-1", "food-2", "ball-0"][n % 4] for n in range(26)]
    with Engine.open(store, encoder=FakeEncoder()) as eng:  # the log is whole: it opens for writing
        assert eng.stats()["events"] == len(history)
