"""The few public data types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from .errors import InvalidInputError

#: What happened: the engine knows these four (other kinds are mapped when read, catalog.py). A
#: dislike hides the item from the user for good and pushes the user away from it.
EventKind = Literal["click", "skip", "impression", "dislike"]
EVENT_KINDS: tuple[str, ...] = get_args(EventKind)


#: The longest external id (item, user or event id) the store takes.
MAX_ID_LENGTH = 512


def check_id(value: object, what: str = "id") -> str:
    """Return `value` if it is a valid external id, else raise naming the rule.

    The rule: a non-empty str of at most 512 characters with no NUL, no lone surrogate and no
    leading or trailing whitespace. Ids are compared exactly as given: NFC and NFD spellings are
    different ids.
    """
    if not isinstance(value, str):
        raise InvalidInputError(f"{what} must be a string; got {type(value).__name__}")
    if not value:
        raise InvalidInputError(f"{what} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidInputError(f"{what} must be at most {MAX_ID_LENGTH} characters; got {len(value)}")
    if "\x00" in value:
        raise InvalidInputError(f"{what} must not contain NUL characters; got {value!r}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInputError(f"{what} must be valid Unicode (no lone surrogate code points, as "
                                    f"undecodable bytes become); got {value!r}") from None
    if value != value.strip():
        raise InvalidInputError(f"{what} must not start or end with whitespace; got {value!r}")
    return value


@dataclass(frozen=True)
class Item:
    """A catalog item: its external id and the text it is embedded from.

    `expires_at` (unix seconds, optional): from that time on the item is never returned by
    recommend, recommend_many or similar_items (it stays in the store).
    """

    item_id: str
    title: str
    text: str = ""
    categories: tuple[str, ...] = field(default_factory=tuple)
    expires_at: int | None = None

    def __post_init__(self) -> None:
        # Accept any iterable of categories but store an immutable tuple.
        object.__setattr__(self, "categories", tuple(self.categories or ()))


@dataclass(frozen=True)
class Event:
    """One interaction: `event` is click, skip, impression or dislike.

    `value` (a rating, say; 1.0 by default) is kept with the event in the log; no update depends
    on it. Graded feedback becomes clicks and skips when it is read (`read_events(min_value=)`).
    `event_id`, when given, makes `Engine.record_many` apply the event once, however often it is
    delivered (`import_events` and `fit` ignore it).
    """

    user_id: str
    item_id: str
    event: str = "click"
    value: float = 1.0
    timestamp: int | None = None
    event_id: str | None = None


#: Why an item was recommended (see Because).
Reason = Literal["clicked", "profile", "popular", "new item"]


@dataclass(frozen=True)
class Because:
    """Why an item is in a list (`recommend(..., explain=True)`), with the number behind it.

    - "clicked": its text is nearest to `item_id`, one of the user's clicks; `value` is the cosine
      of the two text vectors.
    - "profile": its text is nearest to the user's profile; `value` is that cosine.
    - "popular": nothing the user did is near it; `value` is its click count.
    - "new item": nothing near it and no clicks yet; `value` is when it was added (unix seconds).
    """

    reason: Reason
    value: float
    item_id: str | None = None

    def __str__(self) -> str:
        if self.reason == "clicked":
            return f"near your click on {self.item_id} (cosine {self.value:.2f})"
        if self.reason == "profile":
            return f"near your profile (cosine {self.value:.2f})"
        if self.reason == "popular":
            return f"popular ({self.value:.0f} clicks)"
        return f"new item (added at {self.value:.0f})"


@dataclass(frozen=True)
class Recommendation:
    """One ranked result; `because` is set only when the request asked for explanations."""

    item_id: str
    score: float
    title: str
    because: Because | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON-ready form the CLI's --json and the HTTP service print (scores to 6 places)."""
        out: dict[str, Any] = {"item_id": self.item_id, "score": round(self.score, 6), "title": self.title}
        if self.because is not None:
            out["because"] = {"reason": self.because.reason, "value": round(self.because.value, 6),
                              "item_id": self.because.item_id}
        return out
