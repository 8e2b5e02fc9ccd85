"""The on-disk layout: a directory with a manifest, checksummed files, a lock and the event log.

    STORE/
      manifest.json            format, version, config, generation, files with sha256, log name,
                               and a sha256 of itself (every damage to it is detected)
      items-G.parquet          the catalog, tombstones and item statistics
      users-G.parquet          users' histories and profiles
      vectors-G.safetensors    item text vectors, user vectors, profile vectors
      models-G.safetensors     projection and reranker weights (when trained)
      index-G.faiss            the FAISS index
      events-G.log             mutations acknowledged since snapshot G (write-ahead log)
      encoder-G/               the language model `fit` tuned at generation G (safetensors, with
                               its tokenizer); kept while the manifest names it (model.tuned)
      LOCK                     held with flock by the one writer

Save writes generation G+1 beside G (temp name, fsync, rename), then swaps the manifest with
`os.replace` and fsyncs the directory: a crash at any moment leaves either G or G+1, whole.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import CorruptStoreError, StoreError, StoreLockedError

FORMAT = "kindling-store"
#: Written by this version. 2 added import records in the log, event identities in the vectors
#: file and the users' held column; a reader of version 1 would skip import records silently, so
#: it must refuse a version-2 store. Version 1 stores read as version 2 without those parts.
#: 3: the store holds a tuned language model (the folder encoder-G, named by the manifest's model.tuned);
#: an older reader would embed new items with the base model, in another space, so it must
#: refuse it. A store without a tuned model is written as version 2.
FORMAT_VERSION = 2
TUNED_FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"
LOCK = "LOCK"
_ENCODER_DIR = re.compile(r"^encoder-(\d+)$")
_GEN_FILE = re.compile(r"^(items|users|vectors|models|index|events)-(\d+)\.(parquet|safetensors|faiss|log)$")


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return sha256_stream(fh)


def sha256_stream(fh: BinaryIO) -> str:
    """sha256 of an open file from its start (the handle is left at its end)."""
    fh.seek(0)
    h = hashlib.sha256()
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest without its own `checksum` field, in a canonical JSON form.

    It makes every bit flip in manifest.json an error: a flip that still parses as JSON (a digit of
    next_seq, a config value) would otherwise load a silently different store.
    """
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), fsync the result, rename it over `path`; remove the temp on failure."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_store_path(path: Path, must_exist: bool) -> Path:
    """Refuse paths that are not what they claim; the error names the rule."""
    if path.is_symlink():
        raise StoreError(f"{path}: a store path must not be a symbolic link")
    if must_exist:
        if not path.exists():
            raise StoreError(f"{path}: no such store")
        if not path.is_dir():
            raise StoreError(f"{path}: a store is a directory; this is a file")
        if not (path / MANIFEST).is_file():
            raise StoreError(f"{path}: not a Kindling store (no {MANIFEST})")
    elif path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise StoreError(f"{path}: exists and is not an empty directory; a new store needs a fresh path")
    return path


class StoreDir:
    """Lock, manifest and file bookkeeping of one store directory."""

    def __init__(self, path: str | Path, create: bool = False, read_only: bool = False) -> None:
        self.path = check_store_path(Path(path), must_exist=not create)
        if create:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"{self.path}: cannot create the store directory ({exc.strerror or exc})") from exc
        self.read_only = read_only
        self._lock_fh = None if read_only else self._lock()

    def _lock(self):
        try:  # never through a symbolic link: truncating it would damage whatever it points at
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            raise StoreError(f"{self.path / LOCK}: cannot open the lock file ({exc.strerror or exc}); "
                             "it must be a regular file the writer may write") from exc
        fh = os.fdopen(fd, "r+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise StoreLockedError(f"{self.path}: locked for writing by {holder}; "
                                       "open it read-only or stop that process") from exc
            raise
        # flock dies with its process, so a lock left by a killed writer is simply taken over.
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        fh.flush()
        return fh

    def release(self) -> None:
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def file(self, kind: str, gen: int, ext: str) -> Path:
        return self.path / f"{kind}-{gen:06d}.{ext}"

    def encoder_dir(self, gen: int) -> Path:
        """Where generation `gen` keeps a language model tuned at its fit (a fresh, empty folder:
        a leftover of a crashed fit is removed)."""
        path = self.path / f"encoder-{gen:06d}"
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
        return path

    def encoder_path(self, name: str) -> Path:
        """The tuned model folder `name` (from a manifest), refused unless it is a real folder of
        this store."""
        path = self.path / name
        if not _ENCODER_DIR.match(name) or path.is_symlink() or not path.is_dir():
            raise CorruptStoreError(f"{path}: the manifest names a tuned model that is not a folder of the store")
        return path

    def describe_tree(self, folder: Path) -> dict[str, dict[str, Any]]:
        """`describe` for every file under `folder`, named by its path from the store's root; the
        files and folders are fsynced first (a manifest may only name durable files)."""
        out = {}
        for p in sorted(f for f in folder.rglob("*") if f.is_file()):
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
            out[p.relative_to(self.path).as_posix()] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for d in sorted({p.parent for p in folder.rglob("*")} | {folder}):
            fsync_dir(d)
        fsync_dir(self.path)
        return out

    def read_manifest(self) -> dict[str, Any]:
        p = self.path / MANIFEST
        if p.is_symlink():
            raise CorruptStoreError(f"{p}: a store file must not be a symbolic link")
        try:
            manifest = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptStoreError(f"{p}: unreadable manifest ({exc})") from exc
        except OSError as exc:
            raise StoreError(f"{p}: cannot read the manifest ({exc.strerror or exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise CorruptStoreError(f"{p}: not a Kindling manifest")
        if manifest.get("checksum") != manifest_digest(manifest):
            raise CorruptStoreError(f"{p}: checksum mismatch; the manifest is damaged")
        if manifest.get("format_version") not in READABLE_VERSIONS:
            raise StoreError(f"{p}: format version {manifest.get('format_version')} is not supported "
                             f"(this Kindling reads versions {', '.join(map(str, READABLE_VERSIONS))})")
        return manifest

    def pin(self, manifest: dict[str, Any]) -> dict[str, BinaryIO]:
        """Open every file of the manifest's generation, its log included.

        A reader that holds them open keeps reading the generation it picked even when the writer
        saves the next one and deletes these names meanwhile. The caller closes the handles.
        """
        handles: dict[str, BinaryIO] = {}
        try:
            for name in [*manifest.get("files", {}), manifest.get("log")]:
                if not isinstance(name, str) or name in handles:
                    continue
                p = self.path / name
                try:
                    handles[name] = os.fdopen(os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb")
                except FileNotFoundError:
                    if name != manifest.get("log"):  # an absent log just holds no records
                        raise CorruptStoreError(f"{p}: missing (named by the manifest)") from None
                except OSError as exc:
                    if exc.errno == errno.ELOOP:
                        raise CorruptStoreError(f"{p}: a store file must not be a symbolic link") from None
                    raise StoreError(f"{p}: cannot be read ({exc.strerror or exc})") from exc
        except BaseException:
            for fh in handles.values():
                fh.close()
            raise
        return handles

    def verify(self, manifest: dict[str, Any], handles: dict[str, BinaryIO] | None = None) -> None:
        """Check every file the manifest names against its size and sha256 (and the log's kind).

        With `handles` (from `pin`) the pinned files are checked, not whatever the names hold now.
        """
        log = self.path / str(manifest.get("log"))
        if log.is_symlink():
            raise CorruptStoreError(f"{log}: a store file must not be a symbolic link")
        for name, meta in manifest.get("files", {}).items():
            p, fh = self.path / name, (handles or {}).get(name)
            if fh is not None:
                size, digest = os.fstat(fh.fileno()).st_size, sha256_stream(fh)
            elif p.is_symlink():
                raise CorruptStoreError(f"{p}: a store file must not be a symbolic link")
            elif not p.is_file():
                raise CorruptStoreError(f"{p}: missing (named by the manifest)")
            else:
                size, digest = p.stat().st_size, sha256_file(p)
            if size != meta.get("bytes") or digest != meta.get("sha256"):
                raise CorruptStoreError(f"{p}: checksum mismatch; the file is damaged")

    def manifest_generation(self) -> int | None:
        """The generation of the manifest now on disk; None when it is missing or unreadable."""
        try:
            return int(json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))["generation"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def describe(self, paths: list[Path]) -> dict[str, dict[str, Any]]:
        return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in paths}

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        signed = {**manifest, "checksum": manifest_digest(manifest)}
        data = json.dumps(signed, indent=1, sort_keys=True).encode("utf-8")
        atomic_write(self.path / MANIFEST, lambda tmp: tmp.write_bytes(data))
        fsync_dir(self.path)

    def cleanup(self, manifest: dict[str, Any]) -> None:
        """Delete files of other generations and stray temp files (a crash mid-save leaves them)."""
        keep = set(manifest.get("files", {})) | {manifest.get("log")}
        folders = {name.split("/")[0] for name in keep if isinstance(name, str) and "/" in name}
        for p in self.path.iterdir():
            stray_tmp = p.name.startswith(".") and ".tmp-" in p.name
            if _ENCODER_DIR.match(p.name) and p.name not in folders and not p.is_symlink() and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif (_GEN_FILE.match(p.name) and p.name not in keep) or stray_tmp:
                p.unlink(missing_ok=True)
