"""`kindling demo`: the main job, on the bundled MovieLens sample, told step by step."""

from __future__ import annotations

import time
from pathlib import Path

import click

from .text.catalog import read_events, read_items
from .engine import Engine
from .types import Item, Recommendation

PROFILE = "I love animated films for children"
CLICKS = ("Toy Story (1995)", "Finding Nemo (2003)", "Monsters, Inc. (2001)")
NEW_ITEM = Item("kindling-demo-1", "Paws Across the Stars (2026)",
                "An animated adventure for the whole family: a litter of talking puppies builds a "
                "rocket to bring their lost mother home from the Moon.",
                ("Animation", "Children", "Adventure", "Comedy"))


def bundled_data() -> Path:
    """index_data/movielens-small beside the package (a source checkout) or in the working dir."""
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        cand = root / "index_data" / "movielens-small"
        if (cand / "items.parquet").is_file():
            return cand
    raise click.ClickException("bundled data index_data/movielens-small not found; pass --data DIR")


def show(title: str, recs: list[Recommendation], before: list[Recommendation] | None = None) -> None:
    click.secho(f"\n{title}", bold=True)
    old = {r.item_id: n for n, r in enumerate(before or [], 1)}
    for n, r in enumerate(recs, 1):
        if before is None:
            mark = ""
        elif r.item_id not in old:
            mark = click.style("  new", fg="green")
        elif old[r.item_id] != n:
            mark = f"  (was {old[r.item_id]})"
        else:
            mark = ""
        click.echo(f"  {n:>2}. {r.title:<60} {r.score:6.3f}{mark}")
    if before is not None:
        gone = [r.title for r in before if r.item_id not in {x.item_id for x in recs}]
        if gone:
            click.echo("  dropped: " + "; ".join(gone))


def build(store: Path, data: Path) -> Engine:
    if store.exists():
        click.echo(f"Reusing the store at {store} (delete it to rebuild).")
        return Engine.open(store)
    items = read_items(data)
    click.echo(f"Building a store at {store} from {data}: {len(items):,} items.")
    eng = Engine.create(store)
    t0 = time.perf_counter()
    eng.ingest(items, progress=None)
    click.echo(f"Embedded and indexed {len(items):,} items in {time.perf_counter() - t0:.1f} s.")
    events = read_events(data, min_value=4.0)
    t0 = time.perf_counter()
    eng.import_events(events)
    summary = eng.fit(events, progress=None)
    click.echo(f"Imported and learned from {len(events):,} logged events in {time.perf_counter() - t0:.1f} s "
               f"({', '.join(f'{k}={v}' for k, v in summary.items() if not isinstance(v, dict))}).")
    return eng


def run_demo(store: Path, data: Path | None = None) -> None:
    data = data or bundled_data()
    eng = build(store, data)
    user = f"demo-user-{int(time.time())}"
    try:
        click.secho(f'\n1. A brand-new user ({user}) types a profile: "{PROFILE}"', bold=True)
        first = eng.recommend(user, k=10, profile=PROFILE)
        show("Top 10 from the profile alone:", first)

        by_title = {eng.get_item(i).title: i for i in _find_titles(eng, data, CLICKS)}
        click.secho(f"\n2. {user} clicks three movies: {'; '.join(by_title)}", bold=True)
        for item_id in by_title.values():
            eng.record(user, item_id, "click")
        eng.settle()  # the clicks' reranker steps, which record() leaves to the step worker
        after = eng.recommend(user, k=10)
        show("Top 10 after three clicks (compared with before):", after, first)

        click.secho(f"\n3. A new movie arrives: {NEW_ITEM.title}", bold=True)
        eng.add_items([NEW_ITEM], upsert=True)
        live = eng.recommend(user, k=10)
        rank = next((n for n, r in enumerate(live, 1) if r.item_id == NEW_ITEM.item_id), None)
        show("Top 10 right after it was added:", live, after)
        click.echo(f"  -> the new movie is at rank {rank}" if rank else
                   "  -> the new movie is not in this user's top 10")
        similar = eng.similar_items(NEW_ITEM.item_id, k=5)
        click.echo("  its nearest movies: " + "; ".join(r.title for r in similar))
    finally:
        eng.close()
    click.secho("\n4. Restart: the store is closed and opened again.", bold=True)
    with Engine.open(store) as again:
        restored = again.recommend(user, k=10)
        same = [r.item_id for r in restored] == [r.item_id for r in live]
        click.echo(f"  history kept: {len(again.user_history(user))} clicks; "
                   f"new movie present: {NEW_ITEM.item_id in again}; "
                   f"same top 10 as before the restart: {'yes' if same else 'NO'}")


def _find_titles(eng: Engine, data: Path, titles: tuple[str, ...]) -> list[str]:
    """Item ids of the given titles (exact match) among the dataset's items that the store holds."""
    wanted = set(titles)
    found = {i.title: i.item_id for i in read_items(data) if i.title in wanted and i.item_id in eng}
    return [found[t] for t in titles if t in found]
