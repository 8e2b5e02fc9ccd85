"""Tensors of a safetensors file as memory maps: the item vectors stay file pages, not a copy.

A safetensors file is an 8-byte little-endian header length, a JSON header giving each tensor's
dtype, shape and byte range (`data_offsets`, from the end of the header), then the raw data. Each
tensor here is mapped copy-on-write (`np.memmap` mode "c", a private mapping): nothing is read
until a row is touched, touched rows are page cache (the kernel may drop and reread them), and a
write to a row (an upsert) copies that page into the process alone, never into the file.

A mapping holds the file open: when a save deletes an old generation's name the mapped pages stay
valid until the arrays are dropped (nothing re-opens the file by its name).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import CorruptStoreError

#: safetensors dtype names -> numpy (the kinds Kindling writes, and their neighbours).
DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "U8": np.uint8,
          "I16": np.int16, "U16": np.uint16, "I32": np.int32, "U32": np.uint32, "I64": np.int64,
          "U64": np.uint64, "BOOL": np.bool_}
#: safetensors refuses headers above 100 MB; so does this reader (a damaged length must not allocate).
MAX_HEADER = 100_000_000


def map_tensors(path: Path, fh: BinaryIO | None = None) -> dict[str, np.ndarray]:
    """Every tensor of the safetensors file `path` (read through `fh`, a pinned handle, when given)
    as a copy-on-write memory map; nothing of the data is read here.

    Raises:
        CorruptStoreError: the file is not a well-formed safetensors file (checked as strictly as
            safetensors' own loader: known dtypes, sizes that match the shapes, byte ranges that
            tile the data exactly).
    """
    try:
        own = fh is None
        f = open(path, "rb") if own else fh
        try:
            return _map(f, path)
        finally:
            if own:
                f.close()
    except OSError as exc:
        raise CorruptStoreError(f"{path}: unreadable safetensors file ({exc})") from exc


def _map(fh: BinaryIO, path: Path) -> dict[str, np.ndarray]:
    size = os.fstat(fh.fileno()).st_size
    fh.seek(0)
    head = fh.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if n < 2 or n > min(MAX_HEADER, size - 8):
        raise CorruptStoreError(f"{path}: unreadable safetensors file (header length {n} in a file of {size} bytes)")
    try:
        header = json.loads(fh.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptStoreError(f"{path}: unreadable safetensors file (header: {exc})") from exc
    if not isinstance(header, dict):
        raise CorruptStoreError(f"{path}: unreadable safetensors file (the header is not a JSON object)")
    start = 8 + n
    specs = sorted(((_spec(name, meta, path), name) for name, meta in header.items() if name != "__metadata__"),
                   key=lambda s: s[0][2])
    end = 0
    for (dtype, shape, (lo, hi)), name in specs:
        if lo != end or hi - lo != math.prod(shape) * dtype.itemsize:
            raise CorruptStoreError(f"{path}: unreadable safetensors file (tensor {name!r}: byte range "
                                    f"[{lo}, {hi}) does not follow the previous one or fit its shape {shape})")
        end = hi
    if start + end != size:
        raise CorruptStoreError(f"{path}: unreadable safetensors file ({size - start} data bytes, "
                                f"the tensors cover {end})")
    return {name: _tensor(fh, dtype, shape, start + lo) for (dtype, shape, (lo, _)), name in specs}


def _spec(name: str, meta: object, path: Path) -> tuple[np.dtype, tuple[int, ...], tuple[int, int]]:
    try:
        dtype = np.dtype(DTYPES[meta["dtype"]])
        shape = tuple(int(x) for x in meta["shape"])
        lo, hi = (int(x) for x in meta["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptStoreError(f"{path}: unreadable safetensors file (tensor {name!r}: {exc!r})") from exc
    if min(shape, default=0) < 0 or lo < 0:
        raise CorruptStoreError(f"{path}: unreadable safetensors file (tensor {name!r}: negative shape or offset)")
    return dtype, shape, (lo, hi)


def _tensor(fh: BinaryIO, dtype: np.dtype, shape: tuple[int, ...], offset: int) -> np.ndarray:
    if math.prod(shape) == 0:  # mmap cannot map zero bytes
        return np.zeros(shape, dtype)
    if offset % dtype.itemsize:  # safetensors pads its header so this does not happen; if it does, copy
        fh.seek(offset)
        return np.frombuffer(fh.read(math.prod(shape) * dtype.itemsize), dtype).reshape(shape).copy()
    # mmap keeps its own duplicate of the descriptor: closing `fh` later leaves the map valid
    return np.memmap(fh, dtype, "c", offset=offset, shape=shape).view(np.ndarray)
