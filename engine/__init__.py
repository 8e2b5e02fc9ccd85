"""Kindling: cold-start recommendations from the first minute of an item's or a user's life."""

from __future__ import annotations

import logging

__version__ = "0.1.0"

from .config import Config  # noqa: E402
from .engine import Engine  # noqa: E402
from .errors import (  # noqa: E402
    CorruptStoreError, DuplicateItemError, EngineError, InvalidInputError, ModelLoadError, ReadOnlyStoreError,
    StoreError, StoreLockedError, UnknownItemError, UnknownUserError,
)
from .serving.filters import Filter  # noqa: E402
from .types import Because, Event, Item, Recommendation  # noqa: E402

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "Because", "Config", "CorruptStoreError", "DuplicateItemError", "Engine", "EngineError", "Event", "Filter", "InvalidInputError", "Item",
    "ModelLoadError", "ReadOnlyStoreError", "Recommendation", "StoreError", "StoreLockedError", "UnknownItemError",
    "UnknownUserError", "__version__",
]
