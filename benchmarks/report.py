"""Markdown tables and target verdicts from a results JSON: `python benchmarks/report.py results/full.json`."""

from __future__ import annotations

import json
import sys
from typing import Any

RAW_BYTES = 384 * 4  # one float32 MiniLM vector


def _f(x: Any, nd: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _lat(d: dict | None) -> str:
    return "–" if not d else f"{d['p50_ms']:.2f} / {d['p95_ms']:.2f} / {d['p99_ms']:.2f}"


def build_table(res: dict[str, Any]) -> list[str]:
    rows = ["| items | engine | index | build s | ingest s | index B/item | RSS B/item | recall@10 "
            "| recall@10 in 200 cand. | index search p50 / p99 ms (1 thread) |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for n, size in res.get("sizes", {}).items():
        for name, eng in size["engines"].items():
            rc = size.get("recall", {}).get(name, {})
            rows.append(f"| {int(n):,} | {name} | {eng['kind']}{'' if eng['fsync'] else ' (fsync off)'} | "
                        f"{_f(eng['build_s'], 1)} | {_f(eng['ingest_s'], 1)} | {_f(eng['index_bytes_per_item'], 0)} | "
                        f"{_f(eng['rss_bytes_per_item'], 0)} | {_f(rc.get('recall_at_10'), 3)} | "
                        f"{_f(rc.get('recall_at_10_in_candidates'), 3)} | {_pair(rc.get('index_search'))} |")
    return rows


def _pair(d: dict | None) -> str:
    return "–" if not d else f"{d['p50_ms']:.2f} / {d['p99_ms']:.2f}"


def latency_rows(lat: dict[str, Any], label: str) -> list[str]:
    rows = []
    for mode, engines in lat.items():
        ex = engines["exact"]
        for name, d in engines.items():
            ratio = d["qps_2_threads"] / ex["qps_2_threads"]
            rows.append(f"| {label} | {mode} | {name} | {_lat(d['recommend'])} | {_f(d['qps_2_threads'], 0)} | "
                        f"{_f(ratio, 1)}x | {_f(ex['recommend']['p50_ms'] / d['recommend']['p50_ms'], 1)}x |")
    return rows


def latency_table(res: dict[str, Any]) -> list[str]:
    rows = ["| items | threads per request | engine | recommend p50 / p95 / p99 ms | qps (2 threads) "
            "| qps vs exact | p50 speed-up vs exact |", "|---:|---|---|---|---:|---:|---:|"]
    for n, size in res.get("sizes", {}).items():
        rows += latency_rows(size.get("latency", {}), f"{int(n):,}")
    for n, size in res.get("sizes", {}).items():
        if size.get("trained"):
            rows += latency_rows(size["trained"]["latency"], f"{int(n):,} after fit()")
    return rows


def mutations_table(res: dict[str, Any]) -> list[str]:
    rows = ["| items | threads per request | feedback-to-effect p50 / p99 ms (fsync on) | its record() p50 / p99 "
            "| feedback-to-effect p50 / p99 (fsync off) | one-item add p50 / p99 (torch) "
            "| one-item add p50 / p99 (onnx-int8) |", "|---:|---|---|---|---|---|---|"]
    for n, size in res.get("sizes", {}).items():
        for mode, f2e in size.get("feedback_to_effect", {}).items():
            on, off = f2e.get("ann", {}), f2e.get("ann-nofsync")
            adds = size.get("one_item_add", {}).get(mode, {})
            rows.append(f"| {int(n):,} | {mode} | {_pair(on)} | {_pair(on.get('record'))} | {_pair(off)} | "
                        f"{_pair(adds.get('torch'))} | {_pair(adds.get('onnx-int8'))} |")
        if size.get("trained"):
            for mode, f in size["trained"]["feedback_to_effect"].items():
                rows.append(f"| {int(n):,} after fit() | {mode} | {_pair(f)} | {_pair(f.get('record'))} "
                            "| – | – | – |")
    rows += ["", "| items | removal p50 / p99 ms | fit() s (exact / ann) |", "|---:|---|---|"]
    for n, size in res.get("sizes", {}).items():
        t = size.get("trained") or {}
        rows.append(f"| {int(n):,} | {_pair(size.get('removal'))} | "
                    f"{t.get('fit_s_exact', '–')} / {t.get('fit_s_ann', '–')} |")
    return rows


def encoder_table(res: dict[str, Any]) -> list[str]:
    enc = res.get("encoder")
    if not enc:
        return []
    rows = ["| backend | ingest items/s (median of rounds) | vs torch | cosine to torch mean / min "
            "| one text p50 / p99 ms |", "|---|---:|---:|---|---|"]
    for b in enc["backends"]:
        d = enc[b]
        cos = "1 (reference)" if b == "torch" else f"{d['cosine_mean']:.4f} / {d['cosine_min']:.4f}"
        st = d["single_text"]
        rows.append(f"| {b} | {d['ingest_items_per_s']:.1f} | {d['ratio_vs_torch']:.2f}x | {cos} | "
                    f"{st['p50_ms']:.1f} / {st['p99_ms']:.1f} |")
    return rows


def targets(res: dict[str, Any]) -> list[str]:
    """One line per target of the issue: the measured figure per threading mode, and met / missed."""
    out = ["| target | as shipped | 1 thread per request |", "|---|---|---|"]
    sizes = res.get("sizes", {})

    def line(name: str, fmt, ok, per_mode: dict[str, Any]) -> None:
        cells = [f"{fmt(v)}: **{'met' if ok(v) else 'missed'}**" if v is not None else "–"
                 for v in (per_mode.get("shipped"), per_mode.get("1-thread"))]
        out.append(f"| {name} | {cells[0]} | {cells[1]} |")

    def both(value) -> dict[str, Any]:
        return {"shipped": value, "1-thread": value}

    ms = lambda v: f"{v:.2f} ms"  # noqa: E731
    big = sizes.get("1000000")
    if big:
        lat = big["latency"]
        line("1M: recommend p99 <= 10 ms", ms, lambda v: v <= 10,
             {m: e["ann"]["recommend"]["p99_ms"] for m, e in lat.items()})
        line("1M: >= 10x exact throughput", lambda v: f"{v:.1f}x", lambda v: v >= 10,
             {m: e["ann"]["qps_2_threads"] / e["exact"]["qps_2_threads"] for m, e in lat.items()})
        line("1M: ANN recall@10 >= 0.95", lambda v: f"{v:.3f}", lambda v: v >= 0.95,
             both(big["recall"]["ann"]["recall_at_10"]))
    if "100000" in sizes:
        line("100k: recommend p99 <= 3 ms", ms, lambda v: v <= 3,
             {m: e["ann"]["recommend"]["p99_ms"] for m, e in sizes["100000"]["latency"].items()})
    for n, size in sizes.items():
        f2e = size.get("feedback_to_effect", {})
        for name in ("ann", "ann-nofsync"):
            per = {m: d[name]["p99_ms"] for m, d in f2e.items() if name in d}
            if per:
                line(f"{int(n):,}: feedback-to-effect p99 <= 2 ms (fsync {'off' if 'nofsync' in name else 'on'})",
                     ms, lambda v: v <= 2, per)
        for b in ("torch", "onnx-int8"):
            per = {m: d[b]["p50_ms"] for m, d in size.get("one_item_add", {}).items() if b in d}
            if per:
                line(f"{int(n):,}: one-item add p50 <= 25 ms ({b})", ms, lambda v: v <= 25, per)
    enc = res.get("encoder", {})
    if "onnx-int8" in enc:
        d = enc["onnx-int8"]
        line("ingest >= 2x torch at cosine >= 0.99 (onnx-int8)",
             lambda v: f"{v[0]:.2f}x at cosine {v[1]:.4f} (min {v[2]:.3f})", lambda v: v[0] >= 2 and v[1] >= 0.99,
             {"shipped": (d["ratio_vs_torch"], d["cosine_mean"], d["cosine_min"])})
    for n, size in sizes.items():
        ann = size["engines"]["ann"]
        line(f"{int(n):,}: index <= 1.2x raw float32 ({RAW_BYTES} B/item)",
             lambda v: f"{v[0]:.2f}x (RSS {v[1]:.2f}x)", lambda v: v[0] <= 1.2,
             both((ann["index_bytes_per_item"] / RAW_BYTES, ann["rss_bytes_per_item"] / RAW_BYTES)))
        for kind in ("hnsw-sq8", "ivf-pq"):
            if kind in size["engines"]:
                rc = size["recall"][kind]
                v = (ann["index_bytes_per_item"] / size["engines"][kind]["index_bytes_per_item"],
                     rc["recall_at_10"], rc["recall_at_10_in_candidates"])
                line(f"{int(n):,}: {kind} cuts the index >= 3x at recall@10 >= 0.9",
                     lambda v: f"{v[0]:.1f}x at recall {v[1]:.3f} (in 200 cand. {v[2]:.3f})",
                     lambda v: v[0] >= 3 and v[1] >= 0.9, both(v))
    return out


def table(res: dict[str, Any]) -> str:
    m = res["machine"]
    head = (f"{res['mode']} run {res['started']}, {res.get('wall_s', '?')} s; {m['cores']} cores {m['cpu']}, "
            f"load {res['load_start']} -> {res.get('load_end')}; faiss {m['libraries']['faiss']}, "
            f"torch {m['libraries']['torch']}, onnxruntime {m['libraries'].get('onnxruntime', '-')}; "
            f"commit {res.get('git', {}).get('commit', '?')}"
            f"{' + uncommitted engine/ changes' if res.get('git', {}).get('engine_dirty') else ''}")
    parts = [head, "", *build_table(res), "", *latency_table(res), "", *mutations_table(res)]
    if res.get("encoder"):
        parts += ["", *encoder_table(res)]
    return "\n".join(parts + ["", *targets(res)])


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        print(table(json.load(fh)))
