"""`kindling serve`: a real uvicorn process over a real store, talked to with httpx.

Every route, bad bodies (a 4xx naming the rule, never a traceback), the API key on writes, and
what a SIGTERM or a SIGKILL in the middle of traffic leaves in the store.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from engine import Engine  # noqa: E402

from conftest import ROOT, SLICE_MUST_HAVE  # noqa: E402
from helpers.serving import TIMEOUT, Server, free_port, serve_copy  # noqa: E402

pytestmark = pytest.mark.model  # the servers hold a store of the real model's vectors and embed with it

KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
TOY, MONSTERS, NEMO = SLICE_MUST_HAVE


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, real_store_template: Path) -> Iterator[Server]:
    """One server over a private copy of the real-model store, with an API key for writes."""
    srv = serve_copy(tmp_path_factory.mktemp("serve"), real_store_template, KEY)
    yield srv
    srv.stop()
    assert "Traceback" not in srv.output(), srv.output()


def ok(resp: httpx.Response) -> dict:
    assert resp.status_code == 200, (resp.status_code, resp.text)
    return resp.json()


def ids(data: dict) -> list[str]:
    return [r["item_id"] for r in data["items"]]


# ---- every route -----------------------------------------------------------------------------
def test_recommend_for_a_profile_then_a_click_changes_the_list(server):
    c = server.client
    first = ok(c.post("/recommend", headers=AUTH, json={
        "user_id": "alice", "k": 5, "profile": "I love animated films for children", "explain": True}))
    assert first["user"] == "alice" and len(first["items"]) == 5
    assert all(r["because"]["reason"] in ("profile", "popular", "new item") for r in first["items"])
    ok(c.post("/events", headers=AUTH, json={"user_id": "alice", "item_id": TOY, "event": "click"}))
    assert ok(c.get("/users/alice"))["history"] == [TOY]
    after = ok(c.post("/recommend", json={"user_id": "alice", "k": 5}))
    assert TOY not in ids(after) and ids(after) != ids(first)


def test_filters_diversity_and_exclude_reach_the_library(server):
    c = server.client
    data = ok(c.post("/recommend", json={"user_id": "bob", "k": 4, "categories": ["Animation"],
                                         "not_categories": ["Horror"], "diversity": 0.3, "deny": [NEMO]}))
    assert len(data["items"]) == 4 and NEMO not in ids(data)
    with Engine.open(server.store, read_only=True) as eng:
        assert all("Animation" in eng.get_item(i).categories for i in ids(data))
    only = ok(c.post("/recommend", json={"user_id": "bob", "k": 5, "allow": [TOY, NEMO], "exclude": [TOY]}))
    assert ids(only) == [NEMO]


def test_batch_returns_what_the_single_calls_return(server):
    c = server.client
    users = ["alice", "nobody-yet", "bob"]
    batch = ok(c.post("/recommend/batch", json={"user_ids": users, "k": 3, "categories": ["Comedy"]}))
    assert [u["user"] for u in batch["users"]] == users
    for entry in batch["users"]:
        single = ok(c.post("/recommend", json={"user_id": entry["user"], "k": 3, "categories": ["Comedy"]}))
        assert ids(entry) == ids(single)


def test_similar_and_get_item(server):
    c = server.client
    data = ok(c.get(f"/items/{TOY}/similar", params={"k": 3}))
    assert data["item"] == TOY and len(data["items"]) == 3 and TOY not in ids(data)
    assert ok(c.get(f"/items/{TOY}"))["title"].startswith("Toy Story")


def test_added_item_is_found_then_removed_for_good(server):
    c = server.client
    item = {"item_id": "new-1", "title": "Paws Across the Stars (2026)",
            "text": "An animated adventure: talking puppies build a rocket to the Moon.",
            "categories": ["Animation", "Children"]}
    assert ok(c.post("/items", headers=AUTH, json={"items": [item]})) == {"added": 1}
    assert ok(c.get("/items/new-1"))["categories"] == ["Animation", "Children"]
    assert ok(c.post("/recommend", json={"user_id": "carol", "k": 5, "allow": ["new-1", TOY]}))["items"]
    assert "new-1" in ids(ok(c.get(f"/items/{TOY}/similar", params={"k": 300})))
    dup = c.post("/items", headers=AUTH, json={"items": [item]})
    assert dup.status_code == 409 and "upsert" in dup.json()["detail"]
    renamed = {**item, "title": "Paws Across the Stars (2027)"}
    ok(c.post("/items", headers=AUTH, json={"items": [renamed], "upsert": True}))
    assert ok(c.get("/items/new-1"))["title"].endswith("(2027)")
    assert ok(c.delete("/items/new-1", headers=AUTH)) == {"removed": 1}
    assert c.get("/items/new-1").status_code == 404
    assert c.delete("/items/new-1", headers=AUTH).status_code == 404


def test_stats_health_metrics_and_docs(server):
    c = server.client
    stats = ok(c.get("/stats"))
    assert stats["live_items"] >= 300 and "generation" in stats
    assert ok(c.get("/healthz"))["status"] == "ok"
    text = c.get("/metrics").text
    for needle in ('kindling_request_duration_seconds_bucket{method="GET",route="/healthz",le="+Inf"}',
                   'kindling_requests_total{method="GET",route="/stats",status="200"} 1',
                   "kindling_events ", f"kindling_live_items {stats['live_items']}", "kindling_generation ",
                   f"kindling_online_steps_pending {stats['online_steps']['pending']}"):
        assert needle in text, needle
    assert c.get("/docs").status_code == 200
    paths = ok(c.get("/openapi.json"))["paths"]
    assert {"/recommend", "/recommend/batch", "/events", "/items", "/stats", "/healthz"} <= set(paths)


def test_the_playground_page_is_served_and_calls_only_the_api(server):
    resp = server.client.get("/")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    page = resp.text
    assert "<title>Kindling playground</title>" in page
    for call in ('api("POST", "recommend"', 'api("POST", "events"', 'api("POST", "items"', '"/similar?k=5"'):
        assert call in page, call
    assert "/" not in ok(server.client.get("/openapi.json"))["paths"]  # not part of the API


# ---- bad input -------------------------------------------------------------------------------
BAD = [
    ("post", "/recommend", {"user_id": "a", "k": 0}, 400, "k must be an integer between 1 and 10000"),
    ("post", "/recommend", {"user_id": "a", "k": "many"}, 422, "body.k"),
    ("post", "/recommend", {"user_id": "a", "kk": 3}, 422, "body.kk: Extra inputs are not permitted"),
    ("post", "/recommend", {"k": 3}, 422, "body.user_id: Field required"),
    ("post", "/recommend", {"user_id": " a"}, 400, "user_id must not start or end with whitespace"),
    ("post", "/recommend", {"user_id": "a", "diversity": 2}, 400, "diversity must be a number between 0 and 1"),
    ("post", "/recommend", {"user_id": "a", "allow": []}, 400, "Filter.allow must name at least one item id"),
    ("post", "/recommend", {"user_id": "a", "categories": "Comedy"}, 422, "body.categories"),
    ("post", "/recommend/batch", {"user_ids": "alice"}, 422, "body.user_ids"),
    ("post", "/events", {"user_id": "a", "item_id": "no-such-item"}, 404, "unknown item id 'no-such-item'"),
    ("post", "/events", {"user_id": "a", "item_id": TOY, "event": "like"}, 422, "body.event"),
    ("post", "/events", {"user_id": "a", "item_id": TOY, "value": "1"}, 422, "body.value"),
    ("post", "/events", {"user_id": "a", "item_id": TOY, "timestamp": 1.5}, 422, "body.timestamp"),
    ("post", "/recommend", {"user_id": "a", "explain": "yes"}, 422, "body.explain"),
    ("post", "/items", {"items": []}, 422, "body.items"),
    ("post", "/items", {"items": [{"item_id": "x", "title": " "}]}, 400, "title"),
    ("get", "/items/no-such-item/similar", None, 404, "unknown item id 'no-such-item'"),
    ("get", f"/items/{TOY}/similar?k=0", None, 400, "k must be an integer between 1 and 10000"),
    ("get", "/users/no-such-user", None, 404, "unknown user id 'no-such-user'"),
    ("delete", "/items/no-such-item", None, 404, "unknown item id"),
    ("get", "/no-such-route", None, 404, "Not Found"),
]


@pytest.mark.parametrize("method,url,body,status,rule", BAD, ids=[f"{m} {u} {s}" for m, u, _, s, _ in BAD])
def test_bad_input_is_a_4xx_that_names_the_rule(server, method, url, body, status, rule):
    kwargs = {"headers": AUTH} if body is None else {"headers": AUTH, "json": body}
    resp = server.client.request(method.upper(), url, **kwargs)
    assert resp.status_code == status, resp.text
    assert rule in resp.json()["detail"]
    assert "Traceback" not in resp.text


def test_malformed_json_and_a_body_too_large(server):
    c = server.client
    resp = c.post("/recommend", content=b'{"user_id": ', headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "valid JSON" in resp.json()["detail"]
    nan = f'{{"user_id": "a", "item_id": "{TOY}", "value": NaN}}'.encode()  # Python's JSON reads NaN
    resp = c.post("/events", content=nan, headers={**AUTH, "content-type": "application/json"})
    assert resp.status_code == 400 and "value must be a finite number" in resp.json()["detail"]
    big = {"items": [{"item_id": f"b{i}", "title": "t", "text": "x" * 100_000} for i in range(50)]}
    resp = c.post("/items", headers=AUTH, json=big)
    assert resp.status_code == 413 and "at most" in resp.json()["detail"]

    def chunks():  # no Content-Length: the limit holds while the body streams in
        yield b'{"items": ['
        for _ in range(60):
            yield b'{"item_id": "c", "title": "t", "text": "' + b"x" * 100_000 + b'"},'
    resp = c.post("/items", headers={**AUTH, "content-type": "application/json"}, content=chunks())
    assert resp.status_code == 413


def test_every_engine_error_class_has_its_status():
    from engine import errors as engine_errors
    from engine.http.errors import status_of

    expected = {"DuplicateItemError": 409, "UnknownItemError": 404, "UnknownUserError": 404,
                "InvalidInputError": 400, "StoreError": 503, "CorruptStoreError": 503,
                "StoreLockedError": 503, "ReadOnlyStoreError": 403, "ModelLoadError": 500, "EngineError": 500,
                "ClusterError": 503, "MissingExtraError": 500}
    classes = {c.__name__: c for c in vars(engine_errors).values()
               if isinstance(c, type) and issubclass(c, engine_errors.EngineError)}
    assert set(classes) == set(expected)  # a new error class gets a status here
    assert {name: status_of(cls("x")) for name, cls in classes.items()} == expected


def test_metrics_histogram_is_cumulative():
    from engine.http.metrics import Metrics

    m = Metrics()
    for seconds in (0.0005, 0.003, 0.003, 20.0):
        m.observe("GET", "/stats", 200, seconds)
    text = m.render({"events": 1, "live_items": 2, "users": 3, "generation": 4, "pending_log_records": 5,
                     "trained": False, "online_steps": {"pending": 6, "lag_ms_p99": 250.0}})
    for line in ("kindling_online_steps_pending 6", "kindling_online_step_lag_p99_seconds 0.25",
                 'route="/stats",le="0.001"} 1', 'route="/stats",le="0.005"} 3', 'route="/stats",le="10.0"} 3',
                 'route="/stats",le="+Inf"} 4', 'kindling_request_duration_seconds_count{method="GET",'
                 'route="/stats"} 4', "kindling_generation 4", "kindling_trained 0"):
        assert line in text, line


# ---- the API key -----------------------------------------------------------------------------
WRITES = [("post", "/events", {"user_id": "a", "item_id": TOY}),
          ("post", "/items", {"items": [{"item_id": "k1", "title": "Keyed"}]}),
          ("delete", f"/items/{TOY}", None),
          ("post", "/recommend", {"user_id": "a", "profile": "saved with the user, so a write"})]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key-0123456789"},
                                     {"Authorization": KEY}], ids=["none", "wrong", "no-scheme"])
def test_writes_need_the_key_and_reads_stay_open(server, headers):
    c = server.client
    for method, url, body in WRITES:
        resp = c.request(method.upper(), url, headers=headers, json=body)
        assert resp.status_code == 401, (url, resp.text)
        assert "Bearer" in resp.json()["detail"] and resp.headers["www-authenticate"] == "Bearer"
    assert TOY in ok(c.get("/items/" + TOY))["item_id"]  # the DELETE did not happen
    for url in ("/stats", "/healthz", "/metrics", f"/items/{TOY}/similar"):
        assert c.get(url, headers=headers).status_code == 200, url
    assert c.post("/recommend", headers=headers, json={"user_id": "a", "k": 2}).status_code == 200


# ---- shutdown and crash ----------------------------------------------------------------------
def traffic(url: str, tag: str, acked: list[tuple[str, str]], stop: threading.Event) -> None:
    """POST clicks until the server goes away; `acked` gets every (user, item) answered with 200."""
    items = [TOY, MONSTERS, NEMO]
    with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        n = 0
        while not stop.is_set():
            user, item = f"{tag}-{n}", items[n % 3]
            try:
                resp = c.post("/events", json={"user_id": user, "item_id": item})
            except httpx.TransportError:
                return
            if resp.status_code == 200:
                acked.append((user, item))
            n += 1


def under_traffic(srv: Server, sig: int, tmp_path: Path) -> tuple[list[tuple[str, str]], int]:
    acked: list[tuple[str, str]] = []
    stop = threading.Event()
    threads = [threading.Thread(target=traffic, args=(srv.url, f"t{i}", acked, stop)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    code = srv.stop(sig)
    stop.set()
    for t in threads:
        t.join(60)
    assert len(acked) >= 40, srv.output()
    return acked, code


def assert_all_held(store: Path, acked: list[tuple[str, str]]) -> None:
    with Engine.open(store, read_only=True) as eng:
        for user, item in acked:
            assert eng.user_history(user) == [item], user


@pytest.fixture
def fresh(tmp_path: Path, real_store_template: Path) -> Path:
    shutil.copytree(real_store_template, tmp_path / "store")
    return tmp_path / "store"


def test_sigterm_mid_traffic_answers_in_flight_requests_then_saves(fresh, tmp_path):
    srv = Server(fresh, tmp_path / "server.log")
    before = ok(srv.client.get("/stats"))["generation"]
    acked, code = under_traffic(srv, signal.SIGTERM, tmp_path)
    assert code in (0, -signal.SIGTERM), srv.output()
    assert "Traceback" not in srv.output(), srv.output()
    assert_all_held(fresh, acked)
    with Engine.open(fresh, read_only=True) as eng:
        stats = eng.stats()
    assert stats["generation"] == before + 1 and stats["pending_log_records"] == 0  # closed with a save


def test_sigkill_mid_traffic_loses_nothing_acknowledged(fresh, tmp_path):
    srv = Server(fresh, tmp_path / "server.log")
    acked, code = under_traffic(srv, signal.SIGKILL, tmp_path)
    assert code == -signal.SIGKILL
    again = Server(fresh, tmp_path / "server2.log")  # the lock died with the process
    try:
        for user, item in acked:
            assert ok(again.client.get(f"/users/{user}"))["history"] == [item], user
    finally:
        again.stop()
    assert_all_held(fresh, acked)


def test_a_second_server_on_the_same_store_fails_cleanly(server, tmp_path):
    port = str(free_port())
    out = subprocess.run([sys.executable, "-m", "engine.cli", "serve", str(server.store), "--port", port],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("Error: ") and "lock" in out.stderr.lower()


def test_a_short_api_key_is_refused(tmp_path, real_store_template):
    (tmp_path / "key").write_text("short\n")
    out = subprocess.run([sys.executable, "-m", "engine.cli", "serve", str(real_store_template),
                          "--api-key-file", str(tmp_path / "key")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 1 and "at least 16 characters" in out.stderr and "Traceback" not in out.stderr
