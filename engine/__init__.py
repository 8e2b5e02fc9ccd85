"""Kindling: cold-start recommendations from the first minute of an item's or a user's life."""

from __future__ import annotations

import logging

from .config import Config
from .engine import Engine
from .errors import (
    CorruptStoreError, DuplicateItemError, EngineError, InvalidInputError, ModelLoadError, ReadOnlyStoreError,
    StoreError, StoreLockedError, UnknownItemError, UnknownUserError,
)
from .serving.filters import Filter
from .types import Because, Event, Item, Recommendation
from .version import __version__

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "Because", "Config", "CorruptStoreError", "DuplicateItemError", "Engine", "EngineError", "Event", "Filter", "InvalidInputError", "Item",
    "ModelLoadError", "ReadOnlyStoreError", "Recommendation", "StoreError", "StoreLockedError", "UnknownItemError",
    "UnknownUserError", "__version__",
]
