"""The few public data types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

#: What happened: the engine knows these three (other kinds are mapped when read, catalog.py).
EventKind = Literal["click", "skip", "impression"]
EVENT_KINDS: tuple[str, ...] = get_args(EventKind)


@dataclass(frozen=True)
class Item:
    """A catalog item: its external id and the text it is embedded from."""

    item_id: str
    title: str
    text: str = ""
    categories: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        # Accept any iterable of categories but store an immutable tuple.
        object.__setattr__(self, "categories", tuple(self.categories or ()))


@dataclass(frozen=True)
class Event:
    """One interaction: `event` is click, skip or impression.

    `value` (a rating, say; 1.0 by default) is kept with the event in the log; no update depends
    on it. Graded feedback becomes clicks and skips when it is read (`read_events(min_value=)`).
    """

    user_id: str
    item_id: str
    event: str = "click"
    value: float = 1.0
    timestamp: int | None = None


@dataclass(frozen=True)
class Recommendation:
    """One ranked result."""

    item_id: str
    score: float
    title: str
