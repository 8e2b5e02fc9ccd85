"""A State as one generation's files, and back: the in-memory tables as Arrow tables and tensors
(storage/snapshot.py writes and reads the files), and every check that what was read is a store's.

The checksums catch damage; these checks catch files that are intact but wrong (written by a buggy
or foreign writer): such a store fails naming the file instead of crashing later.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
import pyarrow as pa

from ..errors import CorruptStoreError
from ..state.items import ITEM_SCHEMA, OPTIONAL_ITEM_COLUMNS, ItemTable
from ..state.users import (
    OPTIONAL_USER_COLUMNS, USER_SCHEMA, UserTable, check_item_rows, user_arrays, users_from_arrow, users_to_arrow,
)
from ..storage.snapshot import read_generation, saved_vectors, write_generation
from ..storage.store import StoreDir
from .state import State

T = TypeVar("T")
SCHEMAS = {"items": (ITEM_SCHEMA, OPTIONAL_ITEM_COLUMNS), "users": (USER_SCHEMA, OPTIONAL_USER_COLUMNS)}


def write_state(store: StoreDir, gen: int, st: State) -> list[Path]:
    """Write `st` as generation `gen`; returns the files' paths (not yet committed)."""
    vectors = {"item_text": st.items.vectors, **user_arrays(st.users, st.items.dim),
               "event_keys": st.event_key_array(), "event_ids": st.event_id_array()}
    return write_generation(store, gen, st.items.to_arrow(), users_to_arrow(st.users), vectors,
                            st.ranker.model_tensors(st.proj), st.index)


def read_state(store: StoreDir, manifest: dict[str, Any], d_text: int, handles: dict[str, BinaryIO] | None = None
               ) -> tuple[ItemTable, UserTable, dict[str, np.ndarray] | None, Path | None, np.ndarray, np.ndarray]:
    """The tables, models, index file and event identities of the generation `manifest` names
    (State.load takes them)."""
    g = read_generation(store, manifest, SCHEMAS, handles)
    vec_path, items_path, users_path = g.paths["vectors"], g.paths["items"], g.paths["users"]
    item_vecs = g.vectors.get("item_text", np.zeros((0, d_text), np.float32))
    if item_vecs.ndim != 2 or (len(item_vecs) and item_vecs.shape[1] != d_text) or item_vecs.dtype != np.float32:
        raise CorruptStoreError(f"{vec_path}: item vectors of {item_vecs.dtype} {item_vecs.shape}, "
                                f"expected float32 (n, {d_text})")
    for key in ("user_vectors", "user_profiles"):
        if key not in g.vectors or g.vectors[key].ndim != 2:
            raise CorruptStoreError(f"{vec_path}: no 2-d tensor {key!r}; not a Kindling vectors file")
    if g.items.num_rows != len(item_vecs):
        raise CorruptStoreError(f"{items_path}: {g.items.num_rows} items but {len(item_vecs)} vectors "
                                f"in {vec_path.name}")
    items = _parsed(items_path, lambda: ItemTable.from_arrow(g.items, item_vecs.reshape(-1, d_text)))
    if g.users.num_rows != len(g.vectors["user_vectors"]):
        raise CorruptStoreError(f"{users_path}: {g.users.num_rows} users but "
                                f"{len(g.vectors['user_vectors'])} user vectors in {vec_path.name}")
    _parsed(users_path, lambda: check_item_rows(g.users, len(items)))
    users = _parsed(users_path, lambda: users_from_arrow(g.users, g.vectors["user_vectors"],
                                                         g.vectors["user_profiles"]))
    return items, users, g.models, g.index, g.event_keys, g.event_ids


def map_saved_vectors(store: StoreDir, manifest: dict[str, Any], items: ItemTable) -> None:
    """After a save: take `items`' vectors from the vectors file just written, mapped, so the rows
    held in memory (added or replaced since the last snapshot) are dropped. The file is this
    process's own, fsynced a moment ago, and holds exactly `items.vectors`."""
    mapped = saved_vectors(store, manifest, items.dim)
    if mapped is not None:
        items.install_vectors(mapped)


def _parsed(path: Path, build: Callable[[], T]) -> T:
    try:
        return build()
    except (KeyError, ValueError, TypeError, IndexError, pa.ArrowException) as exc:
        raise CorruptStoreError(f"{path}: does not hold what a Kindling store needs ({exc})") from exc
