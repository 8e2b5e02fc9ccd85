"""Subprocess worker for the reliability tests (crash, lock and reader-vs-writer tests).

    python rel_worker.py crash STORE SEED TAG   mutate and save forever, printing an ack line after
                                                 each call returns (the parent SIGKILLs it)
    python rel_worker.py hold STORE              open for writing, print "ready", sleep
    python rel_worker.py saver STORE SECONDS     record and save in a loop (a writer for readers to race)
    python rel_worker.py zygote                  a fork server: each stdin line "OUT MODE ARGS..." forks a
                                                 child running MODE with stdout to OUT; prints its pid

The fork server exists because `import engine` takes seconds (torch); forking a process that has
imported but not run anything gives a fresh, real process per crash in milliseconds.

Ack lines: "E user item" after record() returned; "S"/"s" around save(); "I name"/"i name" around
ingest() of batch `name`; "R name"/"r name" around remove_items() of that batch.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rel_fakes import FakeEncoder, items  # noqa: E402

from engine import Engine  # noqa: E402

BASE = 200  # the parent creates items base0..base199 and never removes them
BATCH = 30


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def crash(store: str, seed: int, tag: str) -> None:
    rng = random.Random(seed)
    eng = Engine.open(store, encoder=FakeEncoder())
    say("ready")
    acked: list[str] = []
    n = 0
    while True:
        r = rng.random()
        if r < 0.35:
            for _ in range(4):
                user, item = f"{tag}-u{rng.randrange(3)}", f"base{rng.randrange(BASE)}"
                eng.record(user, item)
                say(f"E {user} {item}")
        elif r < 0.6:
            say("S")
            eng.save()
            say("s")
        elif r < 0.9 or not acked:
            name = f"{tag}-b{n}-"
            n += 1
            say(f"I {name}")
            eng.ingest(items(name, BATCH), progress=False)
            say(f"i {name}")
            acked.append(name)
        else:
            name = acked.pop(rng.randrange(len(acked)))
            say(f"R {name}")
            eng.remove_items([f"{name}{i}" for i in range(BATCH)])
            say(f"r {name}")


def hold(store: str) -> None:
    eng = Engine.open(store, encoder=FakeEncoder())
    say("ready")
    time.sleep(600)
    eng.close()


def saver(store: str, seconds: float) -> None:
    eng = Engine.open(store, encoder=FakeEncoder())
    say("ready")
    stop, n = time.monotonic() + seconds, 0
    while time.monotonic() < stop:
        eng.record(f"w{n % 5}", f"base{n % BASE}")
        eng.save()
        n += 1
    eng.close()
    say(f"saves {n}")


def zygote() -> None:
    import os
    import signal
    import traceback

    import tempfile

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    with tempfile.TemporaryDirectory() as tmp:  # warm up: the first Engine pays the lazy imports
        eng = Engine.create(Path(tmp) / "warm", encoder=FakeEncoder())
        eng.add_items(items("w", 3))
        eng.recommend("u", k=2)
        eng.close()
    say("zygote")
    for line in iter(sys.stdin.readline, ""):
        out, mode, *args = line.split()
        pid = os.fork()
        if pid:
            say(str(pid))
            continue
        code = 1
        try:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            err = os.open(out + ".err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(err, 2)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            run(mode, args)
            code = 0
        except BaseException:  # noqa: BLE001 - report, then leave without returning to the loop
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(code)


def run(mode: str, args: list[str]) -> None:
    if mode == "crash":
        crash(args[0], int(args[1]), args[2])
    elif mode == "hold":
        hold(args[0])
    elif mode == "saver":
        saver(args[0], float(args[1]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    if sys.argv[1] == "zygote":
        zygote()
    else:
        run(sys.argv[1], sys.argv[2:])

