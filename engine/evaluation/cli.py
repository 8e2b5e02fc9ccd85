"""`kindling eval`: a thin click command over `engine.evaluation.runner.evaluate`."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import click

from engine.errors import ModelLoadError

from .datasets import DatasetError, load_dataset
from .methods import METHODS, parse_methods
from .report import protocol_table, split_line, write_report
from .runner import PROTOCOLS, SharedEncoder, evaluate


def _parse_methods(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...]:
    try:
        return parse_methods(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc


@click.command("eval")
@click.argument("dataset_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--protocol", type=click.Choice([*PROTOCOLS, "all"]), required=True,
              help="Which cold-start protocol to run; 'all' runs the three in turn.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the splits and the methods.")
@click.option("--min-value", type=float, default=None,
              help="Events with value >= this are positives (default: every event).")
@click.option("--k", type=click.IntRange(min=1, max=10_000), default=20, show_default=True,
              help="Cut-off of recall@K, ndcg@K and hit_rate@K.")
@click.option("--methods", callback=_parse_methods, default=None, metavar="A,B,...",
              help=f"Comma-separated subset of: {', '.join(METHODS)} (default: all).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="Write the results as JSON here.")
@click.option("--report", type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="Write a markdown report here, with PNG plots beside it.")
@click.option("--model", "model_path", type=click.Path(exists=True, file_okay=False), default=None,
              help="A local sentence-transformers model folder (default: the bundled MiniLM).")
def eval_command(dataset_dir: Path, protocol: str, seed: int, min_value: float | None, k: int,
                 methods: tuple[str, ...], json_out: Path | None, report: Path | None,
                 model_path: str | None) -> None:
    """Measure Kindling and the baselines on a dataset in the canonical layout (see
    docs/evaluation.md): item-cold, user-cold, replay, or all three."""
    logging.getLogger("engine").setLevel(logging.WARNING)
    try:
        ds = load_dataset(dataset_dir)
    except DatasetError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{ds.name}: {ds.n_items} items, {ds.n_users} users, {len(ds.events)} events"
               + (f" ({ds.dropped_events} on unknown items dropped)" if ds.dropped_events else ""))
    protocols = list(PROTOCOLS) if protocol == "all" else [protocol]
    start = time.perf_counter()
    try:
        run = evaluate(ds, protocols, seed=seed, k=k, min_value=min_value, methods=methods,
                       encoder=SharedEncoder(model_path), progress=lambda msg: click.echo(msg, err=True))
    except (ValueError, ModelLoadError) as exc:
        raise click.ClickException(str(exc)) from exc
    for res in run.results:
        click.echo(f"\n{res['protocol']} ({split_line(res)}; {res['seconds']:.0f} s)\n{protocol_table(res)}")
    click.echo(f"\ntotal {time.perf_counter() - start:.0f} s")
    if json_out is not None:
        json_out.write_text(json.dumps(run.to_json(), indent=2) + "\n", encoding="utf-8")
        click.echo(f"wrote {json_out}")
    if report is not None:
        for path in write_report(run.results, run.replay_logs, report):
            click.echo(f"wrote {path}")
