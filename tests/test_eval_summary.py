"""The mean-over-seeds summary of `kindling eval --json` runs and its verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.evaluation.summary import main, markdown, summarise


def run(seed: int, kindling: float, lightfm: float, online: float) -> dict:
    item = {"protocol": "item-cold", "seed": seed,
            "results": {"kindling": {"recall@20": kindling}, "lightfm": {"recall@20": lightfm},
                        "popularity": {"recall@20": 0.01}, "random": {"recall@20": 0.5}}}
    user = {"protocol": "user-cold", "seed": seed, "results": {
        "reveal=0": {"kindling": {"recall@20": 0.3}, "popularity": {"recall@20": 0.3}, "als": {"recall@20": 0.9}},
        "reveal=1": {"kindling": {"recall@20": 0.4}, "popularity": {"recall@20": 0.3}, "als": {"recall@20": 0.2}}}}
    replay = {"protocol": "replay", "seed": seed, "results": {
        m: {"hit_rate@20": v, "hit_rate@20_cold_users": v, "hit_rate@20_cold_items": None}
        for m, v in {"kindling": online, "kindling-frozen": 0.1, "popularity": 0.05}.items()}}
    return {"protocol": "all", "seed": seed, "protocols": {"item-cold": item, "user-cold": user, "replay": replay}}


def test_means_and_ratios_against_the_named_rivals() -> None:
    s = summarise([run(0, 0.3, 0.2, 0.12), run(1, 0.5, 0.3, 0.10)])
    assert s["seeds"] == [0, 1]
    ic = s["item-cold"]
    assert ic["mean"]["kindling"] == pytest.approx(0.4) and ic["best_rival"] == "lightfm"  # random is no rival
    assert ic["ratio"] == pytest.approx(0.4 / 0.25)
    uc = s["user-cold"]["reveals"]
    assert uc["reveal=0"]["best_rival"] == "popularity" and uc["reveal=0"]["ratio"] == pytest.approx(1.0)
    assert uc["reveal=1"]["best_rival"] == "popularity" and uc["reveal=1"]["ratio"] == pytest.approx(0.4 / 0.3)
    assert s["replay"]["ratio_online_to_frozen"]["hit_rate@20"] == pytest.approx(1.1)
    text = markdown(s)
    assert "kindling / lightfm: 1.600x (target 1.20x): met" in text
    assert "kindling / lm-profile: no ratio" in text  # no lm-profile in these runs
    assert "hit_rate@20: online / frozen: 1.100x (target 1.15x): not met" in text


def test_command_line_writes_markdown_and_json(tmp_path: Path, capsys) -> None:
    files = []
    for seed in (0, 1):
        files.append(tmp_path / f"s{seed}.json")
        files[-1].write_text(json.dumps(run(seed, 0.3, 0.3, 0.2)))
    assert main([str(f) for f in files] + ["--out", str(tmp_path / "s.md"), "--json", str(tmp_path / "s.json")]) == 0
    assert "Mean over seeds 0, 1." in capsys.readouterr().out
    assert (tmp_path / "s.md").read_text().startswith("Mean over seeds 0, 1.")
    assert json.loads((tmp_path / "s.json").read_text())["item-cold"]["ratio"] == pytest.approx(1.0)
