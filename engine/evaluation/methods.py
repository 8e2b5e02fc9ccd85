"""The method names `kindling eval --methods` accepts, and building them for a protocol."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from engine.text.encoder import TextEncoder

from .baselines.base import Method
from .baselines.bm25 import BM25Method
from .baselines.collaborative import ALSMethod, ItemKNNMethod
from .baselines.cooccurrence import CooccurrenceMethod
from .baselines.content import LMProfileMethod, TfidfProfileMethod
from .baselines.ease import EASEMethod
from .baselines.hybrid import LightFMMethod
from .baselines.sasrec import SASRecMethod
from .baselines.simple import PopularityMethod, RandomMethod
from .kindling_method import KindlingMethod

BASELINES: tuple[str, ...] = ("random", "popularity", "cooc", "tfidf", "bm25", "itemknn", "ease", "als",
                              "lightfm", "lm-profile")
METHODS: tuple[str, ...] = BASELINES + ("kindling",)
#: Methods of the next-item protocol only: SASRec, and Kindling's stateless request beside its
#: online path ("kindling" brings both).
NEXT_ITEM_ONLY: tuple[str, ...] = ("sasrec", "kindling-stateless")
#: Methods that need the language model.
NEEDS_ENCODER = frozenset({"lm-profile", "kindling", "kindling-stateless"})


def parse_methods(text: str | None) -> tuple[str, ...]:
    """'a,b' -> ('a', 'b') in the canonical order; None or '' -> every method.

    Raises:
        ValueError: a name that is not a method.
    """
    if not text:
        return METHODS
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return tuple(m for m in METHODS if m in names)


def build_methods(names: Sequence[str], protocol: str, seed: int, encoder: Callable[[], TextEncoder],
                  workdir: Path) -> list[Method]:
    """Fresh instances for one protocol. `encoder` is called only when a method needs the model.

    LightFM represents users by id when the test users are in training and their history is all
    in training (item-cold), and by the bag of items in the query's history otherwise.
    """
    makers: dict[str, Callable[[], Method]] = {
        "random": lambda: RandomMethod(seed),
        "popularity": lambda: PopularityMethod(seed),
        "cooc": lambda: CooccurrenceMethod(seed),
        "tfidf": lambda: TfidfProfileMethod(seed),
        "bm25": lambda: BM25Method(seed),
        "itemknn": lambda: ItemKNNMethod(seed),
        "ease": lambda: EASEMethod(seed),
        "als": lambda: ALSMethod(seed),
        "lightfm": lambda: LightFMMethod(seed, user_features="ids" if protocol == "item-cold" else "history"),
        "sasrec": lambda: SASRecMethod(seed),
        "lm-profile": lambda: LMProfileMethod(encoder().encode, seed),
        "kindling": lambda: KindlingMethod(workdir / protocol, encoder(), seed),
        "kindling-stateless": lambda: KindlingMethod(workdir / protocol, encoder(), seed, stateless=True),
    }
    return [makers[name]() for name in names]
