"""Business rules as data: the `Filter` of a request and the rows it lets through.

Expired items (`Item.expires_at`) are held back here too, for every request.

A `Filter` names categories and item ids; `allowed_rows` turns it into a boolean mask over the
item table, where the categories and ids live. The ranker hands that mask to FAISS as an
IDSelector and applies it to every other candidate source (co-clicks, popular items, explicit
candidates, the top-up), so a filtered request returns k items whenever k items qualify.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidInputError
from ..state.items import ItemTable
from ..types import check_id
from ..text.catalog import MAX_CATEGORY_CHARS, check_text


@dataclass(frozen=True)
class Filter:
    """Which items a request may return.

    An item qualifies when it carries at least one of `categories_any` (when any are given), none
    of `categories_none`, is one of `allow` (when given) and none of `deny`. Unknown ids and
    categories match nothing. Lists are stored as tuples, so a Filter is hashable.

    Args:
        categories_any: the item must carry one of these categories (empty: no restriction).
        categories_none: the item must carry none of these categories.
        allow: only these item ids (None: no restriction; it may not be empty).
        deny: never these item ids.

    Raises:
        InvalidInputError: a rule given as one string instead of a list, a value that is not a
            valid category or id, or an empty `allow`; the message names the rule.

    Example:
        >>> Filter(categories_any=["Animation"], deny=["1"]).categories_any
        ('Animation',)
    """

    categories_any: tuple[str, ...] = ()
    categories_none: tuple[str, ...] = ()
    allow: tuple[str, ...] | None = None
    deny: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("categories_any", "categories_none"):
            values = _strings(getattr(self, name), name)
            for c in values:
                check_text(c, f"Filter.{name}: each category", MAX_CATEGORY_CHARS)
            object.__setattr__(self, name, values)
        for name in ("allow", "deny"):
            if name == "allow" and self.allow is None:
                continue
            values = _strings(getattr(self, name), name)
            for i in values:
                check_id(i, f"Filter.{name}: each item id")
            object.__setattr__(self, name, values)
        if self.allow is not None and not self.allow:
            raise InvalidInputError("Filter.allow must name at least one item id (None allows every item)")


def _strings(value: object, name: str) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InvalidInputError(f"Filter.{name} must be a list of strings, not {type(value).__name__}; "
                                f"got {value!r}")
    return tuple(dict.fromkeys(value))


def check_filter(flt: object) -> Filter | None:
    """`flt` if it is a Filter or None, else InvalidInputError."""
    if flt is not None and not isinstance(flt, Filter):
        raise InvalidInputError(f"filter must be an engine.Filter or None; got {type(flt).__name__}")
    return flt


def check_exclude(exclude: object) -> tuple[str, ...]:
    """`exclude` (item ids to leave out, or None) as a tuple of ids, else InvalidInputError.

    Ids that name no item are kept: they match nothing, as in a Filter.
    """
    if exclude is None:
        return ()
    if isinstance(exclude, (str, bytes)) or not isinstance(exclude, Iterable):
        raise InvalidInputError(f"exclude must be a list of item ids, not {type(exclude).__name__}; "
                                f"got {exclude!r}")
    return tuple(dict.fromkeys([check_id(i, "exclude: each item id") for i in exclude]))


def allowed_rows(items: ItemTable, flt: Filter | None, now: int | None = None) -> np.ndarray | None:
    """The rows `flt` lets through and, with `now` (unix seconds), that have not expired: shape
    (len(items),), bool; None when nothing is held back.

    Removed rows are not cleared here: every candidate source skips them already.
    """
    expired = None if now is None else items.expired(now)
    if (flt is None or flt == Filter()) and expired is None:
        return None
    mask = _filter_mask(items, flt or Filter())
    if expired is not None:
        mask &= ~expired
    return mask


def _filter_mask(items: ItemTable, flt: Filter) -> np.ndarray:
    n = len(items)
    if flt.allow is not None:
        mask = np.zeros(n, bool)
        mask[_id_rows(items, flt.allow)] = True
    else:
        mask = np.ones(n, bool)
    if flt.categories_any:
        mask &= items.category_mask(flt.categories_any)
    if flt.categories_none:
        mask &= ~items.category_mask(flt.categories_none)
    mask[_id_rows(items, flt.deny)] = False
    return mask


def _id_rows(items: ItemTable, ids: tuple[str, ...]) -> np.ndarray:
    rows = [items.vocab.row(i) for i in ids]
    return np.array([r for r in rows if r is not None], np.int64)


__all__ = ["Filter", "allowed_rows", "check_exclude", "check_filter"]
