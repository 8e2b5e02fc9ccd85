"""Resident memory of a saved store, opened by a fresh process: after open, after serving, after adds.

    python benchmarks/memory.py --n 100000 --kinds hnsw hnsw-sq8 [--fit] [--before DIR] [--out FILE]

Builds each store once (synthetic clustered catalog of bench_data, `Config(index=kind)`, 300
users with 8 clicks each, saved and closed), then measures it in a new process per code version:
this checkout ("after") and, with `--before DIR`, an older copy of the `engine` package in DIR
(e.g. `git archive <commit> engine | tar -x -C DIR`). Readings come from /proc/self/status after a
garbage collection and malloc_trim: VmRSS (what `ps`/`top` call RSS) = RssAnon (the process's
own memory) + RssFile (file pages mapped and resident: shared libraries and, with the mapped
vectors, the touched rows of the snapshot's vectors file) + RssShmem. Per item figures subtract
the reading taken before `Engine.open` (interpreter, numpy, faiss, torch as imported).

Steps measured: open (writer, no encoder), 1,000 recommend(k=10) over the users, 1,000 items
added with their vectors (the in-memory tail), and a save (the tail goes back to the file).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import bench_data as data  # noqa: E402
import bench_timing as bt  # noqa: E402

RAW = 4 * data.DIM  # bytes of one float32 text vector
USERS, CLICKS = 300, 8


def status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem of this process in bytes (after gc and malloc_trim)."""
    bt.rss_bytes()  # collects and trims
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(val.split()[0]) * 1024
    return out


def build(store: Path, n: int, kind: str, fit: bool) -> dict[str, Any]:
    from engine import Config, Engine, Event

    vecs, _ = data.synthetic(data.catalog_vectors(), n, seed=n)
    clicks = data.user_clicks(vecs, USERS, CLICKS, seed=n + 2)
    t = time.perf_counter()
    eng = Engine.create(store, Config(index=kind), encoder=data.LookupEncoder(vecs))
    eng.ingest(data.synthetic_items(n), progress=False)
    events = [Event(f"u{u}", f"s{r}", "click") for u, rows in enumerate(clicks) for r in rows]
    eng.record_many(events)
    if fit:
        eng.fit(events, progress=False)
    eng.close()
    return {"build_s": round(time.perf_counter() - t, 1)}


def measure(store: Path, n: int, requests: int, adds: int) -> dict[str, Any]:
    from engine import Engine, Item

    _warm_up(store.parent / f"{store.name}.warm-up")
    steps = {"start": status()}
    eng = Engine.open(store)
    steps["open"] = status()
    for i in range(requests):
        eng.recommend(f"u{i % USERS}", 10)
    steps["served"] = status()
    rng = np.random.default_rng(7)
    new = rng.standard_normal((adds, data.DIM)).astype(np.float32)
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    eng.add_items([Item(f"new{i}", f"new item {i}") for i in range(adds)], vectors=new)
    steps["added"] = status()
    eng.save()
    steps["saved"] = status()
    eng.close()
    base = steps["start"]
    out: dict[str, Any] = {}
    for name, s in steps.items():
        out[name] = {k: v for k, v in s.items()}
        if name != "start":
            out[name]["per_item"] = {k: round((s[k] - base[k]) / n, 1) for k in ("VmRSS", "RssAnon", "RssFile")}
            out[name]["x_raw"] = {k: round((s[k] - base[k]) / n / RAW, 2) for k in ("VmRSS", "RssAnon", "RssFile")}
    return out


def _warm_up(path: Path) -> None:
    """Open, serve and save a 50-item store first, so the baseline holds every library and
    lazily imported module the measured store will (their pages are not the store's)."""
    import shutil

    from engine import Config, Engine, Event

    shutil.rmtree(path, ignore_errors=True)
    vecs = data.synthetic(data.catalog_vectors()[:20], 50, seed=1)[0]
    with Engine.create(path, Config(index="flat"), encoder=data.LookupEncoder(vecs)) as eng:
        eng.ingest(data.synthetic_items(50), progress=False)
        eng.record_many([Event("w", f"s{i}", "click") for i in range(5)])
    with Engine.open(path) as eng:
        eng.recommend("w", 10)
    shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--kinds", nargs="+", default=["hnsw", "hnsw-sq8"])
    p.add_argument("--fit", action="store_true", help="also a trained store (hnsw, fit on the clicks)")
    p.add_argument("--root", type=Path, default=Path("/tmp/kindling-memory"))
    p.add_argument("--before", type=Path, help="a directory holding an older `engine` package")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--adds", type=int, default=1000)
    p.add_argument("--out", type=Path)
    p.add_argument("--step", choices=["build", "measure"], help=argparse.SUPPRESS)
    p.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--kind", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.step == "build":
        print(json.dumps(build(a.store, a.n, a.kind, a.fit)))
        return
    if a.step == "measure":
        print(json.dumps(measure(a.store, a.n, a.requests, a.adds)))
        return
    here = str(Path(__file__).resolve().parent.parent)
    versions = {"after": here, **({"before": str(a.before.resolve())} if a.before else {})}
    stores = [(k, False) for k in a.kinds] + ([("hnsw", True)] if a.fit else [])
    results: dict[str, Any] = {"n": a.n, "raw_bytes_per_item": RAW, "machine": bt.machine(),
                               "note": "2-core host shared with other jobs (load in 'load')", "stores": {}}
    for kind, fit in stores:
        name = f"{kind}{'-fit' if fit else ''}-{a.n}"
        store = a.root / name
        entry: dict[str, Any] = {}
        if not (store / "manifest.json").exists():
            entry["build"] = _run(here, ["--step", "build", "--store", str(store), "--n", str(a.n), "--kind", kind]
                                  + (["--fit"] if fit else []))
        for label, path in versions.items():
            # the store is copied per version: each measure saves once (adds), and "before" must
            # open the very store "after" opens
            copy = a.root / f"{name}.{label}"
            subprocess.run(["rm", "-rf", str(copy)], check=True)
            subprocess.run(["cp", "-r", str(store), str(copy)], check=True)
            subprocess.run(["rm", "-f", str(copy / "LOCK")], check=True)
            entry[label] = _run(path, ["--step", "measure", "--store", str(copy), "--n", str(a.n),
                                       "--requests", str(a.requests), "--adds", str(a.adds)])
            entry[label]["load"] = bt.load()
            subprocess.run(["rm", "-rf", str(copy)], check=True)
            print(name, label, json.dumps({s: entry[label][s].get("x_raw") for s in
                                           ("open", "served", "added", "saved")}), flush=True)
        results["stores"][name] = entry
    text = json.dumps(results, indent=1)
    if a.out:
        a.out.write_text(text)
    print(text)


def _run(pythonpath: str, args: list[str]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{args[:2]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
