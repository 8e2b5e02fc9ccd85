"""One evaluation run: load the dataset, run the chosen protocols, return their JSON objects."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from engine.encoder import Encoder, TextEncoder

from .datasets import EvalDataset
from .methods import METHODS, build_methods
from .protocols import run_item_cold, run_user_cold
from .replay import REPLAY_METHODS, ReplayLog, run_replay

PROTOCOLS: tuple[str, ...] = ("item-cold", "user-cold", "replay")


@dataclass
class EvalRun:
    """What a run produced: one JSON object per protocol, and the replay's per-event log."""

    results: list[dict] = field(default_factory=list)
    replay_logs: dict[str, ReplayLog] = field(default_factory=dict)

    def to_json(self) -> dict:
        """The single protocol's object, or {"dataset", ..., "protocols": {name: object}}."""
        if len(self.results) == 1:
            return self.results[0]
        first = self.results[0]
        head = {key: first[key] for key in ("dataset", "seed", "k", "min_value")}
        return {**head, "protocol": "all", "protocols": {r["protocol"]: r for r in self.results}}


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


def replay_methods(methods: Sequence[str]) -> list[str]:
    """The replay's players for a method list: 'kindling' brings its online and frozen engines."""
    chosen = set(methods)
    return [m for m in REPLAY_METHODS if m in chosen or m.split("-")[0] in chosen]


def evaluate(ds: EvalDataset, protocols: Sequence[str], *, seed: int = 0, k: int = 20,
             min_value: float | None = None, methods: Sequence[str] = METHODS,
             encoder: Callable[[], TextEncoder] | None = None, workdir: str | Path | None = None,
             progress: Callable[[str], None] = print) -> EvalRun:
    """Run each protocol in turn with fresh instances of the methods.

    Raises:
        ValueError: an unknown protocol, or k below 1.
    """
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {', '.join(bad)}")
    if k < 1:
        raise ValueError(f"k must be a positive integer; got {k}")
    encoder = encoder or SharedEncoder()
    run = EvalRun()
    with tempfile.TemporaryDirectory(prefix="kindling-eval-", dir=workdir) as tmp:
        for protocol in protocols:
            start = time.perf_counter()
            run.results.append(_run_one(ds, protocol, seed, k, min_value, methods, encoder,
                                        Path(tmp), progress, run))
            run.results[-1]["seconds"] = round(time.perf_counter() - start, 1)
            progress(f"{protocol}: done in {run.results[-1]['seconds']:.1f} s")
    return run


def _run_one(ds: EvalDataset, protocol: str, seed: int, k: int, min_value: float | None,
             methods: Sequence[str], encoder: Callable[[], TextEncoder], workdir: Path,
             progress: Callable[[str], None], run: EvalRun) -> dict:
    kwargs = dict(seed=seed, k=k, min_value=min_value, progress=progress)
    if protocol == "replay":
        players = replay_methods(methods)
        result, log = run_replay(ds, workdir / "replay", encoder, methods=players, **kwargs)
        run.replay_logs[protocol] = log
        return result
    built = build_methods(methods, protocol, seed, encoder, workdir)
    runner = run_item_cold if protocol == "item-cold" else run_user_cold
    return runner(ds, built, **kwargs)
