"""The request bodies, as pydantic models: types and shapes only.

The rules on the values (what an id may hold, k's range, a category's length, ...) are the
library's and are checked by it, so the service and the library cannot disagree on them.
Unknown fields are refused, so a misspelt option is an error rather than silently ignored, and
types are strict: `"k": "5"` or `"explain": "yes"` is a 422, not a guess. The query parameters of
GET /items/{item_id}/similar (`SimilarQuery`) arrive as text, so there `k=5` is read as the number.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..engine import MAX_BATCH_USERS
from ..serving.filters import Filter
from ..types import EventKind

#: Items one POST /items may carry (a bigger catalog goes through `kindling ingest`).
MAX_ITEMS_PER_REQUEST = 1000


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Rules(Body):
    """The business rules of a request (see engine.Filter); all optional."""

    categories: list[str] = Field(default_factory=list, description="Only items with one of these categories.")
    not_categories: list[str] = Field(default_factory=list, description="No items with any of these categories.")
    allow: list[str] | None = Field(None, description="Only these item ids.")
    deny: list[str] = Field(default_factory=list, description="Never these item ids.")

    def filter(self) -> Filter | None:
        if not (self.categories or self.not_categories or self.allow is not None or self.deny):
            return None
        return Filter(categories_any=self.categories, categories_none=self.not_categories,
                      allow=self.allow, deny=self.deny)


class FilterFields(Rules):
    """The rules of a ranked list, and how it is ordered and explained; all optional."""

    diversity: float = Field(0.0, description="0 to 1: maximal marginal relevance (0 keeps the score order).")
    explain: bool = Field(False, description="Give each item a `because`.")


class RecommendBody(FilterFields):
    user_id: str
    k: int = 10
    profile: str | None = Field(None, description="A new user's self-description; saved with the user.")
    exclude: list[str] = Field(default_factory=list, description="More item ids to leave out.")


class BatchBody(FilterFields):
    user_ids: list[str] = Field(max_length=MAX_BATCH_USERS)
    k: int = 10


class SimilarQuery(Rules):
    """The query parameters of GET /items/{item_id}/similar: the same rules as /recommend's body,
    a list given by repeating its parameter (`?categories=a&categories=b`)."""

    model_config = ConfigDict(extra="forbid", strict=False)  # query values arrive as text: "5" is k=5

    k: int = Field(10, description="How many items (1 to 10000).")
    exclude: list[str] = Field(default_factory=list, description="More item ids to leave out.")


class EventBody(Body):
    user_id: str
    item_id: str
    event: EventKind = "click"
    value: float = 1.0
    timestamp: int | None = Field(None, description="Unix seconds; default: now.")


class ItemBody(Body):
    item_id: str
    title: str
    text: str = ""
    categories: list[str] = Field(default_factory=list)
    expires_at: int | None = Field(None, description="Unix seconds; from then on never returned.")


class ItemsBody(Body):
    items: list[ItemBody] = Field(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)
    upsert: bool = Field(False, description="Replace items whose id is already in the store.")


__all__ = ["BatchBody", "EventBody", "ItemBody", "ItemsBody", "MAX_ITEMS_PER_REQUEST", "RecommendBody",
           "SimilarQuery"]
