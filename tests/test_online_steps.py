"""The reranker's online step off the `record` path: the step worker, its log records, and the
replay that takes the same steps from the same state (state/apply.py, "Deferred steps")."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

from engine import Config, Engine
from engine.storage.eventlog import read_log
from engine.storage.store import StoreDir

from conftest import FakeEncoder
from test_learning import build
from test_replica import follow, wait_until

ROOT = Path(__file__).resolve().parent.parent
CONFIG = Config(explore=False, proj_epochs=5, proj_dim=16, rerank_epochs=2, fsync=False)
USERS = [f"u{u}" for u in range(0, 60, 7)] + ["newbie"]


def clicks_among_candidates(eng: Engine, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(user, item) clicks on items of the user's own top 10, so that most take a step."""
    rng = np.random.default_rng(seed)
    out = []
    for j in range(n):
        user = f"u{int(rng.integers(60))}" if j % 5 else f"fresh{j}"
        recs = eng.recommend(user, k=10)
        out.append((user, recs[int(rng.integers(len(recs)))].item_id))
    return out


def answers(eng: Engine) -> dict[str, object]:
    """The ranked lists with their scores, and the reranker's weights and step count (the lists
    of this small catalog may not show a step: a bucket can rank by one signal)."""
    rr = eng._core.state.ranker.reranker
    return {"lists": {u: [(r.item_id, r.score) for r in eng.recommend(u, k=10)] for u in USERS},
            "steps": rr.steps, "weights": {k: v.tobytes() for k, v in rr.weights.items()}}


def log_records(path: Path) -> list[dict]:
    manifest = StoreDir(path, read_only=True).read_manifest()
    return [p for _, p in read_log(path / manifest["log"], repair=False, first_seq=manifest["next_seq"])]


def one_step_record_per_click(records: list[dict]) -> None:
    from engine.storage.records import from_payload

    clicks = [from_payload(p, None, "log").key() for p in records if p["op"] == "event" and p["e"] == "click"]
    steps = [p["k"] for p in records if p["op"] == "step"]
    assert sorted(steps) == sorted(clicks)  # (two clicks of a user on an item in one second: one key)
    assert any(p["s"] for p in records if p["op"] == "step")  # steps were taken, not only found empty


def test_record_leaves_the_step_to_the_worker_and_a_reopen_takes_the_same_steps(tmp_path: Path) -> None:
    eng, _ = build(tmp_path, "s", CONFIG)
    fitted = answers(eng)
    plan = clicks_among_candidates(eng, 40)
    done = threading.Event()

    def read_meanwhile() -> None:  # requests score while the worker swaps weights in
        while not done.is_set():
            eng.recommend("u1", k=10)

    reader = threading.Thread(target=read_meanwhile)
    reader.start()
    try:
        for user, item in plan:  # the worker steps when it can: no settle between clicks
            eng.record(user, item, "click")
    finally:
        done.set()
        reader.join()
    eng.settle()
    report = eng.stats()["online_steps"]
    assert report["pending"] == 0 and report["lag_of_last"] == len(plan)
    live = answers(eng)
    assert live["weights"] != fitted["weights"] and live["steps"] > fitted["steps"]
    eng.close(save=False)  # the clicks and their step records stay in the log

    one_step_record_per_click(log_records(tmp_path / "s"))
    again = Engine.open(tmp_path / "s", encoder=FakeEncoder(dim=512))
    assert again.stats()["online_steps"]["pending"] == 0
    assert answers(again) == live  # the same steps, from the same states: the same weights
    again.close()
    saved = Engine.open(tmp_path / "s", encoder=FakeEncoder(dim=512))
    assert answers(saved) == live and saved.stats()["pending_log_records"] == 0
    saved.close(save=False)


def test_settle_takes_every_waiting_step_and_the_result_does_not_depend_on_timing(tmp_path: Path) -> None:
    a, _ = build(tmp_path, "a", CONFIG)
    b, _ = build(tmp_path, "b", CONFIG)
    plan = clicks_among_candidates(a, 25, seed=3)
    for user, item in plan:
        a.record(user, item, "click")
        a.settle()
        b.record(user, item, "click")
        b.settle()
        time.sleep(0.002)  # b's worker may have stepped already: settle then finds nothing
    assert answers(a) == answers(b)
    a.close(save=False)
    b.close(save=False)


def test_a_killed_writer_loses_no_step(tmp_path: Path) -> None:
    eng, _ = build(tmp_path, "s", CONFIG)
    plan = clicks_among_candidates(eng, 60, seed=5)
    eng.close()
    child = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from engine import Engine
        from conftest import FakeEncoder
        eng = Engine.open({str(tmp_path / "s")!r}, encoder=FakeEncoder(dim=512))
        for user, item in {plan!r}:
            eng.record(user, item, "click")
        os.kill(os.getpid(), signal.SIGKILL)  # the worker is behind: some clicks have no step record
    """)
    proc = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    before = log_records(tmp_path / "s")
    assert sum(p["op"] == "event" for p in before) == len(plan)
    assert sum(p["op"] == "step" for p in before) < len(plan)  # the kill left clicks without a step

    again = Engine.open(tmp_path / "s", encoder=FakeEncoder(dim=512))
    again.settle()
    assert again.stats()["online_steps"]["pending"] == 0
    stepped = answers(again)
    again.close(save=False)
    one_step_record_per_click(log_records(tmp_path / "s"))  # each click decided once, none lost
    third = Engine.open(tmp_path / "s", encoder=FakeEncoder(dim=512))
    assert answers(third) == stepped
    third.close(save=False)


def test_a_log_from_before_deferred_steps_replays_with_the_step_inside_the_event(tmp_path: Path) -> None:
    eng, _ = build(tmp_path, "s", CONFIG)
    store = StoreDir(tmp_path / "s", read_only=True)
    manifest = store.read_manifest()
    assert manifest["online_steps"] == "deferred"
    eng._core.state.deferred_steps = False  # writes as the engine before deferred steps did
    for user, item in clicks_among_candidates(eng, 20, seed=9):
        eng.record(user, item, "click")
    assert eng.stats()["online_steps"]["pending"] == 0
    inline = answers(eng)
    eng.close(save=False)
    assert not any(p["op"] == "step" for p in log_records(tmp_path / "s"))
    old = {k: v for k, v in manifest.items() if k not in ("online_steps", "checksum")}
    StoreDir(tmp_path / "s").write_manifest(old)  # the manifest as that engine wrote it

    again = Engine.open(tmp_path / "s", encoder=FakeEncoder(dim=512))
    assert answers(again) == inline
    again.save()
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["online_steps"] == "deferred"
    again.record("u3", again.recommend("u3", k=1)[0].item_id, "click")
    again.settle()
    assert any(p["op"] == "step" for p in log_records(tmp_path / "s"))
    again.close(save=False)


def test_a_replica_takes_the_writers_steps(tmp_path: Path) -> None:
    eng, _ = build(tmp_path, "s", CONFIG)
    eng.save()
    replica = follow(tmp_path / "s")
    try:
        for user, item in clicks_among_candidates(eng, 30, seed=11):
            eng.record(user, item, "click")
        eng.settle()
        last = StoreDir(tmp_path / "s", read_only=True).read_manifest()["next_seq"] + eng.stats()["pending_log_records"] - 1
        wait_until(lambda: replica.replica_lag()["applied_seq"] == last, "the replica caught up")
        assert answers(replica) == answers(eng)
    finally:
        replica.close()
        eng.close(save=False)


def test_the_step_reads_the_features_as_they_stood_before_its_click(tmp_path: Path) -> None:
    from engine.runtime.state import before_click

    eng, _ = build(tmp_path, "s", CONFIG)
    st = eng._core.state
    checked = 0
    for user_id in ("u2", "u5", "u9"):
        user = st.users.get_or_create(user_id)
        then = before_click(user)
        seen = np.array(sorted(then.seen()), np.int64)
        cand = st.ranker.candidates(then, st.index, seen, refresh=True)
        before = st.ranker.raw_features(then, cand)
        row = int(cand[np.argmax(before[:, 2])])  # the most co-clicked candidate: its pairs count
        assert before[cand == row, 2] > 0
        eng.record(user_id, st.items.item(row).item_id, "click")
        eng.settle()
        again = st.ranker.candidates(then, st.index, seen, refresh=True, before_click=row)
        np.testing.assert_array_equal(again, cand)  # its own click brings no row in, none out
        after = st.ranker.features.raw(then, cand, st.ranker.profile_weight, before_click=row)
        np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
        moved = st.ranker.raw_features(then, cand)  # without the correction the click shows
        assert not np.allclose(moved[cand == row], before[cand == row])
        checked += 1
    assert checked == 3
    eng.close(save=False)
