"""`kindling`: a thin admin CLI over the library. Each command parses, calls the engine, prints."""

from __future__ import annotations

import functools
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .version import __version__
from .text.catalog import read_events, read_items
from .config import INDEX_BACKENDS, INDEX_KINDS, Config
from .engine import Engine
from .errors import EngineError
from .serving.filters import Filter
from .types import EVENT_KINDS, Item, Recommendation

STORE = click.Path(path_type=Path)
LOG_CHECKPOINT = 1000  # feedback saves a snapshot once this many records wait in the log


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the engine's errors into one clear line on stderr and exit status 1."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EngineError as exc:
            raise click.ClickException(str(exc)) from exc
        except OSError as exc:  # a file the user named: unreadable, not a directory, disk full, ...
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{where}{exc.strerror or exc}") from exc
    return wrapper


def emit(data: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(data, ensure_ascii=False))
    else:
        for line in lines:
            click.echo(line)


def ranked(key: str, who: str, recs: list[Recommendation]) -> tuple[dict[str, Any], list[str]]:
    """A list as one JSON-ready object and as text lines (with the reason, when it has one)."""
    data = {key: who, "items": [r.as_dict() for r in recs]}
    lines = [f"{n:>3}. {r.title}  [{r.item_id}]  {r.score:.3f}" + (f"  ({r.because})" if r.because else "")
             for n, r in enumerate(recs, 1)]
    return data, lines or ["(no items)"]


def filter_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--category and --not-category (the business rules of `recommend` and `similar`), passed
    as `categories` and `not_categories`; `_filter` makes them a Filter."""
    fn = click.option("--not-category", "not_categories", multiple=True,
                      help="No items of this category; repeat for several.")(fn)
    return click.option("--category", "categories", multiple=True,
                        help="Only items of this category; repeat to allow several (an item needs one of them).")(fn)


def _filter(categories: tuple[str, ...], not_categories: tuple[str, ...]) -> Filter | None:
    """The Filter of --category and --not-category; None when neither is given."""
    if not (categories or not_categories):
        return None
    return Filter(categories_any=categories, categories_none=not_categories)


#: Commands loaded only when run (or asked for their --help), so that the others start fast: name
#: -> (module, attribute, the one-line help that `kindling --help` lists). The evaluation package
#: imports scikit-learn and more, and is an optional extra.
LAZY_COMMANDS = {"eval": ("engine.evaluation.cli", "eval_command",
                          "Measure Kindling against baselines on a dataset (eval extra).")}


class LazyGroup(click.Group):
    """A click group that imports the modules of LAZY_COMMANDS only to run or document one."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in LAZY_COMMANDS:
            return super().get_command(ctx, name)
        module, attr, _ = LAZY_COMMANDS[name]
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError as exc:
            raise click.ClickException(f"'kindling {name}' needs the eval extra "
                                       f"(pip install 'kindling[eval]'): {exc}") from exc

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = super().list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, [*names, *LAZY_COMMANDS]))
        rows = [(name, short) for name, (_, _, short) in LAZY_COMMANDS.items()]
        for name in names:
            cmd = super().get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(sorted(rows))


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="kindling")
def main() -> None:
    """Kindling: cold-start recommendations with a language model, FAISS and online learning."""


@main.command()
@click.argument("store", type=STORE)
@click.option("--model", type=click.Path(exists=True, file_okay=False), default=None,
              help="Local sentence-transformers model folder (default: bundled all-MiniLM-L6-v2).")
@click.option("--index", "index_kind", type=click.Choice(INDEX_KINDS),
              default="auto", show_default=True, help="Index type; auto is exact below 50k items, HNSW above.")
@click.option("--index-backend", type=click.Choice(INDEX_BACKENDS), default="faiss", show_default=True,
              help="Where item vectors are searched: FAISS in process, or a Milvus collection (the scale extra).")
@click.option("--milvus-uri", default=None, metavar="URI",
              help="With --index-backend milvus: a Milvus Lite file ending in .db, or a server address "
                   "(http://host:19530). Default: STORE/milvus.db.")
@click.option("--tune-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="fit first fine-tunes the language model on the co-clicks of its events for this "
                   "many steps and keeps it in the store (0: the model as it is).")
@user_errors
def init(store: Path, model: str | None, index_kind: str, index_backend: str, milvus_uri: str | None,
         tune_steps: int) -> None:
    """Create an empty store at STORE."""
    if milvus_uri is not None and index_backend != "milvus":
        raise click.BadParameter("is only used with --index-backend milvus", param_hint="'--milvus-uri'")
    if milvus_uri is not None and not milvus_uri.startswith(("http://", "https://", "tcp://", "unix:")):
        milvus_uri = str(Path(milvus_uri).resolve())  # a file path as the shell sees it
    try:
        config = Config(model_path=str(Path(model).resolve()) if model else None, index=index_kind,
                        index_backend=index_backend, milvus_uri=milvus_uri, tune_steps=tune_steps)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--milvus-uri' / '--index'") from exc
    Engine.create(store, config).close()
    click.echo(f"created store {store}" + (f" (Milvus at {milvus_uri or Path(store) / 'milvus.db'})"
                                           if index_backend == "milvus" else ""))


@main.command()
@click.argument("store", type=STORE)
@click.argument("file", type=click.Path(exists=True, path_type=Path))
@click.option("--upsert", is_flag=True, help="Replace items whose id is already in the store.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Embed on Ray Data (scale extra): a pool of actors, each loading the model once. "
                   "Alone, starts a local Ray for this run; with ADDRESS (auto, HOST:PORT or "
                   "ray://HOST:10001) joins that cluster. Put it after STORE FILE or write --ray=ADDRESS, "
                   "since a word after --ray is read as the address.")
@click.option("--ray-workers", type=click.IntRange(1, 4096), default=None,
              help="Actors in the --ray pool, one CPU each  [default: 2].")
@click.option("--ray-batch-size", type=click.IntRange(1, 100_000), default=None,
              help="Texts per actor call with --ray  [default: 256].")
@user_errors
def ingest(store: Path, file: Path, upsert: bool, quiet: bool, ray_address: str | None,
           ray_workers: int | None, ray_batch_size: int | None) -> None:
    """Add every item of FILE (Parquet, CSV or JSONL; or a dataset directory) to STORE, atomically.

    With --ray the items are embedded on Ray (local or a cluster) and then added the same way: all
    of them or, on any error, none."""
    if ray_address is None and (ray_workers or ray_batch_size):
        raise click.UsageError("--ray-workers and --ray-batch-size go with --ray")
    embedder = None
    if ray_address is not None:
        from .text.ray_embedding import RayEmbedder, quiet_ray_logs

        embedder = RayEmbedder(ray_address, workers=ray_workers or 2, batch_size=ray_batch_size or 256)
        quiet_ray_logs()
    items = read_items(file)
    with Engine.open(store) as eng:
        n = eng.ingest(items, upsert=upsert, progress=False if quiet else None, embedder=embedder)
    click.echo(f"ingested {n} items into {store}" + (" (embedded on ray)" if embedder else ""))


@main.command("add-item")
@click.argument("store", type=STORE)
@click.option("--id", "item_id", required=True, help="External item id.")
@click.option("--title", required=True)
@click.option("--text", default="", help="Free text (description).")
@click.option("--category", "categories", multiple=True, help="A category; repeat for several.")
@click.option("--upsert", is_flag=True, help="Replace the item if the id exists.")
@user_errors
def add_item(store: Path, item_id: str, title: str, text: str, categories: tuple[str, ...], upsert: bool) -> None:
    """Add one item; it is recommendable at once."""
    with Engine.open(store) as eng:
        eng.add_items([Item(item_id, title, text, categories)], upsert=upsert)
    click.echo(f"added {item_id}")


@main.command("remove-item")
@click.argument("store", type=STORE)
@click.argument("item_ids", nargs=-1, required=True)
@user_errors
def remove_item(store: Path, item_ids: tuple[str, ...]) -> None:
    """Remove items by id; no later recommendation returns them."""
    with Engine.open(store) as eng:
        n = eng.remove_items(item_ids)
    click.echo(f"removed {n} item(s)")


@main.command()
@click.argument("store", type=STORE)
@click.option("--user", "user_id", default=None, help="The user to recommend for (or --users-file).")
@click.option("--users-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A file of user ids, one per line (blank lines and surrounding spaces dropped): one "
                   "list each, from one batched search.")
@click.option("-k", type=click.IntRange(1, 10_000), default=10, show_default=True)
@click.option("--profile", default=None, help="A new user's self-description (saved with the user; --user only).")
@filter_options
@click.option("--diversity", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="0 to 1: trade score for items unlike those above them (maximal marginal relevance).")
@click.option("--explain", is_flag=True, help="Say why each item is there (nearest click or profile, "
                                              "popular, or new item, with the number behind it).")
@click.option("--json", "as_json", is_flag=True,
              help='Print one JSON object ({"users": [...]}, one per user, with --users-file).')
@user_errors
def recommend(store: Path, user_id: str | None, users_file: Path | None, k: int, profile: str | None,
              categories: tuple[str, ...], not_categories: tuple[str, ...], diversity: float, explain: bool,
              as_json: bool) -> None:
    """Top-k recommendations for a user, new or known, or for every user of --users-file."""
    if (user_id is None) == (users_file is None):
        raise click.UsageError("give exactly one of --user and --users-file")
    if users_file is not None and profile is not None:
        raise click.UsageError("--profile goes with --user, not with --users-file")
    flt = _filter(categories, not_categories)
    user_ids = None if users_file is None else _user_ids(users_file)
    eng = Engine.open(store, read_only=profile is None)
    try:
        if user_ids is None:
            lists = [eng.recommend(user_id, k=k, profile=profile, filter=flt, explain=explain, diversity=diversity)]
        else:
            lists = eng.recommend_many(user_ids, k=k, filter=flt, explain=explain, diversity=diversity)
    finally:
        eng.close(save=False)
    if user_ids is None:
        data, lines = ranked("user", user_id, lists[0])
        emit(data, as_json, lines)
        return
    parts = [ranked("user", u, recs) for u, recs in zip(user_ids, lists)]
    emit({"users": [data for data, _ in parts]}, as_json,
         [line for u, (_, lines) in zip(user_ids, parts) for line in (f"{u}:", *lines)])


def _user_ids(path: Path) -> list[str]:
    """The ids of a users file: one a line, surrounding blanks and empty lines dropped."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise click.BadParameter(f"{path} is not UTF-8 text ({exc.reason})", param_hint="'--users-file'") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


@main.command()
@click.argument("store", type=STORE)
@click.argument("item_id")
@click.option("-k", type=click.IntRange(1, 10_000), default=10, show_default=True)
@filter_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors
def similar(store: Path, item_id: str, k: int, categories: tuple[str, ...], not_categories: tuple[str, ...],
            as_json: bool) -> None:
    """Items most similar to ITEM_ID."""
    flt = _filter(categories, not_categories)
    with Engine.open(store, read_only=True) as eng:
        recs = eng.similar_items(item_id, k=k, filter=flt)
    data, lines = ranked("item", item_id, recs)
    emit(data, as_json, lines)


@main.command()
@click.argument("store", type=STORE)
@click.option("--user", "user_id", required=True)
@click.option("--item", "item_id", required=True)
@click.option("--event", type=click.Choice(EVENT_KINDS), default="click", show_default=True)
@user_errors
def feedback(store: Path, user_id: str, item_id: str, event: str) -> None:
    """Record a click, skip, impression or dislike. Durable when this returns.

    A dislike hides the item from the user for good and moves the user away from it."""
    eng = Engine.open(store)
    try:
        eng.record(user_id, item_id, event)
    finally:
        eng.close(save=eng.stats()["pending_log_records"] >= LOG_CHECKPOINT)
    click.echo(f"recorded {event} of {user_id} on {item_id}")


@main.command()
@click.argument("store", type=STORE)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors
def stats(store: Path, as_json: bool) -> None:
    """Counts, index and model of a store."""
    with Engine.open(store, read_only=True) as eng:
        data = eng.stats()
    idx = data["index"] or {}
    lines = [f"store      {data['path']} (generation {data['generation']})",
             f"items      {data['live_items']} live, {data['removed_items']} removed",
             f"users      {data['users']}", f"events     {data['events']}",
             f"index      {idx.get('kind', '-')} dim {idx.get('dim', '-')}, {idx.get('vectors', 0)} vectors",
             f"model      {data['model'].get('name') or data['model'].get('path') or 'all-MiniLM-L6-v2'}",
             f"trained    {'yes' if data['trained'] else 'no'}",
             f"log        {data['pending_log_records']} records since the last snapshot"]
    emit(data, as_json, lines)


@main.command()
@click.argument("store", type=STORE)
@click.argument("events_file", type=click.Path(exists=True, path_type=Path))
@click.option("--min-value", type=float, default=None,
              help="Events of other kinds (rating, ...) count as clicks at or above this value, skips below.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the training summary as JSON.")
@user_errors
def fit(store: Path, events_file: Path, min_value: float | None, quiet: bool, as_json: bool) -> None:
    """Train on logged events (EVENTS_FILE: Parquet, CSV, JSONL or a dataset directory).

    Training only: bring the events into the store's history with `kindling import` first."""
    events = read_events(events_file, min_value=min_value)
    with Engine.open(store) as eng:
        summary = eng.fit(events, progress=False if quiet else None)
    emit(summary, as_json, [f"{k}: {v}" for k, v in summary.items()])


@main.command("import")
@click.argument("store", type=STORE)
@click.argument("events_file", type=click.Path(exists=True, path_type=Path))
@click.option("--min-value", type=float, default=None,
              help="Events of other kinds (rating, ...) count as clicks at or above this value, skips below.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@user_errors
def import_(store: Path, events_file: Path, min_value: float | None, as_json: bool) -> None:
    """Bring past events (EVENTS_FILE) into STORE's history; an event already held is skipped."""
    events = read_events(events_file, min_value=min_value)
    with Engine.open(store) as eng:
        counts = eng.import_events(events)
    emit(counts, as_json, [f"imported {counts['imported']} event(s) into {store}; {counts['already_held']} "
                           f"already held, {counts['unknown_item']} on unknown items"])


@main.command()
@click.argument("store", type=STORE)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A file holding an API key (16+ characters). Every write (POST /events, POST /items, "
                   "DELETE /items/ID, and /recommend with a profile, which is saved) then needs "
                   "'Authorization: Bearer <key>'; reads stay open to anyone who can reach the port.")
@click.option("--replica", is_flag=True,
              help="Serve read-only beside the store's writer, following its log: reads only; writes get 403.")
@click.option("--max-queue", type=click.IntRange(min=0), default=None, metavar="N",
              help="Requests admitted at once, running or waiting; the next is answered 503 with "
                   "Retry-After at once (/healthz and /metrics never are). 0: no limit  [default: 16].")
@click.option("--batch-window-ms", type=click.FloatRange(0, 1000), default=None, metavar="MS",
              help="/recommend calls (without profile or exclude) arriving within MS of each other are "
                   "answered by one batched call, each with the list it would get alone. 0: off  [default: 1].")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True, metavar="N",
              help="Processes serving the one port, to use N cores: the store's writer and N-1 read "
                   "replicas that follow its log; a write that reaches a replica is forwarded to the "
                   "writer. A worker that dies is started again. 1: this process alone.")
@user_errors
def serve(store: Path, host: str, port: int, api_key_file: Path | None, replica: bool,
          max_queue: int | None, batch_window_ms: float | None, workers: int) -> None:
    """Serve STORE over HTTP (the serve extra): one process, the store's only writer.

    With --workers N, N processes share the port: the writer and N-1 read replicas, which pass
    writes on to it (docs/scaling.md). With --replica, any number of read-only processes may serve
    STORE beside that writer; a click it records shows on them within milliseconds.
    OpenAPI docs at /docs. SIGTERM or Ctrl-C answers the requests in flight, then saves."""
    if replica and workers > 1:
        raise click.UsageError("--replica is one read-only process; --workers starts its own writer and "
                               "replicas: use one or the other")
    try:
        from .http.batching import BATCH_WINDOW_S
        from .http.middleware import MAX_QUEUE
        from .http.server import read_api_key, serve as run_server
    except ImportError as exc:
        raise click.ClickException(f"'kindling serve' needs the serve extra (pip install 'kindling[serve]'): "
                                   f"{exc}") from exc
    run_server(store, host, port, read_api_key(api_key_file) if api_key_file else None, replica=replica,
               max_queue=MAX_QUEUE if max_queue is None else max_queue,
               batch_window_s=BATCH_WINDOW_S if batch_window_ms is None else batch_window_ms / 1000,
               workers=workers)


@main.command()
@click.argument("store", type=STORE)
@click.option("--redis", "redis_url", required=True, metavar="URL",
              help="The Redis server: redis://HOST:PORT[/DB] or unix:///path/to/redis.sock.")
@click.option("--stream", required=True, help="The stream key to read events from.")
@click.option("--group", required=True, help="The consumer group (created at the stream's first entry if missing).")
@click.option("--consumer", default=None, help="This consumer's name in the group; keep it across restarts "
              "[default: kindling-HOSTNAME].")
@click.option("--dead-letter", default=None, help="Where malformed messages go, with their reason "
              "[default: STREAM:dead].")
@click.option("--batch", type=click.IntRange(1, 10_000), default=500, show_default=True,
              help="Most events per batch (one fsync and one XACK each).")
@click.option("--until-idle", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Exit once no new entry has come for this long (default: run until SIGTERM or Ctrl-C).")
@click.option("--claim-idle", type=click.FloatRange(min=0), default=60.0, show_default=True, metavar="SECONDS",
              help="Take over entries left pending this long by other consumers of the group.")
@click.option("-v", "--verbose", is_flag=True, help="One line per batch on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the final counts as one JSON object.")
@user_errors
def consume(store: Path, redis_url: str, stream: str, group: str, consumer: str | None, dead_letter: str | None,
            batch: int, until_idle: float | None, claim_idle: float, verbose: bool, as_json: bool) -> None:
    """Apply events from a Redis Stream to STORE, each acknowledged once it is in the fsynced log.

    Fields: event_id, user_id, item_id, event, and optional value, t, profile. At least once
    delivery, applied once by event_id. Malformed messages go to the dead-letter stream with a
    reason. SIGTERM or Ctrl-C finishes the batch in hand, then saves a snapshot."""
    from .streams.runner import run_redis_consumer

    summary = run_redis_consumer(store, redis_url, stream, group, consumer, dead_letter, batch, until_idle,
                          claim_idle, verbose)
    data = summary.as_dict()
    emit(data, as_json, [f"consumed {stream} into {store}: {data['applied']} applied, {data['duplicate']} "
                         f"duplicate, {data['dead']} dead-lettered in {data['seconds']} s ({data['stopped_by']})"])


@main.command()
@click.option("--store", "store", type=STORE, default=Path("demo-store"), show_default=True,
              help="Where the demo store lives; reused when it exists.")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Dataset directory (default: the bundled index_data/movielens-small).")
@user_errors
def demo(store: Path, data: Path | None) -> None:
    """The tour: cold user from a profile, clicks, a live new item, a restart."""
    from .demo import run_demo

    run_demo(store, data)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
