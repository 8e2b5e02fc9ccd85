"""Kindling's evaluation harness: cold-start splits, metrics, real baselines, protocols, reports.

Example:
    >>> from engine.evaluation import evaluate, load_dataset               # doctest: +SKIP
    >>> ds = load_dataset("../shared/data/movielens-small")
    >>> run = evaluate(ds, ["item-cold"], min_value=4.0, methods=["popularity", "tfidf"])
    >>> run.to_json()["results"]["tfidf"]["recall@20"]
    >>> runs = evaluate_seeds(ds, ["user-cold"], [0, 1, 2], min_value=4.0, split_kind="validation")
    >>> runs.to_json()["summary"]["user-cold"]["targets"]

Needs the `eval` extra (scikit-learn, scipy, implicit, lightfm-next, matplotlib).
"""

from __future__ import annotations

from .datasets import DatasetError, EvalDataset, load_dataset, write_sample
from .methods import BASELINES, METHODS
from .runner import PROTOCOLS, EvalRun, SeedsRun, evaluate, evaluate_seeds

__all__ = ["BASELINES", "METHODS", "PROTOCOLS", "DatasetError", "EvalDataset", "EvalRun", "SeedsRun", "evaluate",
           "evaluate_seeds", "load_dataset", "write_sample"]
