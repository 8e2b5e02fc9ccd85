"""Micro-batching of /recommend (engine/http/batching.py): concurrent calls answered by one
`recommend_many`, each with exactly the list its single call gives; an error reaches only the
call that caused it. The batcher over a real engine, then a real `kindling serve` process."""

from __future__ import annotations

import asyncio
import re
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from engine import Engine, Filter, InvalidInputError, Item  # noqa: E402
from engine.http.batching import Options, RecommendBatcher  # noqa: E402

from helpers.serving import Server  # noqa: E402

USERS = [f"u{u}" for u in range(12)] + ["nobody", "u3"]


def make_store(path: Path, encoder, rng: np.random.Generator) -> None:
    with Engine.create(path, encoder=encoder) as eng:
        vecs = rng.standard_normal((150, encoder.dim)).astype(np.float32)
        eng.add_items([Item(f"i{n}", f"Item {n}", categories=(f"c{n % 3}",)) for n in range(150)],
                      vectors=vecs / np.linalg.norm(vecs, axis=1, keepdims=True))
        for u in range(12):
            for n in rng.choice(150, size=1 + u, replace=False):
                eng.record(f"u{u}", f"i{n}", "click" if n % 4 else "skip")


@pytest.fixture
def store(tmp_path, fake_encoder, rng) -> Path:
    make_store(tmp_path / "store", fake_encoder, rng)
    return tmp_path / "store"


async def together(batcher: RecommendBatcher, user_ids: list[str], options: Options) -> list:
    return await asyncio.gather(*(batcher.recommend(u, options) for u in user_ids), return_exceptions=True)


@pytest.mark.parametrize("options", [Options(10, None, 0.0, False), Options(3, Filter(categories_none=["c1"]), 0.0, True),
                                     Options(5, None, 0.5, False)])
def test_calls_that_arrive_together_are_one_batch_with_the_single_answers(store, fake_encoder, options):
    with Engine.open(store, encoder=fake_encoder) as eng:
        batcher = RecommendBatcher(eng, window_s=0.05)
        got = asyncio.run(together(batcher, USERS, options))
        assert got == [eng.recommend(u, k=options.k, filter=options.filter, diversity=options.diversity,
                                     explain=options.explain) for u in USERS]
        assert (batcher.calls, batcher.batches) == (len(USERS), 1)


def test_a_full_group_goes_at_once_and_options_never_mix(store, fake_encoder):
    with Engine.open(store, encoder=fake_encoder) as eng:
        batcher = RecommendBatcher(eng, window_s=0.5, max_batch=4)
        five, three = Options(5, None, 0.0, False), Options(3, None, 0.0, False)

        async def run() -> list:
            return await asyncio.gather(together(batcher, USERS[:8], five), together(batcher, USERS[:2], three))

        by5, by3 = asyncio.run(run())
        assert by5 == [eng.recommend(u, k=5) for u in USERS[:8]]
        assert by3 == [eng.recommend(u, k=3) for u in USERS[:2]]
        assert batcher.batches == 3  # two full groups of 4 at k=5, one of 2 at k=3


def test_one_bad_id_fails_only_its_own_call(store, fake_encoder):
    with Engine.open(store, encoder=fake_encoder) as eng:
        batcher = RecommendBatcher(eng, window_s=0.05)
        ids = ["u1", " bad", "u2"]
        got = asyncio.run(together(batcher, ids, Options(4, None, 0.0, False)))
        assert isinstance(got[1], InvalidInputError) and "whitespace" in str(got[1])
        assert got[0] == eng.recommend("u1", k=4) and got[2] == eng.recommend("u2", k=4)


def test_window_zero_answers_each_call_alone(store, fake_encoder):
    with Engine.open(store, encoder=fake_encoder) as eng:
        batcher = RecommendBatcher(eng, window_s=0)
        got = asyncio.run(together(batcher, USERS, Options(4, None, 0.0, False)))
        assert got == [eng.recommend(u, k=4) for u in USERS]
        assert (batcher.calls, batcher.batches) == (len(USERS), 0)


@pytest.mark.parametrize("window, batch", [(-0.1, 8), (2.0, 8), ("1", 8), (0.001, 0), (0.001, True)])
def test_bad_settings_are_refused(store, fake_encoder, window, batch):
    with Engine.open(store, encoder=fake_encoder) as eng, pytest.raises(ValueError, match="batch"):
        RecommendBatcher(eng, window_s=window, max_batch=batch)


def test_the_service_batches_concurrent_calls_and_answers_each_as_alone(tmp_path, fake_encoder, rng):
    """A real `kindling serve --batch-window-ms 30`: 14 clients at once, each answer equal to what
    the store gives that user alone; /metrics shows fewer batches than calls."""
    make_store(tmp_path / "store", fake_encoder, rng)
    # the server process has no fake encoder: it only ranks (no text to embed) with stored vectors
    srv = Server(tmp_path / "store", tmp_path / "server.log", extra=["--batch-window-ms", "30"])
    try:
        answers: dict[str, object] = {}
        start = threading.Barrier(len(USERS) + 1)

        def ask(user: str, n: int) -> None:
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                start.wait()
                r = c.post("/recommend", json={"user_id": user, "k": 5})
                answers[f"{user}#{n}"] = (r.status_code, r.json())

        threads = [threading.Thread(target=ask, args=(u, n)) for n, u in enumerate(USERS[:-1])] + \
            [threading.Thread(target=ask, args=(" bad", 99))]
        for t in threads:
            t.start()
        start.wait()
        for t in threads:
            t.join()
        status, body = answers.pop(" bad#99")
        assert status == 400 and "whitespace" in body["detail"]
        metrics = srv.client.get("/metrics").text
        calls = int(re.search(r"^kindling_recommend_calls_total (\d+)", metrics, re.M).group(1))
        batches = int(re.search(r"^kindling_recommend_batches_total (\d+)", metrics, re.M).group(1))
        assert calls == len(USERS) - 1 and 1 <= batches < calls
    finally:
        assert srv.stop() in (0, -signal.SIGTERM), srv.output()  # uvicorn re-raises the signal it handled
    with Engine.open(tmp_path / "store", read_only=True) as eng:
        for key, (status, body) in answers.items():
            user = key.split("#")[0]
            assert status == 200, body
            assert [r["item_id"] for r in body["items"]] == [r.item_id for r in eng.recommend(user, k=5)]
    assert "Traceback" not in srv.output()
