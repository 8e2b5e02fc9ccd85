"""Mean over seeds of `kindling eval --json` outputs, with kindling's ratios to the issue's targets.

    python -m engine.evaluation.summary s0.json s1.json s2.json [--out summary.md]

Each file is one run (`--protocol all`, or a single protocol); runs of the same protocol are
averaged. The targets (docs/results.md): item-cold kindling >= 1.20 x the best of popularity,
TF-IDF and LightFM, and above the LM profile; user-cold >= 1.15 x the best of popularity, ItemKNN, ALS and the LM profile at
reveal 1, 3 and 5, and >= popularity at 0; replay online >= 1.15 x frozen, overall and for cold
users.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

ITEM_COLD_RIVALS = ("popularity", "tfidf", "lightfm")
USER_COLD_RIVALS = ("popularity", "itemknn", "als", "lm-profile")
TARGETS = {"item-cold": 1.20, "user-cold": 1.15, "replay": 1.15}


def protocols(run: dict) -> dict[str, dict]:
    return run["protocols"] if run.get("protocol") == "all" else {run["protocol"]: run}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarise(runs: list[dict], k: int = 20) -> dict:
    """{"seeds": [...], "item-cold": {...}, "user-cold": {...}, "replay": {...}} of means and ratios."""
    by_protocol: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        for name, res in protocols(run).items():
            by_protocol[name].append(res)
    out: dict = {"seeds": sorted({int(r["seed"]) for r in runs})}
    metric = f"recall@{k}"
    if "item-cold" in by_protocol:
        res = by_protocol["item-cold"]
        means = {m: _mean([r["results"][m][metric] for r in res]) for m in res[0]["results"]}
        best = max((m for m in ITEM_COLD_RIVALS if m in means), key=means.get, default=None)
        out["item-cold"] = {"mean": means, "best_rival": best, "runs": len(res),
                            "ratio": _ratio(means.get("kindling"), means.get(best)),
                            "ratio_to_lm_profile": _ratio(means.get("kindling"), means.get("lm-profile"))}
    if "user-cold" in by_protocol:
        res = by_protocol["user-cold"]
        table = {}
        for reveal in res[0]["results"]:
            means = {m: _mean([r["results"][reveal][m][metric] for r in res]) for m in res[0]["results"][reveal]}
            rivals = ("popularity",) if reveal == "reveal=0" else USER_COLD_RIVALS
            best = max((m for m in rivals if m in means), key=means.get, default=None)
            table[reveal] = {"mean": means, "best_rival": best,
                             "ratio": _ratio(means.get("kindling"), means.get(best))}
        out["user-cold"] = {"reveals": table, "runs": len(res)}
    if "replay" in by_protocol:
        res = by_protocol["replay"]
        keys = [f"hit_rate@{k}", f"hit_rate@{k}_cold_users", f"hit_rate@{k}_cold_items"]
        means = {m: {key: _mean([r["results"][m][key] for r in res if r["results"][m][key] is not None] or [0.0])
                     for key in keys} for m in res[0]["results"]}
        ratios = {key: _ratio(means.get("kindling", {}).get(key), means.get("kindling-frozen", {}).get(key))
                  for key in keys}
        out["replay"] = {"mean": means, "ratio_online_to_frozen": ratios, "runs": len(res)}
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def markdown(summary: dict) -> str:
    seeds = ", ".join(str(s) for s in summary["seeds"])
    lines = [f"Mean over seeds {seeds}."]
    if "item-cold" in summary:
        s = summary["item-cold"]
        lines += ["", "### item-cold, recall@20", "", "| method | recall@20 |", "| --- | ---: |"]
        lines += [f"| {m} | {v:.4f} |" for m, v in sorted(s["mean"].items(), key=lambda kv: -kv[1])]
        lines += ["", _verdict("kindling / " + str(s["best_rival"]), s["ratio"], TARGETS["item-cold"]),
                  _verdict("kindling / lm-profile", s["ratio_to_lm_profile"], 1.0)]
    if "user-cold" in summary:
        table = summary["user-cold"]["reveals"]
        reveals = list(table)
        methods = list(next(iter(table.values()))["mean"])
        lines += ["", "### user-cold, recall@20 by reveal", "",
                  "| method | " + " | ".join(r.replace("reveal=", "n=") for r in reveals) + " |",
                  "| --- |" + " ---: |" * len(reveals)]
        lines += [f"| {m} | " + " | ".join(f"{table[r]['mean'][m]:.4f}" for r in reveals) + " |" for m in methods]
        lines.append("")
        for r in reveals:
            target = 1.0 if r == "reveal=0" else TARGETS["user-cold"]
            lines.append(_verdict(f"{r}: kindling / {table[r]['best_rival']}", table[r]["ratio"], target))
    if "replay" in summary:
        s = summary["replay"]
        keys = list(next(iter(s["mean"].values())))
        lines += ["", "### replay, hit rate@20", "", "| method | " + " | ".join(keys) + " |",
                  "| --- |" + " ---: |" * len(keys)]
        lines += [f"| {m} | " + " | ".join(f"{v[key]:.4f}" for key in keys) + " |" for m, v in s["mean"].items()]
        lines.append("")
        for key in keys[:2]:
            lines.append(_verdict(f"{key}: online / frozen", s["ratio_online_to_frozen"][key], TARGETS["replay"]))
    return "\n".join(lines) + "\n"


def _verdict(what: str, ratio: float | None, target: float) -> str:
    if ratio is None:
        return f"- {what}: no ratio (a method is missing)"
    return f"- {what}: {ratio:.3f}x (target {target:.2f}x): {'met' if ratio >= target else 'not met'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files written by kindling eval --json")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    parser.add_argument("--json", dest="json_out", type=Path, help="also write the summary as JSON here")
    args = parser.parse_args(argv)
    summary = summarise([json.loads(p.read_text()) for p in args.runs])
    text = markdown(summary)
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
