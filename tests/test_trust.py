"""What the reranker trusts: the profile bucket, the per-bucket signals, fit's start, training lists,
the generated profile sets and the harness handing the training users' profiles to the store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.evaluation.baselines.base import TrainSet
from engine.evaluation.datasets import EvalDataset, EventTable
from engine.evaluation.kindling_method import engine_config, fitted_engine
from engine.evaluation.profiles import demographic_profile, taste_profile, with_profiles
from engine.models.rerank import (
    FEATURES, N_BUCKETS, N_FEATURES, PROFILE_BUCKET, SIGNALS, Reranker, bucket_of, column, expand,
    history_bucket,
)
from engine.training.fit import CUTS, user_windows
from engine.training.reranker import choose_experts, fit, model_recalls
from engine.types import Item

from conftest import small_catalog


def test_a_profile_without_clicks_has_a_bucket_of_its_own() -> None:
    assert history_bucket(0, profile=True) == PROFILE_BUCKET
    assert history_bucket(0) == 0 and history_bucket(1, profile=True) == history_bucket(1) == 1
    x = expand(np.random.default_rng(0).normal(size=(5, N_FEATURES)), 0, profile=True)
    assert bucket_of(x) == PROFILE_BUCKET
    assert bucket_of(np.zeros((3, x.shape[1]), np.float32)) == -1


def _examples(rng: np.random.Generator, n: int, bucket: int, signal: str, m: int = 40):
    """Lists whose positives are the candidates highest on `signal`; every other feature noise."""
    out = []
    for _ in range(n):
        raw = rng.normal(size=(m, N_FEATURES))
        labels = np.argsort(-raw[:, FEATURES.index(signal)])[:3]
        out.append((expand(raw, 4 if bucket != PROFILE_BUCKET else 0, bucket == PROFILE_BUCKET), labels))
    return out


def test_a_bucket_takes_a_signal_only_when_it_beats_the_network_there() -> None:
    rng = np.random.default_rng(3)
    rr = Reranker(hidden=8, lr=0.0, replay_size=4, replay_batch=2, seed=0)
    weights = rr.weights  # initial: the tower score, which is noise in these lists
    b = history_bucket(4)
    examples = _examples(rng, 60, b, "cooc")
    expert, report = choose_experts(weights, examples, np.full(len(examples), b))
    assert SIGNALS[expert[b]][0] == "cooc" and report[str(b)]["best_signal"] == "cooc"
    assert (np.delete(expert, b) == -1).all()
    # too few lists to trust the network over the signal: the signal ranks
    few, _ = choose_experts(weights, examples[:5], np.full(5, b))
    assert SIGNALS[few[b]][0] == "cooc"
    # a network that ranks by what no single signal holds alone keeps the bucket
    both = []
    for _ in range(80):
        raw = rng.normal(size=(40, N_FEATURES))
        labels = np.argsort(-(raw[:, FEATURES.index("cooc")] + raw[:, FEATURES.index("itemcf")]))[:3]
        both.append((expand(raw, 4), labels))
    blend = {k: v.copy() for k, v in weights.items()}
    blend["linear.weight"][:] = 0.0
    blend["linear.weight"][0, [column("cooc", b), column("itemcf", b)]] = 1.0
    kept, _ = choose_experts(blend, both, np.full(len(both), b))
    assert kept[b] == -1
    # a bucket that ranks by its signal scores by it, and the choice survives a save
    rr.install(weights, None, expert)
    feats = examples[0][0]
    assert set(np.argsort(-rr.score(feats))[:3]) == set(examples[0][1].tolist())
    again = Reranker(hidden=8, lr=0.0, replay_size=4, replay_batch=2, seed=0)
    again.load(rr.tensors())
    np.testing.assert_array_equal(again.expert, expert)
    bad = rr.tensors()
    bad["rerank.expert"] = np.full(N_BUCKETS, len(SIGNALS), np.int64)
    with pytest.raises(ValueError, match="rerank.expert"):
        Reranker(hidden=8, lr=0.0, replay_size=4, replay_batch=2, seed=0).load(bad)


def test_fit_starts_at_the_best_signal_and_never_keeps_worse_on_held_out_lists() -> None:
    rng = np.random.default_rng(5)
    b = history_bucket(4)
    examples = _examples(rng, 400, b, "itemcf")
    rr = Reranker(hidden=8, lr=0.0, replay_size=16, replay_batch=2, seed=0)
    start = float(model_recalls(rr.weights, examples).mean())
    fit(rr, examples, epochs=2, groups=np.arange(len(examples)))
    assert SIGNALS[rr.warm_start[b]][0] == "itemcf"
    assert rr.gate_report[str(b)]["network"] >= rr.gate_report[str(b)]["signal"] / 1.01
    assert float(model_recalls(rr.weights, examples).mean()) > start + 0.3


def test_training_lists_cover_short_histories_many_times() -> None:
    rng = np.random.default_rng(0)
    windows = user_windows(40, 60, rng)
    assert len(windows) == len(set(windows)) <= 60
    assert (0, 1) in windows and all(0 <= s and s + p <= 40 and p >= 0 for s, p in windows)
    from engine.training import fit as fit_module

    short = [w for w in windows if w[1] == 1]
    assert len(short) == 1 + fit_module.WINDOWS  # the prefix, then windows started further in
    assert all(p in CUTS for s, p in windows if s > 0)
    assert len(user_windows(3, 2, rng)) == 2


def _dataset() -> EvalDataset:
    items = tuple(small_catalog())
    users = np.array([f"u{j}" for j in range(6)], dtype=object)
    rows_u, rows_i = [], []
    for j in range(6):  # every user likes the four items of one topic, and one of another
        topic = j % 3
        for i in [4 * topic + n for n in range(4)] + [4 * ((topic + 1) % 3)]:
            rows_u.append(j)
            rows_i.append(i)
    n = len(rows_u)
    ev = EventTable(np.array(rows_u), np.array(rows_i), np.arange(n, dtype=np.int64), np.ones(n))
    return EvalDataset("tiny", items, np.array([it.item_id for it in items], dtype=object), users, ev)


def test_generated_profiles_are_fixed_by_the_seed_and_taste_ones_leave_the_events() -> None:
    ds = _dataset()
    demo = with_profiles(ds, "demographic")
    assert demo.profiles == with_profiles(ds, "demographic").profiles and len(demo.profiles) == 6
    assert demo.profiles["u0"] == demographic_profile("u0") != demographic_profile("u0", seed=1)
    assert "occupation: " in demo.profiles["u0"] and len(demo.events) == len(ds.events)
    taste = with_profiles(ds, "taste")
    control = with_profiles(ds, "taste-none")
    assert control.profiles == {} and len(control.events) == len(taste.events) < len(ds.events)
    for j, uid in enumerate(ds.user_ids):
        mine = taste.events.item[taste.events.user == j]
        gone = sorted(set(ds.events.item[ds.events.user == j].tolist()) - set(mine.tolist()))
        assert len(gone) == 1  # a fifth of five liked items
        assert ds.items[gone[0]].title.split()[0] in taste.profiles[uid]  # what it names left the events
    assert taste_profile(["Toy Story (1995)"], [("Animation", "Children")]) == \
        "I like Animation and Children; for example Toy Story (1995)"
    with pytest.raises(ValueError, match="profiles must be one of"):
        with_profiles(ds, "made-up")


def test_the_harness_gives_the_training_users_profiles_before_fit(fake_encoder, tmp_path: Path) -> None:
    ds = with_profiles(_dataset(), "taste")
    train = TrainSet(ds.events, ds.items, ds.n_users, ds.user_ids, profiles=ds.profiles_of(ds.events))
    assert set(train.profiles) == {str(u) for u in ds.user_ids}
    eng, summary = fitted_engine(tmp_path / "s", train, fake_encoder,
                                 engine_config(0, proj_epochs=1, rerank_epochs=1))
    try:
        assert summary["profile_users"] == 6  # fit saw every training user's profile
        recs = eng.recommend("u0", k=3, history=[], profile=train.profiles["u0"])
        assert len(recs) == 3
    finally:
        eng.close(save=False)


def test_every_user_with_two_clicks_makes_lists_in_one_fold() -> None:
    from engine import Config
    from engine.state.users import UserTable
    from engine.training.fit import MIN_HOLDOUT_USERS, RERANK_FOLDS, reranker_folds

    users = UserTable(4)
    for j in range(2 * RERANK_FOLDS * MIN_HOLDOUT_USERS):
        users.get_or_create(f"u{j}").clicks.extend([0, 1] if j % 5 else [2])  # every fifth: one click
    folds = reranker_folds(users, Config(seed=3))
    assert len(folds) == RERANK_FOLDS
    together = np.concatenate(folds)
    assert len(together) == len(set(together.tolist()))  # no user in two folds
    assert set(together.tolist()) == {j for j, u in enumerate(users.states) if len(set(u.clicks)) >= 2}
    assert reranker_folds(users, Config(seed=3, rerank_epochs=0)) == []
    few = UserTable(4)
    for j in range(MIN_HOLDOUT_USERS):
        few.get_or_create(f"u{j}").clicks.extend([0, 1])
    assert reranker_folds(few, Config()) == []  # too few to hold a fold out: fit trains on all


def test_each_bucket_keeps_its_block_from_its_own_best_epoch() -> None:
    from engine.training.reranker import BucketKeeper, to_net

    rr = Reranker(hidden=8, lr=0.0, replay_size=4, replay_batch=2, seed=0)
    net = to_net(rr.weights, 8)
    start = net.linear.weight.detach().clone()
    keeper = BucketKeeper(np.array([1, 1, 2, 2]))
    keeper.offer(net, np.array([0.5, 0.5, 0.1, 0.1]))
    with __import__("torch").no_grad():
        net.linear.weight.add_(1.0)  # an epoch: bucket 1 got worse on its lists, bucket 2 better
    keeper.offer(net, np.array([0.2, 0.2, 0.4, 0.4]))
    moved = net.linear.weight.detach().clone()
    keeper.restore(net)
    w = net.linear.weight.detach()
    one, two = slice(N_FEATURES, 2 * N_FEATURES), slice(2 * N_FEATURES, 3 * N_FEATURES)
    assert (w[0, one] == start[0, one]).all() and (w[0, two] == moved[0, two]).all()


def test_a_signal_ranks_only_lists_with_feedback_as_it_was_judged() -> None:
    rng = np.random.default_rng(9)
    b = history_bucket(4)
    rr = Reranker(hidden=8, lr=0.0, replay_size=4, replay_batch=2, seed=0)
    expert = np.full(N_BUCKETS, -1, np.int64)
    expert[b] = [s for s, _ in SIGNALS].index("recent")
    rr.install(rr.weights, None, expert)
    warm = expand(rng.normal(size=(30, N_FEATURES)), 4)
    np.testing.assert_allclose(rr.score(warm), warm[:, column("recent", b)] + 1e-3 * warm[:, column("clicks", b)])
    raw = rng.normal(size=(30, N_FEATURES))
    raw[:, FEATURES.index("clicks")] = 0.0  # brand-new candidates only: no feedback to judge by
    cold = expand(raw, 4)
    from engine.models.rerank import forward

    np.testing.assert_allclose(rr.score(cold), forward(rr.weights, cold)[0], rtol=1e-6)


def test_lists_count_every_target_of_their_user_as_the_evaluation_does() -> None:
    """A profile that retrieved one target of a user's twenty looks perfect on that list alone;
    counted against all twenty (as recall@20 counts them when served) popularity is worth more."""
    rng = np.random.default_rng(11)
    examples, totals = [], []
    for j in range(200):
        raw = rng.normal(size=(60, N_FEATURES))
        if j % 10 < 7:  # one of twenty targets among the candidates, the profile's best match
            labels = np.array([int(np.argmax(raw[:, FEATURES.index("profile")]))])
            totals.append(20)
        else:  # every target among the candidates: the two most popular
            labels = np.argsort(-raw[:, FEATURES.index("clicks")])[:2]
            totals.append(2)
        examples.append((expand(raw, 0, profile=True), labels))
    totals = np.array(totals)
    scores = [f[:, column("profile", PROFILE_BUCKET)] for f, _ in examples]
    from engine.training.reranker import list_weights, recalls

    assert recalls(scores, examples[:1])[0] == 1.0
    assert recalls(scores, examples[:1], totals=totals[:1])[0] == pytest.approx(1 / 20)
    buckets = np.full(len(examples), PROFILE_BUCKET)
    weights = Reranker(hidden=8, lr=0.0, replay_size=4, replay_batch=2, seed=0).weights
    in_list, _ = choose_experts(weights, examples, buckets)
    _, report = choose_experts(weights, examples, buckets, totals=totals)
    assert SIGNALS[in_list[PROFILE_BUCKET]][0] == "profile"
    assert report[str(PROFILE_BUCKET)]["best_signal"] == "clicks", report
    w = list_weights(examples, totals)
    assert w.mean() == pytest.approx(1.0) and w[0] * 20 == pytest.approx(w[7] * 1.0)


def _profile_store(tmp_path: Path, name: str, shift: int):
    """80 users who click 8 items of topic u % 4 each and whose profile names topic (u + shift) % 4:
    their own (shift 0) or another (shift 2)."""
    from conftest import FakeEncoder
    from engine import Config, Engine, Event

    rng = np.random.default_rng(7)
    eng = Engine.create(tmp_path / name, Config(proj_epochs=2, proj_dim=16, rerank_epochs=1, retrieve=10,
                                                fsync=False, seed=4), encoder=FakeEncoder(dim=32))
    eng.add_items([Item(f"it{i}", f"item {i}", f"topic{i % 4} word{i % 7} thing{i % 5}") for i in range(60)])
    events, ts = [], 1_600_000_000
    for u in range(80):
        eng.set_profile(f"u{u}", f"topic{(u + shift) % 4} topic{(u + shift) % 4}")
        for i in rng.choice(np.arange(u % 4, 60, 4), size=8, replace=False):
            ts += 1
            events.append(Event(f"u{u}", f"it{i}", "click", 1.0, ts))
    eng.import_events(events)
    return eng, eng.fit(events, progress=False)


def test_fit_learns_what_a_profile_is_worth_in_the_user_vector(tmp_path: Path) -> None:
    from engine import Engine
    from engine.training.fit import PROFILE_WEIGHTS

    told, told_fit = _profile_store(tmp_path, "told", shift=0)
    misled, misled_fit = _profile_store(tmp_path, "misled", shift=2)
    assert told_fit["profile_weight_users"] >= 100 and set(told_fit["profile_weight_recalls"]) == {
        str(w) for w in PROFILE_WEIGHTS}
    # a profile naming the user's own topic is worth more than one naming another
    assert misled_fit["profile_weight"] == min(PROFILE_WEIGHTS), misled_fit["profile_weight_recalls"]
    assert told_fit["profile_weight"] > misled_fit["profile_weight"], told_fit["profile_weight_recalls"]
    # the weight is the one a stored user's vector follows, and it survives a save
    from conftest import FakeEncoder

    assert misled.stats()["profile_weight"] == misled_fit["profile_weight"]
    misled.close()
    with Engine.open(tmp_path / "misled", read_only=True, encoder=FakeEncoder(dim=32)) as again:
        assert again.stats()["profile_weight"] == misled_fit["profile_weight"]
    told.close()


def test_a_saved_profile_weight_is_read_back_or_refused() -> None:
    from engine.serving.ranking import DEFAULT_PROFILE_WEIGHT, PROFILE_WEIGHT_TENSOR, profile_weight_from

    assert profile_weight_from({}) == DEFAULT_PROFILE_WEIGHT  # a store from before it was learned
    assert profile_weight_from({PROFILE_WEIGHT_TENSOR: np.array([0.25])}) == 0.25
    for bad in (np.array([0.0]), np.array([np.nan]), np.array([1.0, 2.0]), np.array([-1.0])):
        with pytest.raises(ValueError, match=PROFILE_WEIGHT_TENSOR):
            profile_weight_from({PROFILE_WEIGHT_TENSOR: bad})
