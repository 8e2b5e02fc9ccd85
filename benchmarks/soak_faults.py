"""The soak's faults (benchmarks/soak.py) beyond a plain SIGKILL: a torn log tail, a saver and a
closing writer killed mid-save, and a disk that fills up (in a private mount namespace)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from soak_checks import open_ro
from soak_rig import ENV, ITEMS, PY, ROOT, T0, Proc, free_port, http_ready, make_store

from engine.storage.eventlog import HEADER, _crc, read_log


def tear(store: Path, rng: random.Random) -> int:
    """Append part of a would-be next record to the store's log: a crash mid-append. Bytes written."""
    manifest = json.loads((store / "manifest.json").read_text())
    log = store / manifest["log"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recs = list(read_log(log, first_seq=manifest.get("next_seq")))
    seq = recs[-1][0] + 1 if recs else manifest.get("next_seq", 0)
    payload = json.dumps({"op": "event", "u": "torn", "i": ITEMS[0], "e": "click", "v": 1.0, "t": 1}).encode()
    blob = HEADER.pack(len(payload), _crc(seq, payload), seq) + payload
    cut = rng.randrange(1, len(blob))
    if not log.exists():
        raise RuntimeError(f"no log {log} to tear")
    with open(log, "ab") as f:
        f.write(blob[:cut])
    return cut


SAVER = """
import sys, time, warnings
warnings.simplefilter("ignore")
from engine import Engine
eng = Engine.open(sys.argv[1])
print("open", flush=True)
t = time.monotonic()
eng.save()
print("saved", time.monotonic() - t, flush=True)
eng.close(save=False)
"""


def run_saver(store: Path, rng: random.Random, est: list[float], log: Path, finish: bool) -> str:
    """Open `store` for writing and save; SIGKILL the saver at a random moment of its save (within
    1.3 times the last save's time), or let it `finish`, which keeps the log and that time current."""
    with open(log, "ab") as err:
        p = subprocess.Popen([PY, "-c", SAVER, str(store)], cwd=ROOT, stdout=subprocess.PIPE, stderr=err,
                             env=ENV, text=True)
    line = p.stdout.readline()
    if line.strip() != "open":
        p.wait(60)
        raise RuntimeError(f"saver failed to open {store}: {line!r}")
    if not finish:
        time.sleep(rng.uniform(0.0, 1.3 * est[-1]))
        p.send_signal(signal.SIGKILL)
    rest = p.stdout.read()
    p.wait(60)
    if rest.startswith("saved"):
        est.append(float(rest.split()[1]))
        return "finished"
    return "killed"


def kill_closing(writer: Proc, rng: random.Random, est: list[float], finish: bool) -> str:
    """SIGTERM the writer (it finishes, then saves a snapshot); SIGKILL it at a random moment of
    that (within 1.3 times the last clean stop's time), or let it `finish`."""
    t = time.monotonic()
    writer.proc.send_signal(signal.SIGTERM)
    deadline = t + (120.0 if finish else rng.uniform(0.0, 1.3 * est[-1]))
    while time.monotonic() < deadline and writer.proc.poll() is None:
        time.sleep(0.002)
    if writer.proc.poll() is not None:
        est.append(time.monotonic() - t)
        return "finished"
    writer.kill()
    return "killed"


def disk_full(root: Path) -> dict:
    """The disk-full phase: `disk_full_inside` in a private mount namespace on a 2 MiB tmpfs."""
    if shutil.which("unshare") is None:
        return {"skipped": "no unshare(1) here"}
    mnt = root / "full"
    mnt.mkdir(exist_ok=True)
    script = f"mount -t tmpfs -o size=2m tmpfs {mnt} && exec {PY} {ROOT / 'benchmarks' / 'soak.py'} disk-full {mnt}"
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                       capture_output=True, text=True, timeout=300, env=ENV)
    if r.returncode != 0 and "mount" in r.stderr and not r.stdout.strip():
        return {"skipped": f"unprivileged mount namespaces are not available: {r.stderr.strip()[-200:]}"}
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"failures": [f"exit {r.returncode}: {r.stderr[-1500:]}"]}


def fill(path: Path) -> None:
    with open(path, "ab", buffering=0) as f:
        try:
            while True:
                f.write(b"\xff" * 4096)
        except OSError:
            pass


def disk_full_inside(mnt: Path) -> int:
    """Serve a store on a full tmpfs: writes refused with the reason, reads answered, nothing
    acknowledged lost; then SIGKILL, space back, restart: every acked event there once; a clean stop."""
    store, failures, statuses, acked = mnt / "store", [], Counter(), []
    make_store(store)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    service = Proc("service", [PY, "-m", "engine.cli", "serve", str(store), "--port", str(port)],
                   Path(tempfile.gettempdir()) / f"soak-full-{os.getpid()}.log", http_ready(url))
    service.start()
    client, t = httpx.Client(base_url=url, timeout=30.0), T0

    def send(n: int, user: str) -> None:
        nonlocal t
        for _ in range(n):
            t += 1
            item = ITEMS[t % len(ITEMS)]
            r = client.post("/events", json={"user_id": user, "item_id": item, "timestamp": t})
            statuses[r.status_code] += 1
            if r.status_code == 200:
                acked.append((user, item))
            elif "No space left" not in r.text:
                failures.append(f"a refused write does not say why: {r.status_code} {r.text[:200]}")

    send(20, "before")
    filler = mnt / "filler"
    fill(filler)
    send(50, "full")
    refused_full = sum(v for k, v in statuses.items() if k != 200)
    if client.get("/healthz").status_code != 200 or client.get("/users/before").status_code != 200:
        failures.append("reads stopped while the disk was full")
    os.truncate(filler, max(0, filler.stat().st_size - 64 * 1024))  # room for log records, not a snapshot
    send(50, "some")
    service.kill()  # SIGKILL, still short of space: the restart replays the log on a full disk
    service.start()
    send(30, "full-again")
    service.kill(signal.SIGTERM)  # its closing snapshot may not fit: it must still lose nothing
    closed_full = service.proc.returncode
    filler.unlink()
    service.start()
    send(20, "after")
    service.kill(signal.SIGTERM)  # the closing snapshot, with space again
    if service.proc.returncode not in (0, -signal.SIGTERM) or closed_full not in (0, 1, -signal.SIGTERM):
        failures.append(f"the service stopped with {closed_full}, then {service.proc.returncode}")
    eng = open_ro(store)
    want: dict[str, list[str]] = {}
    for user, item in acked:
        want.setdefault(user, []).append(item)
    lost = dup = 0
    for user, items in want.items():
        got = eng.user_history(user)
        lost += sum(max(0, c - Counter(got)[i]) for i, c in Counter(items).items())
        dup += max(0, len(got) - len(items))
    if eng.stats()["pending_log_records"]:
        failures.append("the closing snapshot with space again was not written")
    if len(eng._core.state.users) != len(want):
        failures.append(f"{len(eng._core.state.users)} users stored, {len(want)} with acknowledged events")
    eng.close()
    if lost or dup:
        failures.append(f"{lost} acknowledged events lost, {dup} duplicated")
    if not refused_full:
        failures.append("nothing was refused on a full disk")
    print(json.dumps({"statuses": {str(k): v for k, v in statuses.items()}, "acked": len(acked),
                      "exit_of_a_stop_short_of_space": closed_full,
                      "refused_while_full": refused_full, "lost": lost, "duplicated": dup, "failures": failures}))
    return 0

