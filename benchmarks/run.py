"""Kindling latency benchmarks: recommend, feedback-to-effect, add/remove, build, memory, recall, encoder.

    python benchmarks/run.py --quick          # 10k and 100k items, ~3 minutes
    python benchmarks/run.py                  # 10k, 100k and 1M items (the 1M HNSW build is long)
    python benchmarks/run.py --sizes 10000 --no-encoder

Results (machine, load, every number, as JSON, and the table as Markdown) go to a scratch folder
(`$TMPDIR/kindling-bench/<mode>-<time>.json` and `.md`, printed at the end) unless `--out NAME`
asks for benchmarks/results/NAME.json and NAME.md: only a deliberate run replaces the committed
results. benchmarks/README.md explains them against the targets of the issue.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_data as data  # noqa: E402
import bench_encoder  # noqa: E402
import bench_engine as be  # noqa: E402
import bench_timing as bt  # noqa: E402
import report  # noqa: E402
from engine import Config, Event  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SCRATCH = Path(tempfile.gettempdir()) / "kindling-bench"

PLANS: dict[str, dict[str, Any]] = {
    "quick": {"sizes": [10_000, 100_000], "queries": 200, "f2e": 100, "adds": 10, "removals": 20,
              "ingest": 256, "rounds": 1, "agree": 256, "single": 8, "trained": [], "nofsync": [10_000],
              "compressed": {10_000: ["hnsw-sq8"]}},
    "full": {"sizes": [10_000, 100_000, 1_000_000], "queries": 500, "f2e": 300, "adds": 30, "removals": 50,
             "ingest": 1024, "rounds": 2, "agree": 1024, "single": 30, "trained": [10_000],
             "nofsync": [10_000, 100_000],
             "compressed": {10_000: ["hnsw-sq8"], 100_000: ["hnsw-sq8", "ivf-pq"], 1_000_000: ["ivf-pq"]}},
}
# Per-request threading: as shipped (FAISS and torch use every core for each call), and one thread
# per request (what OMP_NUM_THREADS=1 gives; proposed for index.py and the encoder).
MODES: dict[str, int | None] = {"shipped": None, "1-thread": 1}
# The compressed kinds as benchmarked: HNSW with M=16 over SQ8 codes; IVF-PQ with FAISS's 8-bit codes.
COMPRESSED = {"hnsw-sq8": {"index": "hnsw-sq8", "hnsw_m": 16}, "ivf-pq": {"index": "ivf-pq"}}
# At 1M the default nlist (4 sqrt(n) = 4000) makes k-means train on all 1M points: ~1 h on 2 cores.
IVF_NLIST_1M = 1024


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {bt.load()[0]}] {msg}", file=sys.stderr, flush=True)


def measure_size(n: int, plan: dict[str, Any], args, centres, fallback, int8) -> dict[str, Any]:
    s = be.new_setup(n, centres, plan["queries"], fallback, log)
    out: dict[str, Any] = {"engines": {}}
    try:
        ann_kind = args.ann_1m if n >= 1_000_000 else "hnsw"
        ann_cfg = {"index": ann_kind, "hnsw_ef_construction": args.ef_construction}
        if ann_kind == "ivf" and n >= 1_000_000:
            ann_cfg["ivf_nlist"] = IVF_NLIST_1M
        configs = {"exact": Config(index="flat"), "ann": Config(**ann_cfg)}
        if n in plan["nofsync"]:
            configs["ann-nofsync"] = Config(**ann_cfg, fsync=False)
        for kind in plan["compressed"].get(n, []):
            extra = {"ivf_nlist": IVF_NLIST_1M} if kind == "ivf-pq" and n >= 1_000_000 else {}
            configs[kind] = Config(**COMPRESSED[kind], **extra)
        for name, cfg in configs.items():
            log(f"{n:,} items: building {name} ({cfg.index})")
            out["engines"][name] = be.build(s, name, cfg)
        searched = [k for k in configs if k not in ("exact", "ann-nofsync")]
        log(f"{n:,}: recall")
        out["recall"] = be.recall(s, "exact", searched)
        log(f"{n:,}: recommend latency")
        out["latency"] = be.latency(s, ["exact"] + searched, MODES)
        log(f"{n:,}: feedback to effect")
        out["feedback_to_effect"] = {m: {k: be.feedback_to_effect(s, k, plan["f2e"], t)
                                         for k in ("ann", "ann-nofsync") if k in configs}
                                     for m, t in MODES.items()}
        log(f"{n:,}: one-item add, removal")
        out["one_item_add"] = {m: one_item_adds(s, plan, fallback, int8, t, m) for m, t in MODES.items()}
        out["removal"] = be.removal(s, "ann", plan["removals"])
        if n in plan["trained"]:
            out["trained"] = trained(s, plan)
    finally:
        be.close_all(s)
        shutil.rmtree(s.root, ignore_errors=True)
    out["load"] = bt.load()
    return out


def one_item_adds(s: be.Setup, plan, fallback, int8, threads: int | None, mode: str) -> dict[str, Any]:
    catalog = data.catalog_items()[1000 if threads else 0:]
    # texts unique per size and mode: the encoder's cache must not answer for the model
    out = {"torch": be.one_item_add(s, "ann", catalog, plan["adds"], f"new-t-{s.n}-{mode}-", threads)}
    if int8 is not None:
        enc = s.engines["ann"]._core.encoders.current  # the LookupEncoder this engine was built with (read-only use)
        enc.fallback = int8
        out["onnx-int8"] = be.one_item_add(s, "ann", catalog[500:], plan["adds"], f"new-q-{s.n}-{mode}-",
                                           threads)
        enc.fallback = fallback
    return out


def trained(s: be.Setup, plan) -> dict[str, Any]:
    """fit() both engines on the same logged clicks, then time recommend and feedback again."""
    clicks = data.user_clicks(s.vectors, 300, 8, seed=s.n + 2)
    events = [Event(f"t{u}", f"s{r}", "click", 1.0, 1_700_000_000 + j)
              for u, rows in enumerate(clicks) for j, r in enumerate(rows)]
    out: dict[str, Any] = {"events": len(events)}
    for name in ("exact", "ann"):
        log(f"{s.n:,}: fit {name}")
        t = time.perf_counter()
        s.engines[name].import_events(events)  # fit trains only; the history comes in first
        summary = s.engines[name].fit(events, progress=False)
        out[f"fit_s_{name}"] = round(time.perf_counter() - t, 1)
        out["fit_summary"] = {k: v for k, v in summary.items() if not k.endswith("_loss")}
    out["index_dim"] = s.engines["ann"].stats()["index"]["dim"]
    out["latency"] = be.latency(s, ["exact", "ann"], MODES)
    out["feedback_to_effect"] = {m: be.feedback_to_effect(s, "ann", plan["f2e"] // 2, t) for m, t in MODES.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="10k and 100k only (about 3 minutes)")
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], help="e.g. 10000,100000")
    p.add_argument("--ann-1m", choices=("hnsw", "ivf"), default="hnsw", help="ANN kind at 1M items")
    p.add_argument("--ef-construction", type=int, default=Config().hnsw_ef_construction)
    p.add_argument("--no-encoder", action="store_true", help="skip the encoder backends section")
    p.add_argument("--out", help="write benchmarks/results/OUT.json and OUT.md (the committed results); "
                                 "without it the results go to a scratch folder")
    args = p.parse_args(argv)
    mode = "quick" if args.quick else "full"
    plan = dict(PLANS[mode], sizes=args.sizes or PLANS[mode]["sizes"])
    result: dict[str, Any] = {"mode": mode, "started": dt.datetime.now().isoformat(timespec="seconds"),
                              "machine": bt.machine(), "git": _git(), "load_start": bt.load(),
                              "plan": _jsonable(plan),
                              "config": Config().to_dict(), "ann_1m": args.ann_1m,
                              "ef_construction": args.ef_construction}
    t0 = time.perf_counter()
    dest = RESULTS / args.out if args.out else SCRATCH / f"{mode}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    centres = data.catalog_vectors(log)
    if not args.no_encoder:
        log("encoder backends")
        result["encoder"] = bench_encoder.run(plan["ingest"], plan["rounds"], plan["agree"], plan["single"], log)
    from engine.text.encoder import Encoder

    fallback = Encoder(show_progress=False)
    int8 = None
    if "onnx-int8" in bench_encoder.available_backends():
        int8 = Encoder(backend="onnx-int8", show_progress=False)
    result["sizes"] = {}
    for n in plan["sizes"]:
        result["sizes"][str(n)] = measure_size(n, plan, args, centres, fallback, int8)
        _write(result, dest, t0)  # a long run keeps what it measured so far
    _write(result, dest, t0)
    print(report.table(result))
    print(f"results: {dest}.json and {dest}.md", file=sys.stderr)
    return 0


def _git() -> dict[str, Any]:
    """The commit measured, and whether engine/ had uncommitted changes."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"), "engine_dirty": bool(git("status", "--porcelain", "engine"))}


def _jsonable(plan: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(plan, default=str))


def _write(result: dict[str, Any], dest: Path, t0: float) -> None:
    result["load_end"] = bt.load()
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.with_name(dest.name + ".json").write_text(json.dumps(result, indent=1) + "\n")
    dest.with_name(dest.name + ".md").write_text(report.table(result) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
