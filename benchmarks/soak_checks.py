"""The soak's checks (benchmarks/soak.py): what a store must hold after a restart and whether it
does; whether the replicas and the stream consumer have caught up."""

from __future__ import annotations

import json
import time
import warnings
from collections import Counter
from pathlib import Path

import httpx
from soak_rig import ITEMS, Sent

from engine import Engine
from engine.storage.records import EventRecord


class Expected:
    """What a store must hold, kept up to date check by check: per user (clicks, skip counts) and
    per (item, kind) counts. Each event is judged once, at the first check after it was answered."""

    def __init__(self) -> None:
        self.hist: dict[str, tuple[list[str], Counter]] = {}
        self.items: Counter = Counter()
        self.tally: Counter = Counter()
        self.seen: dict[int, int] = {}

    def add(self, user: str, item: str, kind: str) -> None:
        clicks, skips = self.hist.setdefault(user, ([], Counter()))
        (clicks.append(item) if kind == "click" else skips.update([item]))
        self.items[(item, kind)] += 1

    def http(self, eng: Engine, sent: list[Sent]) -> None:
        """The clients' new events: acked ones must be there; one in doubt (the server died before
        answering) may be there or not; refused or unsent ones must not."""
        keys = eng._core.state.event_keys
        for c, s in enumerate(sent):
            start, events = self.seen.get(c, 0), s.events[:]
            self.seen[c] = len(events)
            for user, item, kind, t, outcome in events[start:]:
                present = EventRecord(user, item, kind, 1.0, t).key() in keys
                self.tally[outcome] += 1
                if outcome == "acked" and not present:
                    self.tally["lost"] += 1
                elif outcome == "doubt" and present:
                    self.tally["doubt_applied"] += 1
                elif outcome not in ("acked", "doubt") and present:
                    self.tally["phantom"] += 1
                if present:
                    self.add(user, item, kind)

    def stream(self, entries: list[dict[str, str]]) -> None:
        """Every XADDed entry, once."""
        start = self.seen.get(-1, 0)
        self.seen[-1] = len(entries)
        for e in entries[start:]:
            self.add(e["user_id"], e["item_id"], e["event"])


def compare(eng: Engine, hist: dict, items: Counter) -> tuple[list[str], int]:
    """Mismatches between the store and the expectation, and events the store holds twice or more."""
    st, problems, dup = eng._core.state, [], 0
    for user, (clicks, skips) in hist.items():
        u = st.users.get(user)
        got_c = [] if u is None else [st.items.vocab.id(r) for r in u.clicks]
        got_s = Counter() if u is None else Counter(st.items.vocab.id(r) for r in u.skips)
        if got_c != clicks or got_s != skips:
            dup += max(0, len(got_c) + sum(got_s.values()) - len(clicks) - sum(skips.values()))
            problems.append(f"user {user}: clicks {got_c[-5:]}.. ({len(got_c)}) vs {clicks[-5:]}.. ({len(clicks)})")
    if len(st.users) != len(hist):
        problems.append(f"{len(st.users)} users stored, {len(hist)} expected")
    for item in ITEMS:
        row = st.items.live_row(item)
        for kind, arr in (("click", st.items.clicks), ("skip", st.items.skips)):
            if row is None or arr[row] != items[(item, kind)]:
                problems.append(f"item {item} {kind}s {None if row is None else arr[row]} vs {items[(item, kind)]}")
    return problems, dup


def replica_converges(url: str, hist: dict, events: int, limit_s: float = 20.0) -> tuple[bool, float]:
    """Wait until the replica holds `events` events and every user's history in `hist`; (converged, s)."""
    t, client = time.monotonic(), httpx.Client(base_url=url, timeout=10.0)
    todo = dict(hist)
    try:
        while time.monotonic() - t < limit_s:
            try:
                if client.get("/stats").json()["events"] != events:
                    time.sleep(0.05)
                    continue
            except (httpx.TransportError, ValueError, KeyError):
                time.sleep(0.1)
                continue
            for user in list(todo):
                try:
                    r = client.get(f"/users/{user}")
                except httpx.TransportError:
                    break
                if r.status_code == 200 and r.json()["history"] == todo[user][0]:
                    del todo[user]
                elif r.status_code == 404 and not todo[user][0]:
                    del todo[user]
            if not todo:
                return True, time.monotonic() - t
            time.sleep(0.05)
        return False, time.monotonic() - t
    finally:
        client.close()


def open_ro(path: Path) -> Engine:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a torn tail left for the writer to cut warns
        return Engine.open(path, read_only=True)


def consumer_passed(redis, stream: str, group: str, last: bytes) -> bool:
    """The group has delivered `last` and holds no unacked entry up to it."""
    info = redis.xinfo_groups(stream)[0]
    delivered = tuple(map(int, info["last-delivered-id"].split(b"-")))
    if delivered < tuple(map(int, last.split(b"-"))):
        return False
    return not redis.xpending_range(stream, group, min="-", max=last, count=1)


def consumer_caught_up(redis, stream: str, group: str) -> bool:
    try:
        info = redis.xinfo_groups(stream)
    except Exception:  # noqa: BLE001
        return False
    last = redis.xrevrange(stream, count=1)
    return bool(info) and bool(last) and info[0]["pending"] == 0 and info[0]["last-delivered-id"] == last[0][0]


def stray_files(store: Path) -> bool:
    """Files a save left half-done: temp files or another generation's (the next writer removes them)."""
    manifest = json.loads((store / "manifest.json").read_text())
    named = {Path(f).name for f in manifest.get("files", {})} | {"manifest.json", "LOCK"}
    named.add(manifest["log"])
    return any(p.name not in named and not p.name.startswith("encoder") for p in store.iterdir())


def wait_for(cond, limit_s: float) -> bool:
    t = time.monotonic()
    while time.monotonic() - t < limit_s:
        if cond():
            return True
        time.sleep(0.02)
    return False

