"""Writing and reading one generation of engine state (tables, vectors, models, index)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors import SafetensorError
from safetensors.numpy import load, load_file, save_file

from ..errors import CorruptStoreError
from .mapped import map_tensors
from ..state.items import ITEM_SCHEMA, OPTIONAL_ITEM_COLUMNS, ItemTable
from .store import StoreDir, atomic_write
from ..state.users import UserTable
from ..state.vocab import Vocabulary

USER_SCHEMA = pa.schema([
    ("user_id", pa.string()), ("clicks", pa.list_(pa.int64())), ("skips", pa.list_(pa.int64())),
    ("impressions", pa.int64()), ("profile", pa.string()), ("held", pa.list_(pa.int64())),
    ("dislikes", pa.list_(pa.int64())),
])
#: Columns a store written by an earlier version may lack (read as empty).
OPTIONAL_USER_COLUMNS = ("held", "dislikes")


def users_to_arrow(users: UserTable) -> pa.Table:
    s = users.states
    return pa.Table.from_arrays([
        users.vocab.to_arrow(), pa.array([u.clicks for u in s], pa.list_(pa.int64())),
        pa.array([u.skips for u in s], pa.list_(pa.int64())), pa.array([u.impressions for u in s], pa.int64()),
        pa.array([u.profile for u in s], pa.string()), pa.array([u.held for u in s], pa.list_(pa.int64())),
        pa.array([u.dislikes for u in s], pa.list_(pa.int64())),
    ], schema=USER_SCHEMA)


def user_arrays(users: UserTable, d_text: int) -> dict[str, np.ndarray]:
    n = len(users)
    vecs = np.zeros((n, users.dim), np.float32)
    prof = np.zeros((n, d_text), np.float32)
    for r, u in enumerate(users.states):
        vecs[r] = u.vector
        if u.profile_vec is not None:
            prof[r] = u.profile_vec
    return {"user_vectors": vecs, "user_profiles": prof}


def users_from_arrow(table: pa.Table, vecs: np.ndarray, profiles: np.ndarray) -> UserTable:
    users = UserTable(vecs.shape[1] if vecs.ndim == 2 else 0)
    users.vocab = Vocabulary.from_arrow(table.column("user_id"))  # row r is table row r
    cols = table.to_pydict()
    for r, uid in enumerate(cols["user_id"]):
        state = users.get_or_create(uid)
        state.vector = vecs[r].copy()
        state.clicks, state.skips = list(cols["clicks"][r]), list(cols["skips"][r])
        state.impressions = int(cols["impressions"][r])
        state.profile = cols["profile"][r]
        state.profile_vec = profiles[r].copy() if state.profile is not None else None
        state.held = list(cols["held"][r]) if "held" in cols else []
        state.dislikes = list(cols["dislikes"][r]) if "dislikes" in cols else []
    return users


def write_parquet(path: Path, table: pa.Table) -> None:
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def write_tensors(path: Path, tensors: dict[str, np.ndarray], meta: dict[str, str] | None = None) -> None:
    clean = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(clean, str(tmp), metadata=meta))


def read_parquet(path: Path, fh: BinaryIO | None = None) -> pa.Table:
    """Read a table; from `fh` (a pinned handle of `path`) when given. Errors name `path`."""
    try:
        if fh is not None:
            fh.seek(0)
        return pq.read_table(fh if fh is not None else path)
    except (pa.ArrowException, OSError) as exc:
        raise CorruptStoreError(f"{path}: unreadable Parquet table ({exc})") from exc


def read_tensors(path: Path, fh: BinaryIO | None = None) -> dict[str, np.ndarray]:
    """Read a safetensors file; from `fh` (a pinned handle of `path`) when given."""
    try:
        if fh is not None:
            fh.seek(0)
            return load(fh.read())
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptStoreError(f"{path}: unreadable safetensors file ({exc})") from exc


def write_generation(store: StoreDir, gen: int, items: ItemTable, users: UserTable,
                     models: dict[str, np.ndarray], index, event_keys: np.ndarray,
                     event_ids: np.ndarray | None = None) -> list[Path]:
    """Write every state file of generation `gen`; returns their paths (not yet committed)."""
    paths = [store.file("items", gen, "parquet"), store.file("users", gen, "parquet"),
             store.file("vectors", gen, "safetensors")]
    write_parquet(paths[0], items.to_arrow())
    write_parquet(paths[1], users_to_arrow(users))
    write_tensors(paths[2], {"item_text": items.vectors, **user_arrays(users, items.dim),
                             "event_keys": np.asarray(event_keys, np.uint64),
                             "event_ids": np.asarray(np.zeros(0) if event_ids is None else event_ids, np.uint64)})
    if models:
        paths.append(store.file("models", gen, "safetensors"))
        write_tensors(paths[-1], models)
    if index is not None and index.ntotal and index.backend == "faiss":  # Milvus keeps its own
        paths.append(store.file("index", gen, "faiss"))
        atomic_write(paths[-1], index.save)
    return paths


def read_generation(store: StoreDir, manifest: dict[str, Any], d_text: int,
                    handles: dict[str, BinaryIO] | None = None
                    ) -> tuple[ItemTable, UserTable, dict[str, np.ndarray] | None, Path | None, np.ndarray,
                               np.ndarray]:
    """Read generation G's files; anything not shaped as this module writes it is CorruptStoreError.

    The checksums catch damage; these checks catch a file that is intact but wrong (written by a
    buggy or foreign writer), so that such a store fails naming the file instead of crashing later.
    With `handles` (from `StoreDir.pin`) the files are read through them.
    """
    pinned = handles or {}
    gen = int(manifest["generation"])
    files = manifest["files"]
    vec_path = store.file("vectors", gen, "safetensors")
    tensors = map_tensors(vec_path, pinned.get(vec_path.name))  # the item vectors stay in the file
    item_vecs = tensors.get("item_text", np.zeros((0, d_text), np.float32))
    if item_vecs.ndim != 2 or (len(item_vecs) and item_vecs.shape[1] != d_text) or item_vecs.dtype != np.float32:
        raise CorruptStoreError(f"{vec_path}: item vectors of {item_vecs.dtype} {item_vecs.shape}, "
                                f"expected float32 (n, {d_text})")
    for key in ("user_vectors", "user_profiles"):
        if key not in tensors or tensors[key].ndim != 2:
            raise CorruptStoreError(f"{vec_path}: no 2-d tensor {key!r}; not a Kindling vectors file")
    items_path = store.file("items", gen, "parquet")
    items_table = _with_schema(read_parquet(items_path, pinned.get(items_path.name)), ITEM_SCHEMA, items_path,
                               OPTIONAL_ITEM_COLUMNS)
    if items_table.num_rows != len(item_vecs):
        raise CorruptStoreError(f"{items_path}: {items_table.num_rows} items but {len(item_vecs)} vectors "
                                f"in {vec_path.name}")
    items = _parsed(items_path, lambda: ItemTable.from_arrow(items_table, item_vecs.reshape(-1, d_text)))
    users_path = store.file("users", gen, "parquet")
    users_table = _with_schema(read_parquet(users_path, pinned.get(users_path.name)), USER_SCHEMA, users_path,
                               OPTIONAL_USER_COLUMNS)
    if users_table.num_rows != len(tensors["user_vectors"]):
        raise CorruptStoreError(f"{users_path}: {users_table.num_rows} users but "
                                f"{len(tensors['user_vectors'])} user vectors in {vec_path.name}")
    _check_rows(users_table, len(items), users_path)
    users = _parsed(users_path, lambda: users_from_arrow(users_table, tensors["user_vectors"],
                                                         tensors["user_profiles"]))
    model_name = store.file("models", gen, "safetensors").name
    models = read_tensors(store.path / model_name, pinned.get(model_name)) if model_name in files else None
    index_name = store.file("index", gen, "faiss").name
    keys, ids = (_id_tensor(tensors, name, vec_path) for name in ("event_keys", "event_ids"))
    return items, users, models, (store.path / index_name if index_name in files else None), keys, ids


def _id_tensor(tensors: dict[str, np.ndarray], name: str, path: Path) -> np.ndarray:
    """A 1-d uint64 tensor of hashes; empty when absent (stores written before imports, or before
    event ids: older stores open with none)."""
    out = tensors.get(name, np.zeros(0, np.uint64))
    if out.ndim != 1 or out.dtype != np.uint64:
        raise CorruptStoreError(f"{path}: {name} must be a 1-d uint64 tensor; got {out.dtype} {out.shape}")
    return out


def _with_schema(table: pa.Table, schema: pa.Schema, path: Path, optional: tuple[str, ...] = ()) -> pa.Table:
    missing = [f.name for f in schema if f.name not in table.column_names and f.name not in optional]
    if missing:
        raise CorruptStoreError(f"{path}: missing column(s) {', '.join(missing)}; not a Kindling table")
    return table


def _check_rows(users: pa.Table, n_items: int, path: Path) -> None:
    """Histories may only name item rows that exist."""
    import pyarrow.compute as pc

    for col in [c for c in ("clicks", "skips", "held", "dislikes") if c in users.column_names]:
        flat = pc.list_flatten(users.column(col))
        if len(flat) and (pc.min(flat).as_py() < 0 or pc.max(flat).as_py() >= n_items):
            raise CorruptStoreError(f"{path}: column {col!r} names item rows outside 0..{n_items - 1}")


def _parsed(path: Path, build):
    try:
        return build()
    except (KeyError, ValueError, TypeError, IndexError, pa.ArrowException) as exc:
        raise CorruptStoreError(f"{path}: does not hold what a Kindling store needs ({exc})") from exc



def map_saved_vectors(store: StoreDir, manifest: dict[str, Any], items: ItemTable) -> None:
    """After a save: take `items`' vectors from the vectors file just written, mapped, so the rows
    held in memory (added or replaced since the last snapshot) are dropped. The file is this
    process's own, fsynced a moment ago, and holds exactly `items.vectors`."""
    path = store.file("vectors", int(manifest["generation"]), "safetensors")
    if path.name not in manifest.get("files", {}):
        return
    mapped = map_tensors(path).get("item_text", np.zeros((0, items.dim), np.float32))
    items.install_vectors(mapped.reshape(-1, items.dim) if mapped.size == 0 else mapped)
