"""New items reach their audience at once: exploration gives a bounded share of a list to items
added after `fit` without feedback, when their text matches the user."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine import Config, Engine, Event, Item

FAST = dict(proj_epochs=1, proj_dim=16, rerank_epochs=2, fsync=False, seed=4)
K = 5


def _store(path: Path, encoder, fit: bool, **over) -> Engine:
    eng = Engine.create(path, Config(**{**FAST, **over}), encoder=encoder)
    eng.add_items([Item(f"it{i}", f"item {i}", f"topic{i % 4} word{i % 7} thing{i % 5}") for i in range(80)])
    rng = np.random.default_rng(0)
    events, ts = [], 1_600_000_000
    for u in range(40):
        for i in rng.choice(np.arange(u % 4, 80, 4), size=6, replace=False):
            ts += 1
            events.append(Event(f"u{u}", f"it{i}", "click", 1.0, ts))
    eng.import_events(events)
    if fit:
        eng.fit(events)
    return eng


def _ids(eng: Engine, user: str = "u0") -> list[str]:
    return [r.item_id for r in eng.recommend(user, k=K)]


def _add_new(engines: list[Engine], texts: list[str]) -> list[str]:
    new = [Item(f"new-{j}", f"new {j}", t) for j, t in enumerate(texts)] + \
          [Item("new-other", "new other", "unrelated words entirely elsewhere")]
    for eng in engines:
        eng.add_items(new)
    return [it.item_id for it in new[:-1]]


def test_a_matching_new_item_takes_one_last_place_until_it_has_feedback(tmp_path: Path, fake_encoder) -> None:
    off = _store(tmp_path / "off", fake_encoder, fit=True, new_item_slots=0)
    on = _store(tmp_path / "on", fake_encoder, fit=True, new_item_slots=1)
    try:
        assert _ids(off) == _ids(on)  # nothing new yet: the knob changes nothing
        top = _ids(off)
        # the texts of the user's top items, as new ids: the best text match of the list qualifies
        dups = _add_new([off, on], [off.get_item(i).text for i in top])
        merit, explored = _ids(off), _ids(on)
        new_on_merit = [i for i in merit if i.startswith("new-")]
        assert any(i in dups for i in explored)
        if not new_on_merit:
            assert explored[:K - 1] == merit[:K - 1] and explored[-1] in dups  # one slot, the last
        assert sum(i.startswith("new-") for i in explored) <= max(1, len(new_on_merit))
        assert ("new-other" in explored) == ("new-other" in merit)  # no text match: merit only
        assert [r.item_id for r in on.recommend_many(["u0"], k=K)[0]] == explored  # batch = single
        for eng in (off, on):  # feedback: no longer new, ranked on merit like any other item
            for item_id in dups + ["new-other"]:
                eng.record("u9", item_id, "impression")
        assert _ids(on) == _ids(off)
    finally:
        off.close(save=False)
        on.close(save=False)


def test_no_slot_before_any_fit_and_the_choice_survives_a_reopen(tmp_path: Path, fake_encoder) -> None:
    plain = _store(tmp_path / "plain", fake_encoder, fit=False, new_item_slots=1)
    try:
        before = _ids(plain)
        _add_new([plain], [plain.get_item(i).text for i in before])
        after = _ids(plain)
        ref = _store(tmp_path / "ref", fake_encoder, fit=False, new_item_slots=0)
        _add_new([ref], [ref.get_item(i).text for i in before])
        assert after == _ids(ref)  # never fit: no item is new to a learned part
        ref.close(save=False)
    finally:
        plain.close(save=False)
    on = _store(tmp_path / "on", fake_encoder, fit=True, new_item_slots=1)
    _add_new([on], [on.get_item(i).text for i in _ids(on)])
    explored = _ids(on)
    on.close()
    with Engine.open(tmp_path / "on", encoder=fake_encoder) as again:
        assert _ids(again) == explored


def test_the_slot_takes_a_matching_new_item_outside_the_list_and_only_one(tmp_path: Path, fake_encoder) -> None:
    eng = _store(tmp_path / "s", fake_encoder, fit=True, new_item_slots=1)
    try:
        top_ids = _ids(eng)
        dups = _add_new([eng], [eng.get_item(i).text for i in top_ids])
        st = eng._core.state
        ranker, user = st.ranker, st.users.get("u0")
        row = st.items.live_row
        listed = np.array([row(i) for i in top_ids], np.int64)  # merit, no new item
        scores = np.linspace(2.0, 1.0, K).astype(np.float32)
        pool = np.array(sorted(row(i) for i in dups + ["new-other"]), np.int64)
        cands = np.array(sorted(set(listed.tolist()) | {row(f"it{i}") for i in range(80)}), np.int64)
        out, out_scores = ranker.with_new_items(user, listed, scores, cands, lambda: pool, K, "u0")
        assert out[:K - 1].tolist() == listed[:K - 1].tolist() and len(out) == K
        assert st.items.vocab.id(int(out[-1])) in dups  # the unrelated text never fits
        assert out_scores.tolist() == scores.tolist()  # the slot keeps its place's score
        assert ranker.with_new_items(user, listed[:1], scores[:1], cands, lambda: pool, 1, "u0")[0].tolist() == listed[:1].tolist()
        assert ranker.with_new_items(user, out, out_scores, cands, lambda: pool, K, "u0")[0].tolist() == out.tolist()
        assert ranker.with_new_items(user, listed, scores, cands, lambda: pool, K, "u0")[0].tolist() == out.tolist()  # seeded
        other = np.array([row("new-other")], np.int64)
        assert ranker.with_new_items(user, listed, scores, cands, lambda: other, K, "u0")[0].tolist() == listed.tolist()
    finally:
        eng.close(save=False)
