"""A per-user paired bootstrap interval for a ratio of means, averaged over seeds.

Each seed gives two aligned per-user vectors, the method's and its rival's (the same users in the
same order). The ratio of a seed is mean(method) / mean(rival); the point estimate is the mean of
the seeds' ratios. A bootstrap replicate resamples the users of every seed with replacement (the
same users for both methods: paired), recomputes each seed's ratio and averages them over seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

REPLICATES = 1000
BOOTSTRAP_SEED = 0
LEVEL = 0.95


@dataclass(frozen=True)
class Paired:
    """One seed's per-user values: `method` and `rival`, shape (n_users,), aligned by user.

    For a metric that is a mean over events rather than users (the replay's hit rate), give each
    user's sum over their events: the ratio of the two means is the ratio of the two sums.
    """

    seed: int
    method: np.ndarray
    rival: np.ndarray

    def __post_init__(self) -> None:
        a, b = np.asarray(self.method), np.asarray(self.rival)
        if a.ndim != 1 or a.shape != b.shape or len(a) == 0:
            raise ValueError(f"paired per-user vectors must be 1-d, non-empty and of equal length; "
                             f"got shapes {a.shape} and {b.shape}")


@dataclass(frozen=True)
class Interval:
    """The mean over seeds of the per-seed ratio, its per-seed values and the bootstrap interval."""

    ratio: float
    low: float
    high: float
    per_seed: tuple[float, ...]


def ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum(a) / sum(b) along the last axis; inf where only b sums to 0, 1.0 where both do."""
    sa, sb = np.sum(a, axis=-1), np.sum(b, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sb > 0, sa / np.where(sb > 0, sb, 1.0), np.where(sa > 0, np.inf, 1.0))


def seed_replicates(pair: Paired, replicates: int = REPLICATES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """The seed's ratio in each replicate, shape (replicates,). The draws depend only on the
    bootstrap seed, the run's seed and the number of users, so any target of a run resamples
    the same users."""
    a = np.asarray(pair.method, np.float64)
    b = np.asarray(pair.rival, np.float64)
    rng = np.random.default_rng([seed, pair.seed])
    idx = rng.integers(0, len(a), size=(replicates, len(a)))
    return ratio(a[idx], b[idx])


def paired_bootstrap(pairs: Sequence[Paired], replicates: int = REPLICATES, seed: int = BOOTSTRAP_SEED,
                     level: float = LEVEL) -> Interval:
    """The mean over seeds of the per-seed ratio of means, and its paired bootstrap interval.

    Raises:
        ValueError: no seeds, a seed given twice, or replicates below 1.
    """
    if not pairs:
        raise ValueError("a bootstrap needs at least one seed's per-user values; got none")
    if len({p.seed for p in pairs}) != len(pairs):
        raise ValueError(f"each seed may appear once; got {[p.seed for p in pairs]}")
    if replicates < 1:
        raise ValueError(f"replicates must be a positive integer; got {replicates}")
    per_seed = tuple(float(ratio(np.asarray(p.method, float), np.asarray(p.rival, float))) for p in pairs)
    reps = np.mean([seed_replicates(p, replicates, seed) for p in pairs], axis=0)
    tail = 100 * (1 - level) / 2
    with np.errstate(invalid="ignore"):
        low, high = np.percentile(reps, [tail, 100 - tail])
    return Interval(float(np.mean(per_seed)), _finite_or_inf(low), _finite_or_inf(high), per_seed)


def _finite_or_inf(x: float) -> float:
    """Interpolating between inf values gives nan; the end of the interval is inf then."""
    return float(np.inf) if np.isnan(x) else float(x)
