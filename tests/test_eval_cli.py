"""`kindling eval` through click's CliRunner on a tiny real dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.evaluation.cli import eval_command
from engine.evaluation.datasets import write_sample

BUNDLED = Path(__file__).resolve().parent.parent / "index_data" / "movielens-small"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sample(BUNDLED, tmp_path_factory.mktemp("eval-cli"), n_users=40, max_items=300)


def _run(*args: object):
    return CliRunner().invoke(eval_command, [str(a) for a in args], catch_exceptions=False)


def test_one_protocol_writes_the_documented_json(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    res = _run(tiny, "--protocol", "item-cold", "--min-value", "4", "--methods", "random,tfidf,lightfm",
               "--k", "10", "--json", out)
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert {k: data[k] for k in ("dataset", "protocol", "split_kind", "seed", "k", "min_value")} == {
        "dataset": tiny.name, "protocol": "item-cold", "split_kind": "test", "seed": 0, "k": 10, "min_value": 4.0}
    assert {"items", "cold_items", "test_users", "train_positives"} <= set(data["split"])
    assert list(data["results"]) == ["random", "tfidf", "lightfm"]
    for metrics in data["results"].values():
        assert set(metrics) == {"recall@10", "ndcg@10"}
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert "| tfidf |" in res.output and "recall@10" in res.output
    per_user = data["per_user"]
    assert len(per_user["users"]) == data["split"]["test_users"]
    for method, metrics in data["results"].items():
        values = per_user["results"][method]["recall@10"]
        assert len(values) == len(per_user["users"]) and all(v == round(v, 4) for v in values)
        assert sum(values) / len(values) == pytest.approx(metrics["recall@10"], abs=1e-4)


def test_all_protocols_with_report(tiny: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "out.json", tmp_path / "rep" / "out.md"
    res = _run(tiny, "--protocol", "all", "--min-value", "4", "--seed", "3",
               "--methods", "random,popularity,itemknn", "--json", out, "--report", report)
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["seed"] == 3 and set(data["protocols"]) == {"item-cold", "user-cold", "replay", "next-item"}
    user_cold = data["protocols"]["user-cold"]["results"]
    assert list(user_cold) == ["reveal=0", "reveal=1", "reveal=3", "reveal=5"]
    assert set(user_cold["reveal=3"]) == {"random", "popularity", "itemknn"}
    replay = data["protocols"]["replay"]["results"]
    assert list(replay) == ["popularity"]  # the only replay method among those asked for
    assert data["split_kind"] == "test" and "per_user" in data["protocols"]["replay"]
    assert set(replay["popularity"]) == {"hit_rate@20", "hit_rate@20_cold_users", "hit_rate@20_cold_items"}
    next_item = data["protocols"]["next-item"]
    assert list(next_item["results"]) == ["random", "popularity", "itemknn"] and next_item["ks"] == [10, 50]
    assert set(next_item["results"]["itemknn"]) == {"recall@10", "ndcg@10", "recall@50", "ndcg@50"}
    text = report.read_text()
    for protocol in ("item-cold", "user-cold", "replay", "next-item"):
        png = report.with_name(f"out-{protocol}.png")
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert f"## {protocol}" in text and f"]({png.name})" in text


def test_several_seeds_on_the_validation_split(tiny: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "seeds.json", tmp_path / "seeds.md"
    res = _run(tiny, "--protocol", "all", "--min-value", "4", "--seeds", "0,2", "--split", "validation",
               "--methods", "popularity,itemknn,tfidf,cooc", "--json", out, "--report", report)
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["seeds"] == [0, 2] and data["split_kind"] == "validation" and data["protocol"] == "all"
    assert [r["seed"] for r in data["runs"]] == [0, 2]
    for run in data["runs"]:
        assert {p["split_kind"] for p in run["protocols"].values()} == {"validation"}
        assert set(run["protocols"]["replay"]["results"]) == {"popularity", "cooc"}
    summary = data["summary"]
    assert summary["seeds"] == [0, 2] and summary["split_kind"] == "validation"
    (item,) = summary["item-cold"]["targets"]
    assert item["best"] == "tfidf" and item["note"] == "no kindling in every run"
    assert "95% interval" in res.output and "## Summary" in report.read_text()
    assert "| cooc |" in report.read_text()


def test_user_errors_are_clean(tiny: Path, tmp_path: Path) -> None:
    res = _run(tiny, "--protocol", "item-cold", "--methods", "als,bpr")
    assert res.exit_code == 2 and "Invalid value for '--methods'" in res.output and "bpr" in res.output
    res = _run(tiny, "--protocol", "warm")
    assert res.exit_code == 2
    (tmp_path / "items.csv").write_text("item_id,title\n1,Toy Story\n")
    res = _run(tmp_path, "--protocol", "item-cold")
    assert res.exit_code == 1 and "events.parquet" in res.output and "Traceback" not in res.output
    (tmp_path / "events.csv").write_text("user_id,item_id,timestamp\nu1,1,not-a-time\n")
    res = _run(tmp_path, "--protocol", "item-cold")
    assert res.exit_code == 1 and "timestamp" in res.output
    res = _run(tmp_path / "nowhere", "--protocol", "item-cold")
    assert res.exit_code == 2
    res = _run(tiny, "--protocol", "item-cold", "--seed", "1", "--seeds", "0,1")
    assert res.exit_code == 2 and "--seed or --seeds" in res.output
    for bad in ("0,x", "1,1", "-1"):
        res = _run(tiny, "--protocol", "item-cold", "--seeds", bad)
        assert res.exit_code == 2 and "Invalid value for '--seeds'" in res.output, bad
    res = _run(tiny, "--protocol", "item-cold", "--split", "holdout")
    assert res.exit_code == 2 and "'--split'" in res.output


@pytest.mark.model
def test_kindling_and_the_language_model_through_the_cli(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    res = _run(tiny, "--protocol", "user-cold", "--min-value", "4", "--methods", "random,lm-profile,kindling",
               "--json", out)
    assert res.exit_code == 0, res.output
    results = json.loads(out.read_text())["results"]
    assert set(results["reveal=5"]) == {"random", "lm-profile", "kindling"}
    assert results["reveal=5"]["kindling"]["recall@20"] > results["reveal=5"]["random"]["recall@20"]
