"""Generated sign-up profiles, to check how far the engine trusts one (`kindling eval --profiles`).

Neither dev dataset has profiles, so two kinds are made here, each from a fixed seed:

- "demographic": the sign-up form of the older movie datasets ("24 year old man, occupation:
  technician"), drawn for each user independently of what they like. It carries no taste, so a
  method that learns what a profile is worth must lose (almost) nothing to it.
- "taste": written from what the user liked, outside the evaluation: a seeded share of each
  user's positive items (PROFILE_SHARE, 1 to PROFILE_MAX) is taken out of the events altogether,
  and the profile names their most frequent categories and the start of their titles. No item a
  profile names is a training event or a target. "taste-none" is the same events without the
  profiles: the control that "taste" is compared with.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections import Counter

import numpy as np

from .datasets import EvalDataset

PROFILE_KINDS: tuple[str, ...] = ("dataset", "none", "demographic", "taste", "taste-none")
#: The seed every generated profile set is drawn from.
PROFILE_SEED = 20261204
#: Share of a user's distinct positive items that write their taste profile (at least 1, at most
#: PROFILE_MAX); users with fewer than PROFILE_MIN_POSITIVES keep every event and get no profile.
PROFILE_SHARE = 0.2
PROFILE_MAX = 5
PROFILE_MIN_POSITIVES = 3
#: A profile names this many categories and this many titles, each cut to TITLE_WORDS words.
PROFILE_CATEGORIES = 3
PROFILE_TITLES = 2
TITLE_WORDS = 8
#: The occupations of the MovieLens 100K sign-up form (its u.occupation list).
OCCUPATIONS = ("administrator", "artist", "doctor", "educator", "engineer", "entertainment", "executive",
               "healthcare", "homemaker", "lawyer", "librarian", "marketing", "none", "other",
               "programmer", "retired", "salesman", "scientist", "student", "technician", "writer")


def user_rng(user_id: str, seed: int) -> np.random.Generator:
    """A generator of its own for each user: a user's draw does not depend on the others'."""
    return np.random.default_rng([seed, zlib.crc32(user_id.encode("utf-8", "surrogatepass"))])


def demographic_profile(user_id: str, seed: int = PROFILE_SEED) -> str:
    """'24 year old man, occupation: technician', drawn from the user id and seed alone."""
    rng = user_rng(user_id, seed)
    age = int(rng.integers(16, 70))
    sex = "man" if rng.random() < 0.5 else "woman"
    return f"{age} year old {sex}, occupation: {OCCUPATIONS[int(rng.integers(len(OCCUPATIONS)))]}"


def taste_profile(titles: list[str], categories: list[tuple[str, ...]]) -> str:
    """'I like Animation, Children and Comedy; for example Toy Story (1995); Finding Nemo (2003)'."""
    counts = Counter(c for cats in categories for c in cats)
    top = [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:PROFILE_CATEGORIES]]
    parts = []
    if top:
        parts.append("I like " + (", ".join(top[:-1]) + " and " + top[-1] if len(top) > 1 else top[0]))
    shown = [" ".join(t.split()[:TITLE_WORDS]) for t in titles[:PROFILE_TITLES] if t.strip()]
    if shown:
        parts.append(("for example " if parts else "I like things such as ") + "; ".join(shown))
    return "; ".join(parts)


def with_profiles(ds: EvalDataset, kind: str, min_value: float | None = None,
                  seed: int = PROFILE_SEED) -> EvalDataset:
    """`ds` with the profiles of `kind` (see PROFILE_KINDS and the module's docstring).

    Raises:
        ValueError: an unknown kind.
    """
    if kind not in PROFILE_KINDS:
        raise ValueError(f"profiles must be one of {', '.join(PROFILE_KINDS)}; got {kind!r}")
    if kind == "dataset":
        return ds
    if kind == "none":
        return dataclasses.replace(ds, profiles={})
    if kind == "demographic":
        return dataclasses.replace(ds, profiles={str(u): demographic_profile(str(u), seed) for u in ds.user_ids})
    events, profiles = _taste(ds, min_value, seed)
    return dataclasses.replace(ds, events=events, profiles=profiles if kind == "taste" else {})


def _taste(ds: EvalDataset, min_value: float | None, seed: int):
    """(the events without each user's profile items, user id -> taste profile)."""
    ev = ds.events
    positive = np.ones(len(ev), bool) if min_value is None else ev.value >= min_value
    drop = np.zeros(len(ev), bool)
    profiles: dict[str, str] = {}
    order = np.argsort(ev.user, kind="stable")
    bounds = np.flatnonzero(np.diff(ev.user[order])) + 1
    for rows in np.split(order, bounds):
        if not len(rows):
            continue
        uid = str(ds.user_ids[ev.user[rows[0]]])
        liked = list(dict.fromkeys(ev.item[rows[positive[rows]]].tolist()))
        if len(liked) < PROFILE_MIN_POSITIVES:
            continue
        n = int(min(PROFILE_MAX, max(1, round(PROFILE_SHARE * len(liked)))))
        picked = user_rng(uid, seed).choice(len(liked), size=n, replace=False)
        source = [liked[int(j)] for j in np.sort(picked)]
        text = taste_profile([ds.items[i].title for i in source], [tuple(ds.items[i].categories) for i in source])
        if not text:
            continue
        profiles[uid] = text
        drop[rows[np.isin(ev.item[rows], source)]] = True  # every event on them, not only positives
    return ev.take(~drop), profiles


__all__ = ["PROFILE_KINDS", "PROFILE_SEED", "demographic_profile", "taste_profile", "with_profiles"]
