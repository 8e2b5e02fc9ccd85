"""Means over seeds of `kindling eval --json` outputs, and kindling's ratio to each target with a
per-user paired bootstrap interval.

    python -m engine.evaluation.summary s0.json s1.json s2.json [--out summary.md] [--json summary.json]
    python -m engine.evaluation.summary seeds.json       # a file written with --seeds

Each file is one seed's run (`--protocol all` or one protocol) or a `--seeds` file holding several;
runs of the same protocol are pooled, a (protocol, seed) pair at most once. The targets
(docs/evaluation.md), metric recall@K for item-cold and user-cold, hit_rate@K for replay:
item-cold kindling >= 1.20 x the best of popularity, tfidf, bm25, lightfm, lm-profile; user-cold
>= 1.15 x the best of popularity, itemknn, als, ease, cooc, lightfm, tfidf, bm25, lm-profile at
reveal 1, 3 and 5 and >= 1.0 x popularity at 0, recall rising from 1 to 5; replay online >= 1.15 x
the frozen engine and >= 1.10 x the online co-occurrence player, overall and for cold users;
next-item ndcg@10 and recall@10 >= 1.10 x SASRec and >= 1.10 x the best of the user-cold rivals. The
best baseline is the one with the highest mean over seeds; baselines missing from a run are
skipped. A target is met when the mean ratio reaches it and the interval's lower end is above 1.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bootstrap import BOOTSTRAP_SEED, LEVEL, REPLICATES, Paired, paired_bootstrap

METHOD = "kindling"
ITEM_COLD_RIVALS = ("popularity", "tfidf", "bm25", "lightfm", "lm-profile")
USER_COLD_RIVALS = ("popularity", "itemknn", "als", "ease", "cooc", "lightfm", "tfidf", "bm25", "lm-profile")
NEXT_ITEM_RIVALS = USER_COLD_RIVALS
NEXT_ITEM_METRICS = ("ndcg@10", "recall@10")
PROTOCOL_NAMES = ("item-cold", "user-cold", "replay", "next-item")
RISING_REVEALS = ("reveal=1", "reveal=3", "reveal=5")
SAME_KEYS = ("dataset", "k", "min_value", "split_kind")


@dataclass(frozen=True)
class Target:
    """kindling >= `times` x the best of `rivals` in one cell of a protocol."""

    protocol: str
    cell: str  # item-cold, next-item: "all"; user-cold: "reveal=n"; replay: "all" or "cold_users"
    rivals: tuple[str, ...]
    times: float
    fixed_metric: str | None = None  # next-item: its cut-offs do not follow --k

    def metric(self, k: int) -> str:
        if self.fixed_metric is not None:
            return self.fixed_metric
        if self.protocol != "replay":
            return f"recall@{k}"
        return f"hit_rate@{k}" + ("_cold_users" if self.cell == "cold_users" else "")


TARGETS: tuple[Target, ...] = (
    Target("item-cold", "all", ITEM_COLD_RIVALS, 1.20),
    Target("user-cold", "reveal=0", ("popularity",), 1.0),
    *(Target("user-cold", r, USER_COLD_RIVALS, 1.15) for r in RISING_REVEALS),
    *(Target("replay", cell, (rival,), times) for cell in ("all", "cold_users")
      for rival, times in (("kindling-frozen", 1.15), ("cooc", 1.10))),
    *(Target("next-item", "all", rivals, 1.10, metric) for rivals in (("sasrec",), NEXT_ITEM_RIVALS)
      for metric in NEXT_ITEM_METRICS),
)


def protocols(run: dict) -> dict[str, dict]:
    """A run's protocol objects by name."""
    return run["protocols"] if run.get("protocol") == "all" else {run["protocol"]: run}


def expand(files: list[dict]) -> list[dict]:
    """One object per seed: a `--seeds` file stands for its runs."""
    return [run for f in files for run in (f["runs"] if "runs" in f else [f])]


def pool(runs: list[dict]) -> dict[str, list[dict]]:
    """Protocol -> its results over seeds, in seed order.

    Raises:
        ValueError: runs of different datasets, k, min_value or split kinds, or a (protocol, seed)
            pair given twice.
    """
    by_protocol: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        for name, res in protocols(run).items():
            if any(r["seed"] == res["seed"] for r in by_protocol[name]):
                raise ValueError(f"{name} seed {res['seed']} is given twice; give each run once")
            by_protocol[name].append(res)
    heads = {tuple(res.get(key, "test" if key == "split_kind" else None) for key in SAME_KEYS)
             for results in by_protocol.values() for res in results}
    if len(heads) > 1:
        raise ValueError(f"runs to pool must share {', '.join(SAME_KEYS)}; got {sorted(heads, key=str)}")
    return {name: sorted(res, key=lambda r: r["seed"]) for name, res in by_protocol.items()}


# ---- per-user values of a cell ------------------------------------------------------------------
def _cell(res: dict, target: Target) -> dict:
    """The cell's {method: metrics} of a run's results."""
    return res["results"].get(target.cell, {}) if target.protocol == "user-cold" else res["results"]


def has(res: dict, target: Target, method: str) -> bool:
    """The method ran in the target's cell (its value may still be null: no event in the cell)."""
    return target.metric(res["k"]) in _cell(res, target).get(method, {})


def per_user(res: dict, target: Target, method: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(numerators, denominators) per user of `method` in the target's cell, None without per-user
    values: the metric is sum(numerators) / sum(denominators)."""
    pu = res.get("per_user")
    if pu is None:
        return None
    if target.protocol == "replay":
        hits = np.asarray(pu["results"][method]["hits"], np.float64)
        keep = np.asarray(pu["cold_user"], bool) if target.cell == "cold_users" else np.ones(len(hits), bool)
        return hits[keep], np.asarray(pu["events"], np.float64)[keep]
    cell = pu["results"].get(target.cell, {}) if target.protocol == "user-cold" else pu["results"]
    values = np.asarray(cell[method][target.metric(res["k"])], np.float64)
    return values, np.ones(len(values))


def cell_mean(res: dict, target: Target, method: str) -> float:
    """The method's metric in the cell: from the per-user values when the run has them."""
    values = per_user(res, target, method)
    if values is None:
        value = _cell(res, target)[method][target.metric(res["k"])]
        return math.nan if value is None else float(value)
    num, den = values
    return float(num.sum() / den.sum()) if den.sum() else math.nan


# ---- verdicts -----------------------------------------------------------------------------------
def judge(results: list[dict], target: Target) -> dict:
    """The target's best baseline, mean ratio over seeds, 95% interval and verdict."""
    k = results[0]["k"]
    rivals = [m for m in target.rivals if all(has(r, target, m) for r in results)]
    out = {"protocol": target.protocol, "cell": target.cell, "metric": target.metric(k),
           "target": target.times, "baselines": list(target.rivals), "rivals": rivals, "best": None, "mean": {}, "ratio": None,
           "per_seed_ratio": None, "ci95": None, "met": None}
    if not rivals:
        return {**out, "note": "no baseline of the target in every run"}
    mean = {m: float(np.mean([cell_mean(r, target, m) for r in results])) for m in rivals}
    best = max(rivals, key=lambda m: (mean[m], -rivals.index(m)))
    out.update(best=best, mean={best: _num(mean[best])})
    if not all(has(r, target, METHOD) for r in results):
        return {**out, "note": f"no {METHOD} in every run"}
    out["mean"][METHOD] = _num(float(np.mean([cell_mean(r, target, METHOD) for r in results])))
    return {**out, **_interval(results, target, best)}


def _interval(results: list[dict], target: Target, best: str) -> dict:
    pairs = [(r["seed"], per_user(r, target, METHOD), per_user(r, target, best)) for r in results]
    if any(a is None for _, a, _ in pairs):
        ratios = [cell_mean(r, target, METHOD) / cell_mean(r, target, best) for r in results]
        return {"ratio": _num(float(np.mean(ratios))), "per_seed_ratio": [_num(x) for x in ratios],
                "note": "no per-user values in the files: no interval, no verdict"}
    if any(len(a[0]) == 0 for _, a, _ in pairs):
        return {"note": "no user in this cell"}
    iv = paired_bootstrap([Paired(seed, a[0], b[0]) for seed, a, b in pairs])
    return {"ratio": _num(iv.ratio), "per_seed_ratio": [_num(x) for x in iv.per_seed],
            "ci95": [_num(iv.low), _num(iv.high)], "met": bool(iv.ratio >= target.times and iv.low > 1.0)}


def _num(x: float) -> float | None:
    """JSON has no inf or nan: a ratio over a baseline that scored 0, or a mean over no event,
    is written as null."""
    return float(x) if math.isfinite(x) else None


# ---- means of every method ---------------------------------------------------------------------
def _mean_table(results: list[dict]) -> dict:
    """{method: {metric: mean over the runs that have it}} of a list of {method: {metric: v}}."""
    table: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for res in results:
        for method, metrics in res.items():
            for name, value in metrics.items():
                if value is not None:
                    table[method][name].append(value)
    return {m: {name: float(np.mean(v)) for name, v in metrics.items()} for m, metrics in table.items()}


def _means(name: str, results: list[dict]) -> dict:
    if name != "user-cold":
        return _mean_table([r["results"] for r in results])
    return {cell: _mean_table([r["results"][cell] for r in results if cell in r["results"]])
            for cell in results[0]["results"]}


def _rises(means: dict, k: int) -> dict:
    by_reveal = {cell: means[cell].get(METHOD, {}).get(f"recall@{k}") for cell in means}
    path = [by_reveal.get(cell) for cell in RISING_REVEALS]
    rises = None if None in path else all(a <= b for a, b in zip(path, path[1:]))
    return {"kindling_recall_by_reveal": by_reveal, "kindling_rises_1_to_5": rises}


def summarise(files: list[dict]) -> dict:
    """{"seeds", "dataset", "k", "min_value", "split_kind", "bootstrap", and per protocol:
    {"seeds", "mean": every method's means, "targets": [judge(...)], ...}}."""
    pooled = pool(expand(files))
    first = next(iter(pooled.values()))[0]
    out: dict = {"seeds": sorted({r["seed"] for res in pooled.values() for r in res}),
                 **{key: first.get(key, "test" if key == "split_kind" else None) for key in SAME_KEYS},
                 "bootstrap": {"replicates": REPLICATES, "seed": BOOTSTRAP_SEED, "level": LEVEL,
                               "resampled": "users, paired, within each seed"}}
    for name in PROTOCOL_NAMES:
        if name in pooled:
            results = pooled[name]
            section = {"seeds": [r["seed"] for r in results], "mean": _means(name, results),
                       "targets": [judge(results, t) for t in TARGETS if t.protocol == name]}
            if name == "user-cold":
                section.update(_rises(section["mean"], first["k"]))
            out[name] = section
    return out


# ---- markdown ----------------------------------------------------------------------------------
def _f(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def targets_table(targets: list[dict]) -> list[str]:
    """A markdown table of verdicts: cell, best baseline, means, ratio, interval, target, verdict."""
    lines = ["| cell | best baseline | kindling | baseline | ratio | 95% interval | target | verdict |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: | --- |"]
    for t in targets:
        best = t["best"]
        ci = "–" if not t["ci95"] else f"[{_f(t['ci95'][0], 3)}, {_f(t['ci95'][1], 3)}]"
        verdict = {True: "met", False: "not met", None: t.get("note", "–")}[t["met"]]
        cell = t["metric"] if t["cell"] in ("all", "cold_users") else f"{t['metric']}, {t['cell']}"
        lines.append(f"| {cell} | {best or 'none of ' + ', '.join(t['baselines'])} | {_f(t['mean'].get(METHOD))} | "
                     f"{_f(t['mean'].get(best))} | {_f(t['ratio'], 3)} | {ci} | {t['target']:.2f}x | {verdict} |")
    return lines


def _method_rows(mean: dict, columns: list[str]) -> list[str]:
    lines = ["| method | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    return lines + [f"| {m} | " + " | ".join(_f(v.get(c)) for c in columns) + " |" for m, v in mean.items()]


def markdown(summary: dict) -> str:
    seeds = ", ".join(str(s) for s in summary["seeds"])
    lines = [f"{summary['dataset']}, {summary['split_kind']} split, mean over seeds {seeds}. Intervals: "
             f"per-user paired bootstrap, {summary['bootstrap']['replicates']} replicates, 95%."]
    for name in PROTOCOL_NAMES:
        if name not in summary:
            continue
        s = summary[name]
        lines += ["", f"### {name}", ""]
        if name == "user-cold":
            k = summary["k"]
            cells = list(s["mean"])
            methods = list(dict.fromkeys(m for c in cells for m in s["mean"][c]))
            table = {m: {c: s["mean"][c].get(m, {}).get(f"recall@{k}") for c in cells} for m in methods}
            lines += _method_rows(table, cells) + [""]
            rises = {True: "yes", False: "no", None: "–"}[s["kindling_rises_1_to_5"]]
            lines += [f"kindling recall@{k} rises from reveal 1 to 5: {rises}", ""]
        else:
            columns = list(dict.fromkeys(c for v in s["mean"].values() for c in v))
            lines += _method_rows(s["mean"], columns) + [""]
        lines += targets_table(s["targets"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files written by kindling eval --json")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    parser.add_argument("--json", dest="json_out", type=Path, help="also write the summary as JSON here")
    args = parser.parse_args(argv)
    try:
        summary = summarise([json.loads(p.read_text()) for p in args.runs])
    except (ValueError, KeyError) as exc:
        parser.error(f"cannot summarise these files: {exc}")
    text = markdown(summary)
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
