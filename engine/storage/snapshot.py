"""Writing and reading the files of one generation: Arrow tables, safetensors, the index file.

What the tables and tensors hold is the state's business (runtime/generation.py turns the
in-memory tables into these and back); this module knows files, their kinds and their checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors import SafetensorError
from safetensors.numpy import load, load_file, save_file

from ..errors import CorruptStoreError
from .mapped import map_tensors
from .store import StoreDir, atomic_write

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


def write_generation(store: StoreDir, gen: int, items: pa.Table, users: pa.Table, vectors: dict[str, np.ndarray],
                     models: dict[str, np.ndarray], index) -> list[Path]:
    """Write every state file of generation `gen`: the item and user tables, the vectors file, the
    models file (when `models`) and the index (a FAISS one holding rows; `index.save(path)`
    writes it). Returns their paths (not yet committed)."""
    paths = [store.file("items", gen, "parquet"), store.file("users", gen, "parquet"),
             store.file("vectors", gen, "safetensors")]
    write_parquet(paths[0], items)
    write_parquet(paths[1], users)
    write_tensors(paths[2], vectors)
    if models:
        paths.append(store.file("models", gen, "safetensors"))
        write_tensors(paths[-1], models)
    if index is not None and index.ntotal and index.backend == "faiss":  # Milvus keeps its own
        paths.append(store.file("index", gen, "faiss"))
        atomic_write(paths[-1], index.save)
    return paths


@dataclass
class Generation:
    """One generation's files as read: Arrow tables and tensors, checked as files (a readable
    table with the columns asked for, tensors of the right kind); what they mean is the
    reader's (runtime/generation.py)."""

    items: pa.Table
    users: pa.Table
    vectors: dict[str, np.ndarray]   # mapped: the item vectors stay in the file
    models: dict[str, np.ndarray] | None
    index: Path | None
    event_keys: np.ndarray
    event_ids: np.ndarray
    paths: dict[str, Path]           # "items", "users", "vectors": the files, for messages


def read_generation(store: StoreDir, manifest: dict[str, Any], schemas: dict[str, tuple[pa.Schema, tuple[str, ...]]],
                    handles: dict[str, BinaryIO] | None = None) -> Generation:
    """Read generation G's files; a file not shaped as `write_generation` writes it is
    CorruptStoreError naming it. `schemas`: per table ("items", "users"), the schema and the
    columns a store written by an earlier version may lack.

    The checksums catch damage; these checks catch a file that is intact but wrong (written by a
    buggy or foreign writer), so that such a store fails naming the file instead of crashing later.
    With `handles` (from `StoreDir.pin`) the files are read through them.
    """
    pinned = handles or {}
    gen = int(manifest["generation"])
    files = manifest["files"]
    paths = {name: store.file(name, gen, ext) for name, ext in
             (("items", "parquet"), ("users", "parquet"), ("vectors", "safetensors"))}
    tensors = map_tensors(paths["vectors"], pinned.get(paths["vectors"].name))
    tables = {name: with_schema(read_parquet(paths[name], pinned.get(paths[name].name)), *schemas[name], paths[name])
              for name in ("items", "users")}
    model_name = store.file("models", gen, "safetensors").name
    models = read_tensors(store.path / model_name, pinned.get(model_name)) if model_name in files else None
    index_name = store.file("index", gen, "faiss").name
    keys, ids = (_id_tensor(tensors, name, paths["vectors"]) for name in ("event_keys", "event_ids"))
    return Generation(tables["items"], tables["users"], tensors, models,
                      store.path / index_name if index_name in files else None, keys, ids, paths)


def _id_tensor(tensors: dict[str, np.ndarray], name: str, path: Path) -> np.ndarray:
    """A 1-d uint64 tensor of hashes; empty when absent (stores written before imports, or before
    event ids: older stores open with none)."""
    out = tensors.get(name, np.zeros(0, np.uint64))
    if out.ndim != 1 or out.dtype != np.uint64:
        raise CorruptStoreError(f"{path}: {name} must be a 1-d uint64 tensor; got {out.dtype} {out.shape}")
    return out


def with_schema(table: pa.Table, schema: pa.Schema, optional: tuple[str, ...], path: Path) -> pa.Table:
    """`table` when it has every column of `schema` but the `optional` ones; else CorruptStoreError."""
    missing = [f.name for f in schema if f.name not in table.column_names and f.name not in optional]
    if missing:
        raise CorruptStoreError(f"{path}: missing column(s) {', '.join(missing)}; not a Kindling table")
    return table


def saved_vectors(store: StoreDir, manifest: dict[str, Any], dim: int) -> np.ndarray | None:
    """The item vectors of the generation `manifest` names, mapped from its vectors file (None
    when it has none): after a save, the rows held in memory can give way to them."""
    path = store.file("vectors", int(manifest["generation"]), "safetensors")
    if path.name not in manifest.get("files", {}):
        return None
    mapped = map_tensors(path).get("item_text", np.zeros((0, dim), np.float32))
    return mapped.reshape(-1, dim) if mapped.size == 0 else mapped
