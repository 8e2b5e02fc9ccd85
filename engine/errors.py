"""Error classes. Each refines the builtin a caller would expect, so `except KeyError` still works."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error Kindling raises on purpose."""


class InvalidInputError(EngineError, ValueError):
    """Caller data broke a stated rule (the message names the rule)."""


class DuplicateItemError(InvalidInputError):
    """An added item id that the store already holds live (and upsert was not asked for)."""


class UnknownItemError(EngineError, KeyError):
    """An item id that the store does not hold (or that was removed)."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want a readable sentence
        return str(self.args[0]) if self.args else "unknown item"


class UnknownUserError(EngineError, KeyError):
    """A user id that the store does not hold."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown user"


class StoreError(EngineError, OSError):
    """The store on disk is missing, not a store, or of an unsupported format."""


class CorruptStoreError(StoreError):
    """A file of the store fails its checksum or cannot be parsed; the message names the file."""


class ReadOnlyStoreError(StoreError):
    """A write asked of an engine opened read-only (a reader or a replica)."""


class StoreLockedError(StoreError):
    """Another live process holds the store's write lock."""


class ModelLoadError(EngineError, RuntimeError):
    """The language model could not be loaded (missing path, custom code refused, ...)."""


class MissingExtraError(EngineError, ImportError):
    """An optional feature whose packages are not installed; the message names the extra."""


class ClusterError(EngineError, RuntimeError):
    """Work sent to a cluster (Ray) failed there; the message carries the worker's error."""
