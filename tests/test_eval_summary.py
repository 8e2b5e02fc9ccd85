"""The paired bootstrap on hand cases, and the summary over seeds with its verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.evaluation.bootstrap import Paired, paired_bootstrap, seed_replicates
from engine.evaluation.summary import main, markdown, summarise


def _arr(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


# ---- the bootstrap ------------------------------------------------------------------------------
def test_identical_or_proportional_vectors_give_a_degenerate_interval_at_the_exact_ratio() -> None:
    a = _arr(0.1, 0.5, 0.0, 0.9, 0.3)
    same = paired_bootstrap([Paired(0, a, a.copy())])
    assert (same.ratio, same.low, same.high) == (1.0, 1.0, 1.0)
    double = paired_bootstrap([Paired(0, 2 * a, a)])
    assert double.ratio == pytest.approx(2.0)
    assert double.low == pytest.approx(2.0) and double.high == pytest.approx(2.0)
    flat = paired_bootstrap([Paired(3, np.full(4, 0.3), np.full(4, 0.2))])  # every user alike
    assert flat.low == pytest.approx(1.5) and flat.high == pytest.approx(1.5) and flat.ratio == pytest.approx(1.5)


def test_a_known_paired_case() -> None:
    """Two users, kindling (3, 1) against (2, 1). A replicate draws user 0 twice (p = 1/4, ratio
    3/2), both (p = 1/2, 4/3) or user 1 twice (p = 1/4, 1): the 2.5% and 97.5% points are 1 and
    3/2. Resampling the two methods' users independently would reach 3/1 (p = 1/16 > 2.5%)."""
    iv = paired_bootstrap([Paired(0, _arr(3, 1), _arr(2, 1))])
    assert iv.ratio == pytest.approx(4 / 3) and iv.per_seed == pytest.approx((4 / 3,))
    assert (iv.low, iv.high) == (pytest.approx(1.0), pytest.approx(1.5))
    reps = seed_replicates(Paired(0, _arr(3, 1), _arr(2, 1)))
    assert set(np.round(reps, 6)) == {1.0, round(4 / 3, 6), 1.5}
    assert 0.2 < np.mean(reps == 1.0) < 0.3 and 0.45 < np.mean(np.isclose(reps, 4 / 3)) < 0.55


def test_seeds_are_averaged_per_replicate() -> None:
    a = _arr(0.2, 0.4, 0.6)
    iv = paired_bootstrap([Paired(0, 2 * a, a), Paired(1, a, a)])
    assert iv.per_seed == pytest.approx((2.0, 1.0))
    assert (iv.ratio, iv.low, iv.high) == (pytest.approx(1.5), pytest.approx(1.5), pytest.approx(1.5))


def test_the_bootstrap_is_seeded_and_checks_its_input() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.random(50), rng.random(50)
    first, again = paired_bootstrap([Paired(0, a, b)]), paired_bootstrap([Paired(0, a, b)])
    assert first == again and first.low < first.ratio < first.high
    assert paired_bootstrap([Paired(0, a, b)], seed=1) != first
    with pytest.raises(ValueError, match="equal length"):
        Paired(0, a, b[:3])
    with pytest.raises(ValueError, match="each seed may appear once"):
        paired_bootstrap([Paired(0, a, b), Paired(0, a, b)])
    with pytest.raises(ValueError, match="at least one seed"):
        paired_bootstrap([])
    zero = paired_bootstrap([Paired(0, _arr(1, 0), _arr(0, 0))])
    assert zero.ratio == np.inf  # the rival scored nothing


# ---- runs as `kindling eval --json` writes them ---------------------------------------------------
def _cold(protocol: str, seed: int, cells: dict[str, dict[str, list[float]]]) -> dict:
    """An item-cold (one cell "all") or user-cold run with per-user recall@20 (ndcg = recall / 2)."""
    def metrics(values: list[float]) -> dict:
        return {"recall@20": float(np.mean(values)), "ndcg@20": float(np.mean(values)) / 2}

    def arrays(values: list[float]) -> dict:
        return {"recall@20": values, "ndcg@20": [v / 2 for v in values]}

    users = [f"u{i}" for i in range(len(next(iter(next(iter(cells.values())).values()))))]
    if protocol == "item-cold":
        (cell,) = cells.values()
        results = {m: metrics(v) for m, v in cell.items()}
        per_user = {m: arrays(v) for m, v in cell.items()}
    else:
        results = {c: {m: metrics(v) for m, v in cell.items()} for c, cell in cells.items()}
        per_user = {c: {m: arrays(v) for m, v in cell.items()} for c, cell in cells.items()}
    return {"dataset": "d", "protocol": protocol, "split_kind": "test", "seed": seed, "k": 20,
            "min_value": 4.0, "results": results, "per_user": {"users": users, "results": per_user}}


def _replay(seed: int, hits: dict[str, list[int]], events: list[int], cold: list[int]) -> dict:
    def rate(h: list[int], keep: list[bool]) -> float | None:
        n = sum(e for e, k in zip(events, keep) if k)
        return sum(x for x, k in zip(h, keep) if k) / n if n else None

    results = {m: {"hit_rate@20": rate(h, [True] * len(h)), "hit_rate@20_cold_users": rate(h, [bool(c) for c in cold]),
                   "hit_rate@20_cold_items": None} for m, h in hits.items()}
    return {"dataset": "d", "protocol": "replay", "split_kind": "test", "seed": seed, "k": 20, "min_value": 4.0,
            "results": results, "per_user": {"users": [f"u{i}" for i in range(len(events))], "events": events,
                                             "cold_item_events": [0] * len(events), "cold_user": cold,
                                             "results": {m: {"hits": h, "cold_item_hits": [0] * len(h)}
                                                         for m, h in hits.items()}}}


def _all(seed: int, shift: float = 0.0) -> dict:
    """Kindling clearly ahead in item-cold and replay (overall), behind in user-cold at reveal 5."""
    item = _cold("item-cold", seed, {"all": {
        "kindling": [0.5 + shift, 0.6, 0.4, 0.7], "lightfm": [0.3, 0.4, 0.3, 0.4],
        "tfidf": [0.2, 0.3, 0.2, 0.2], "random": [0.9, 0.9, 0.9, 0.9]}})  # random is no rival
    user = _cold("user-cold", seed, {
        "reveal=0": {"kindling": [0.3, 0.3, 0.3], "popularity": [0.3, 0.3, 0.3]},
        "reveal=1": {"kindling": [0.5, 0.6, 0.4], "popularity": [0.3, 0.3, 0.3], "als": [0.2, 0.2, 0.2]},
        "reveal=3": {"kindling": [0.6, 0.6, 0.5], "popularity": [0.3, 0.3, 0.3], "als": [0.4, 0.4, 0.4]},
        "reveal=5": {"kindling": [0.4, 0.4, 0.4], "popularity": [0.3, 0.3, 0.3], "als": [0.5, 0.5, 0.5]}})
    replay = _replay(seed, {"kindling": [4, 3, 2, 5], "kindling-frozen": [2, 2, 1, 2], "cooc": [3, 3, 2, 4],
                            "popularity": [1, 1, 1, 1]}, events=[10, 8, 6, 9], cold=[1, 1, 0, 0])
    return {"dataset": "d", "protocol": "all", "split_kind": "test", "seed": seed, "k": 20, "min_value": 4.0,
            "protocols": {"item-cold": item, "user-cold": user, "replay": replay}}


def _target(summary: dict, protocol: str, cell: str, best: str | None = None) -> dict:
    found = [t for t in summary[protocol]["targets"] if t["cell"] == cell and (best is None or t["best"] == best)]
    assert len(found) == 1, found
    return found[0]


def test_verdicts_need_the_ratio_and_an_interval_above_one() -> None:
    s = summarise([_all(0), _all(1, shift=0.1)])
    assert s["seeds"] == [0, 1] and s["split_kind"] == "test"
    item = _target(s, "item-cold", "all")
    assert item["best"] == "lightfm" and item["rivals"] == ["tfidf", "lightfm"]  # missing baselines skipped
    assert item["per_seed_ratio"] == pytest.approx([2.2 / 1.4, 2.3 / 1.4])
    assert item["ratio"] == pytest.approx((2.2 + 2.3) / 2 / 1.4) and item["met"] is True
    assert 1.0 < item["ci95"][0] <= item["ratio"] <= item["ci95"][1]
    at0 = _target(s, "user-cold", "reveal=0")
    assert at0["ratio"] == pytest.approx(1.0) and at0["target"] == 1.0
    assert at0["met"] is False, "a ratio of 1.0 reaches 1.0x but its interval does not lie above 1"
    at5 = _target(s, "user-cold", "reveal=5")
    assert at5["best"] == "als" and at5["ratio"] == pytest.approx(0.8) and at5["met"] is False
    assert s["user-cold"]["kindling_rises_1_to_5"] is False
    assert s["user-cold"]["kindling_recall_by_reveal"]["reveal=3"] == pytest.approx(17 / 30)


def test_replay_targets_overall_and_for_cold_users() -> None:
    s = summarise([_all(0)])
    frozen = _target(s, "replay", "all", "kindling-frozen")
    assert frozen["ratio"] == pytest.approx(14 / 7) and frozen["target"] == 1.15
    cooc = _target(s, "replay", "all", "cooc")
    assert cooc["ratio"] == pytest.approx(14 / 12) and cooc["target"] == 1.10
    cold = _target(s, "replay", "cold_users", "cooc")
    assert cold["ratio"] == pytest.approx(7 / 6) and cold["metric"] == "hit_rate@20_cold_users"
    assert s["replay"]["mean"]["kindling"]["hit_rate@20"] == pytest.approx(14 / 33)


def test_a_seeds_file_summarises_like_its_per_seed_files() -> None:
    runs = [_all(0), _all(1, shift=0.2)]
    seeds_file = {"dataset": "d", "protocol": "all", "split_kind": "test", "k": 20, "min_value": 4.0,
                  "seeds": [0, 1], "runs": runs}
    assert summarise([seeds_file]) == summarise(runs) == summarise(runs[::-1])
    with pytest.raises(ValueError, match="seed 0 is given twice"):
        summarise([seeds_file, runs[0]])
    other = json.loads(json.dumps(runs[1]))
    other["split_kind"] = other["protocols"]["item-cold"]["split_kind"] = "validation"
    with pytest.raises(ValueError, match="must share"):
        summarise([runs[0], other])


def test_old_files_without_per_user_values_get_ratios_but_no_verdict() -> None:
    run = _all(0)
    for res in run["protocols"].values():
        del res["per_user"]
    item = _target(summarise([run]), "item-cold", "all")
    assert item["ratio"] == pytest.approx(0.55 / 0.35) and item["ci95"] is None and item["met"] is None
    assert "no per-user values" in item["note"]


def test_markdown_names_every_method_ratio_interval_and_verdict() -> None:
    text = markdown(summarise([_all(0), _all(1)]))
    assert "| random |" in text and "| tfidf |" in text and "| cooc |" in text
    assert "| recall@20 | lightfm |" in text and "| met |" in text and "| not met |" in text
    assert "rises from reveal 1 to 5: no" in text and "95% interval" in text


def test_command_line_writes_markdown_and_json(tmp_path: Path, capsys) -> None:
    files = []
    for seed in (0, 1):
        files.append(tmp_path / f"s{seed}.json")
        files[-1].write_text(json.dumps(_all(seed)))
    assert main([str(f) for f in files] + ["--out", str(tmp_path / "s.md"), "--json", str(tmp_path / "s.json")]) == 0
    assert "mean over seeds 0, 1." in capsys.readouterr().out
    assert "mean over seeds 0, 1." in (tmp_path / "s.md").read_text()
    saved = json.loads((tmp_path / "s.json").read_text())
    assert _target(saved, "item-cold", "all")["ratio"] == pytest.approx(2.2 / 1.4)
    with pytest.raises(SystemExit):
        main([str(files[0]), str(files[0])])


def test_a_cell_without_users_gets_no_verdict_and_valid_json() -> None:
    run = _replay(0, {"kindling": [4, 3], "kindling-frozen": [2, 2], "cooc": [3, 3]}, events=[10, 8], cold=[0, 0])
    s = summarise([run])
    cold = _target(s, "replay", "cold_users", "cooc")
    assert cold["met"] is None and cold["note"] == "no user in this cell" and cold["mean"]["kindling"] is None
    json.dumps(s, allow_nan=False)  # strict JSON: no NaN or Infinity
    assert "| hit_rate@20_cold_users | cooc | – | – |" in markdown(s)


def _next_item(seed: int, ndcg: dict[str, list[float]]) -> dict:
    """A next-item run with per-user ndcg@10 (recall@10 = 1 where ndcg > 0) and k 20 in the header."""
    def arrays(values: list[float]) -> dict:
        return {"ndcg@10": values, "recall@10": [float(v > 0) for v in values]}

    per_user = {m: arrays(v) for m, v in ndcg.items()}
    results = {m: {name: float(np.mean(a)) for name, a in arrays(v).items()} for m, v in ndcg.items()}
    return {"dataset": "d", "protocol": "next-item", "split_kind": "test", "seed": seed, "k": 20,
            "min_value": None, "ks": [10, 50], "results": results,
            "per_user": {"users": [f"u{i}" for i in range(len(next(iter(ndcg.values()))))], "results": per_user}}


def test_next_item_targets_are_sasrec_and_the_best_other_baseline_at_10() -> None:
    run = _next_item(0, {"kindling": [1.0, 0.5, 0.0, 0.63], "sasrec": [0.5, 0.5, 0.0, 0.0],
                         "ease": [1.0, 0.0, 0.0, 0.63], "random": [1.0, 1.0, 1.0, 1.0]})
    s = summarise([run])
    targets = s["next-item"]["targets"]
    assert [(t["metric"], t["best"]) for t in targets] == [
        ("ndcg@10", "sasrec"), ("recall@10", "sasrec"), ("ndcg@10", "ease"), ("recall@10", "ease")]
    by = {(t["metric"], t["best"]): t for t in targets}
    assert by[("ndcg@10", "sasrec")]["ratio"] == pytest.approx(2.13 / 1.0)
    assert by[("recall@10", "sasrec")]["ratio"] == pytest.approx(3 / 2)
    assert by[("ndcg@10", "ease")]["ratio"] == pytest.approx(2.13 / 1.63)
    assert by[("recall@10", "ease")]["ratio"] == pytest.approx(3 / 2) and by[("recall@10", "ease")]["target"] == 1.1
    assert "### next-item" in markdown(s) and "| sasrec |" in markdown(s)
