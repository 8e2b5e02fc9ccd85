"""One evaluation run: load the dataset, run the chosen protocols for one seed or several, return
their JSON objects (and, over several seeds, the summary with its intervals)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from engine.text.catalog import item_text
from engine.text.encoder import Encoder, TextEncoder

from .datasets import EvalDataset
from .methods import METHODS, NEEDS_ENCODER, NEXT_ITEM_ONLY, build_methods, parse_methods
from .next_item import run_next_item
from .protocols import run_item_cold, run_user_cold
from .replay import REPLAY_METHODS, ReplayLog, run_replay
from .splits import check_split_kind

PROTOCOLS: tuple[str, ...] = ("item-cold", "user-cold", "replay", "next-item")
#: Replay players that are not (yet) a method of the other protocols: `--methods` accepts them too.
REPLAY_ONLY: tuple[str, ...] = tuple(m for m in REPLAY_METHODS if m not in METHODS and "-" not in m)
#: Names `--methods` accepts beyond METHODS; a variant of kindling ("kindling-...") comes with it.
EXTRA_METHODS: tuple[str, ...] = REPLAY_ONLY + tuple(m for m in NEXT_ITEM_ONLY if "-" not in m)
ALL_METHODS: tuple[str, ...] = METHODS + EXTRA_METHODS
RUNNERS = {"item-cold": run_item_cold, "user-cold": run_user_cold, "next-item": run_next_item}


@dataclass
class EvalRun:
    """What a run of one seed produced: one JSON object per protocol, and the replay's per-event log."""

    results: list[dict] = field(default_factory=list)
    replay_logs: dict[str, ReplayLog] = field(default_factory=dict)

    def to_json(self) -> dict:
        """The single protocol's object, or {"dataset", ..., "protocols": {name: object}}."""
        if len(self.results) == 1:
            return self.results[0]
        first = self.results[0]
        head = {key: first[key] for key in ("dataset", "split_kind", "seed", "k", "min_value")}
        return {**head, "protocol": "all", "protocols": {r["protocol"]: r for r in self.results}}


@dataclass
class SeedsRun:
    """Runs of several seeds (`--seeds`), in the order asked."""

    runs: list[EvalRun] = field(default_factory=list)

    def to_json(self) -> dict:
        """{"dataset", "protocol", "split_kind", "k", "min_value", "seeds", "runs": [one object per
        seed, as a one-seed run writes it], "summary": the means, ratios and intervals}."""
        from .summary import summarise  # runnable as `python -m engine.evaluation.summary`

        per_seed = [run.to_json() for run in self.runs]
        first = per_seed[0]
        head = {key: first[key] for key in ("dataset", "protocol", "split_kind", "k", "min_value")}
        return {**head, "seeds": [r["seed"] for r in per_seed], "runs": per_seed,
                "summary": summarise(per_seed)}


class SharedEncoder:
    """Loads the language model on first use, then hands the same instance to every method, so
    the catalog is embedded once per run (the encoder caches vectors by text)."""

    def __init__(self, model_path: str | None = None) -> None:
        self.model_path = model_path
        self._encoder: TextEncoder | None = None

    def __call__(self) -> TextEncoder:
        if self._encoder is None:
            self._encoder = Encoder(self.model_path, show_progress=None)
        return self._encoder


def parse_method_names(text: str | None) -> tuple[str, ...]:
    """Like `parse_methods`, also accepting the methods of one protocol only (EXTRA_METHODS);
    None or '' -> all.

    Raises:
        ValueError: a name that is no method.
    """
    if not text:
        return ALL_METHODS
    names = [n.strip() for n in text.split(",") if n.strip()]
    extra = tuple(n for n in EXTRA_METHODS if n in names)
    rest = [n for n in names if n not in EXTRA_METHODS]
    try:
        return (parse_methods(",".join(rest)) if rest else ()) + extra
    except ValueError as exc:
        raise ValueError(f"{exc}, {', '.join(EXTRA_METHODS)}") from exc


def replay_methods(methods: Sequence[str]) -> list[str]:
    """The replay's players for a method list: 'kindling' brings its online and frozen engines."""
    return _with_variants(REPLAY_METHODS, methods)


def protocol_methods(protocol: str, methods: Sequence[str]) -> list[str]:
    """The chosen methods that run in a protocol, in its order."""
    if protocol == "replay":
        return replay_methods(methods)
    if protocol == "next-item":
        return _with_variants(METHODS[:-1] + NEXT_ITEM_ONLY + METHODS[-1:], methods)
    return [m for m in methods if m in METHODS]


def _with_variants(offered: Sequence[str], methods: Sequence[str]) -> list[str]:
    """The offered methods that were chosen, by name or ('kindling-frozen') by their stem."""
    chosen = set(methods)
    return [m for m in offered if m in chosen or m.split("-")[0] in chosen]


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0,1,2' -> (0, 1, 2).

    Raises:
        ValueError: not comma-separated non-negative integers, or a seed given twice.
    """
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"seeds must be comma-separated non-negative integers; got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise ValueError(f"seeds must be comma-separated non-negative integers; got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"each seed may be given once; got {text!r}")
    return seeds


def evaluate(ds: EvalDataset, protocols: Sequence[str], *, seed: int = 0, k: int = 20,
             min_value: float | None = None, methods: Sequence[str] = ALL_METHODS,
             encoder: Callable[[], TextEncoder] | None = None, workdir: str | Path | None = None,
             split_kind: str = "test", progress: Callable[[str], None] = print) -> EvalRun:
    """Run each protocol in turn for one seed, with fresh instances of the methods.

    Raises:
        ValueError: an unknown protocol or split kind, or k below 1.
    """
    _check(protocols, k, split_kind)
    encoder = encoder or SharedEncoder()
    run = EvalRun()
    with tempfile.TemporaryDirectory(prefix="kindling-eval-", dir=workdir) as tmp:
        for protocol in protocols:
            start = time.perf_counter()
            result = _run_one(ds, protocol, seed, k, min_value, methods, encoder, Path(tmp), split_kind,
                              progress, run)
            result["seconds"] = round(time.perf_counter() - start, 1)
            run.results.append(result)
            progress(f"{protocol} (seed {seed}): done in {result['seconds']:.1f} s")
    return run


def evaluate_seeds(ds: EvalDataset, protocols: Sequence[str], seeds: Sequence[int], *,
                   encoder: Callable[[], TextEncoder] | None = None, **kwargs) -> SeedsRun:
    """`evaluate` for each seed in turn, sharing one language model (the catalog is embedded once)."""
    encoder = encoder or SharedEncoder()
    return SeedsRun([evaluate(ds, protocols, seed=s, encoder=encoder, **kwargs) for s in seeds])


def _check(protocols: Sequence[str], k: int, split_kind: str) -> None:
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {', '.join(bad)}")
    if k < 1:
        raise ValueError(f"k must be a positive integer; got {k}")
    check_split_kind(split_kind)


def embed_catalog(ds: EvalDataset, encoder: Callable[[], TextEncoder]) -> float:
    """Embed every item's text once (the encoder caches it for every method); returns seconds."""
    start = time.perf_counter()
    encoder().encode([item_text(it) for it in ds.items])
    return round(time.perf_counter() - start, 2)


def _run_one(ds: EvalDataset, protocol: str, seed: int, k: int, min_value: float | None,
             methods: Sequence[str], encoder: Callable[[], TextEncoder], workdir: Path, split_kind: str,
             progress: Callable[[str], None], run: EvalRun) -> dict:
    kwargs = dict(seed=seed, k=k, min_value=min_value, split_kind=split_kind, progress=progress)
    names = protocol_methods(protocol, methods)
    needs_model = any(m.split("-")[0] in NEEDS_ENCODER or m in NEEDS_ENCODER for m in names)
    embedding = embed_catalog(ds, encoder) if needs_model else 0.0
    if embedding:
        progress(f"{protocol}: catalog embedded in {embedding:.1f} s")
    if protocol == "replay":
        result, log = run_replay(ds, workdir / "replay", encoder, methods=names, **kwargs)
        run.replay_logs[protocol] = log
    else:
        built = build_methods(names, protocol, seed, encoder, workdir)
        result = RUNNERS[protocol](ds, built, **kwargs)
    result["timings_s"]["embedding"] = embedding
    return result
