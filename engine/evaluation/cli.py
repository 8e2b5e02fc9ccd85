"""`kindling eval`: a thin click command over `engine.evaluation.runner.evaluate`."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click

from engine.errors import ModelLoadError

from .datasets import DatasetError, EvalDataset, load_dataset
from .profiles import PROFILE_KINDS, with_profiles
from .report import dump_json, protocol_table, split_line, write_report
from .runner import ALL_METHODS, PROTOCOLS, SharedEncoder, evaluate, evaluate_seeds, parse_method_names, parse_seeds
from .splits import SPLIT_KINDS
from .summary import markdown, summarise


def _parse_methods(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...]:
    try:
        return parse_method_names(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc


def _parse_seeds(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    try:
        return None if value is None else parse_seeds(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc


@click.command("eval")
@click.argument("dataset_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--protocol", type=click.Choice([*PROTOCOLS, "all"]), required=True,
              help="Which protocol to run; 'all' runs the four in turn.")
@click.option("--split", "split_kind", type=click.Choice(SPLIT_KINDS), default="test", show_default=True,
              help="Measure on the seed's test split, or on a validation split carved out of its "
                   "training part with the same protocol (the test part stays unseen).")
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="Seed of the splits and the methods (default 0).")
@click.option("--seeds", callback=_parse_seeds, default=None, metavar="S,S,...",
              help="Run several seeds in one command (e.g. 0,1,2,3,4); the JSON then holds every "
                   "seed's run and the summary with bootstrap intervals.")
@click.option("--min-value", type=float, default=None,
              help="Events with value >= this are positives (default: every event).")
@click.option("--k", type=click.IntRange(min=1, max=10_000), default=20, show_default=True,
              help="Cut-off of recall@K, ndcg@K and hit_rate@K.")
@click.option("--methods", callback=_parse_methods, default=None, metavar="A,B,...",
              help=f"Comma-separated subset of: {', '.join(ALL_METHODS)} (default: all). "
                   "'kindling' brings both replay engines and, in next-item, kindling-stateless; "
                   "'sasrec' runs in next-item only.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="Write the results as JSON here (with per-user values).")
@click.option("--report", type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="Write a markdown report here, with PNG plots beside it.")
@click.option("--profiles", "profile_kind", type=click.Choice(PROFILE_KINDS), default="dataset", show_default=True,
              help="Users' sign-up profiles: the dataset's own users.* table, none, or a set generated "
                   "with a fixed seed (engine/evaluation/profiles.py): 'demographic' (age, sex, "
                   "occupation, drawn apart from taste), 'taste' (written from a share of each user's "
                   "liked items, which leave the events), 'taste-none' (the same events, no profiles).")
@click.option("--model", "model_path", type=click.Path(exists=True, file_okay=False), default=None,
              help="A local sentence-transformers model folder (default: the bundled MiniLM).")
def eval_command(dataset_dir: Path, protocol: str, split_kind: str, seed: int | None,
                 seeds: tuple[int, ...] | None, min_value: float | None, k: int, methods: tuple[str, ...],
                 json_out: Path | None, report: Path | None, profile_kind: str, model_path: str | None) -> None:
    """Measure Kindling and the baselines on a dataset in the canonical layout (see
    docs/evaluation.md): item-cold, user-cold, replay, next-item, or all four, on one seed or several."""
    if seed is not None and seeds is not None:
        raise click.UsageError("give --seed or --seeds, not both")
    logging.getLogger("engine").setLevel(logging.WARNING)
    ds = with_profiles(_load(dataset_dir), profile_kind, min_value)
    if profile_kind != "dataset":
        click.echo(f"profiles: {profile_kind} ({len(ds.profiles)} users, {len(ds.events)} events)")
    protocols = list(PROTOCOLS) if protocol == "all" else [protocol]
    kwargs = dict(k=k, min_value=min_value, methods=methods, split_kind=split_kind,
                  encoder=SharedEncoder(model_path), progress=lambda msg: click.echo(msg, err=True))
    start = time.perf_counter()
    try:
        run = (evaluate_seeds(ds, protocols, seeds, **kwargs) if seeds is not None
               else evaluate(ds, protocols, seed=seed or 0, **kwargs))
    except (ValueError, ModelLoadError) as exc:
        raise click.ClickException(str(exc)) from exc
    runs = run.runs if seeds is not None else [run]
    results = [res for r in runs for res in r.results]
    for res in results:
        click.echo(f"\n{res['protocol']}, seed {res['seed']}, {res['split_kind']} split "
                   f"({split_line(res)}; {res['seconds']:.0f} s)\n{protocol_table(res)}")
    summary = summarise([r.to_json() for r in runs])
    click.echo(f"\n{markdown(summary)}\ntotal {time.perf_counter() - start:.0f} s")
    if json_out is not None:
        json_out.write_text(dump_json({**run.to_json(), "profiles": profile_kind}), encoding="utf-8")
        click.echo(f"wrote {json_out}")
    if report is not None:
        for path in write_report(results, runs[0].replay_logs, report, summary):
            click.echo(f"wrote {path}")


def _load(dataset_dir: Path) -> EvalDataset:
    try:
        ds = load_dataset(dataset_dir)
    except DatasetError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{ds.name}: {ds.n_items} items, {ds.n_users} users, {len(ds.events)} events"
               + (f" ({ds.dropped_events} on unknown items dropped)" if ds.dropped_events else ""))
    return ds
