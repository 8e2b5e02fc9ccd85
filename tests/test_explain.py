"""`explain=True`: each recommendation says why it is there, with the number behind it."""

from __future__ import annotations

import numpy as np
import pytest

from engine import Because
from engine.serving.explain import MIN_COSINE
from engine.text.catalog import item_text


def text_vec(eng, fake_encoder, item_id: str) -> np.ndarray:
    return fake_encoder.encode([item_text(eng.get_item(item_id))])[0]


def test_profile_user_is_explained_by_the_profile(engine, fake_encoder):
    profile = "pasta recipe tomato sauce"
    recs = engine.recommend("u", k=2, profile=profile, explain=True)
    top = recs[0]
    assert top.item_id == "food-0" and top.because.reason == "profile"
    want = float(text_vec(engine, fake_encoder, "food-0") @ fake_encoder.encode([profile])[0])
    assert top.because.value == pytest.approx(want, abs=1e-5)
    assert str(top.because) == f"near your profile (cosine {want:.2f})"


def test_clicks_explain_what_is_near_them(engine, fake_encoder):
    engine.record("u", "ball-1", "click")
    engine.record("u", "space-1", "click")
    for rec in engine.recommend("u", k=10, explain=True):
        b = rec.because
        if b.reason == "clicked":
            assert b.item_id in ("ball-1", "space-1")
            sims = {c: float(text_vec(engine, fake_encoder, rec.item_id) @ text_vec(engine, fake_encoder, c))
                    for c in ("ball-1", "space-1")}
            assert b.value == pytest.approx(max(sims.values()), abs=1e-5)
            assert b.value >= MIN_COSINE
            assert sims[b.item_id] == pytest.approx(b.value, abs=1e-5)
        else:
            assert b.reason in ("popular", "new item")
    reasons = {r.because.reason for r in engine.recommend("u", k=10, explain=True)}
    assert "clicked" in reasons


def test_a_user_with_nothing_gets_popular_and_new(engine):
    engine.record("a", "food-2", "click")
    engine.record("b", "food-2", "click")
    engine.record("b", "ball-0", "click")
    recs = engine.recommend("cold", k=12, explain=True)
    by_id = {r.item_id: r.because for r in recs}
    assert by_id["food-2"] == Because("popular", 2.0)
    assert by_id["ball-0"] == Because("popular", 1.0)
    new = by_id["space-0"]
    assert new.reason == "new item" and new.value > 1.7e9 and str(new).startswith("new item (added at ")


def test_explain_changes_no_order_or_score(engine):
    engine.recommend("u", k=1, profile="football cup final")
    engine.record("u", "food-1", "click")
    plain = engine.recommend("u", k=8)
    told = engine.recommend("u", k=8, explain=True)
    assert all(r.because is None for r in plain)
    assert [(r.item_id, r.score, r.title) for r in told] == [(r.item_id, r.score, r.title) for r in plain]
    assert engine.recommend_many(["u", "x"], k=8, explain=True) == [told, engine.recommend("x", k=8, explain=True)]


def test_stateless_history_is_explained_by_its_clicks(engine):
    recs = engine.recommend("anon", k=3, history=["food-1"], explain=True)
    assert recs[0].because.reason == "clicked" and recs[0].because.item_id == "food-1"
