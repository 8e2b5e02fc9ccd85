"""The language model a store embeds with: the configured one, or the one `fit` tuned into the
store (`Config.tune_steps`), loaded once on first use, offline."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from ..config import Config
from ..storage.store import StoreDir
from ..text.encoder import Encoder, TextEncoder, default_model_path


class EncoderHome:
    """Which model a store embeds with, and that model once loaded (`encoder`)."""

    def __init__(self, store: StoreDir, config: Config, encoder: TextEncoder | None) -> None:
        self.store, self.config = store, config
        self.current = encoder  # None until loaded (or given)
        self._lock = threading.Lock()  # loading the model must not hold up the state's lock
        self.tuned_dir: Path | None = None  # the store's tuned language model (manifest model.tuned)
        self.tuned_files: dict[str, Any] = {}  # its files as the manifest describes them

    def use_tuned(self, name: str | None, files: dict[str, Any]) -> None:
        """Embed with the tuned model folder `name` of this store (None: the configured model).

        An encoder given to `open`/`create` is kept unless it has a `model_path` (an `Encoder`)
        naming another model than the store's tuned one, or a stale tuned folder of this store:
        the store's items were embedded by the tuned model, and new ones must be too (a caller's
        own encoder without a `model_path` is the caller's to keep consistent)."""
        self.tuned_dir = None if not name else self.store.encoder_path(name)
        self.tuned_files = {k: v for k, v in files.items() if name and k.startswith(name + "/")}
        folder = getattr(self.current, "model_path", None)  # an Encoder's; a caller's own has none
        if isinstance(folder, str) and Path(folder).resolve() != Path(self.model_dir()).resolve():
            if self.tuned_dir is not None or Path(folder).resolve().parent == self.store.path.resolve():
                self.current = None  # loaded again, from the store's model, on first use

    def model_dir(self) -> str:
        """The folder the store embeds with: its tuned model, or the configured one."""
        if self.tuned_dir is not None:
            return str(self.tuned_dir)
        return self.config.model_path or default_model_path()

    @property
    def encoder(self) -> TextEncoder:
        """The language model, loaded on first use (once, whichever thread asks first)."""
        with self._lock:
            if self.current is None:
                self.current = self.make(self.model_dir())
            return self.current

    def make(self, path: str) -> Encoder:
        """A sentence-transformers model from the folder `path`, with the store's settings."""
        return Encoder(path, batch_size=self.config.batch_size, show_progress=False,
                       backend=self.config.encoder_backend)

    def tunable(self) -> bool:
        """Can `fit` tune this store's model (no encoder given, or a sentence-transformers one)?"""
        return self.current is None or isinstance(getattr(self.current, "model_path", None), str)

    def adopt_tuned(self, folder: Path, encoder: TextEncoder) -> None:
        """Embed from now on with the model `fit` just tuned into `folder`."""
        self.tuned_dir, self.tuned_files, self.current = folder, {}, encoder

    def meta(self, dim: int | None, manifest: dict[str, Any]) -> dict[str, Any]:
        """The manifest's `model` entry."""
        if dim is None:
            return {"path": self.config.model_path, "dim": None}
        out = {"path": self.config.model_path, "dim": dim,
               "name": getattr(self.current, "name", manifest.get("model", {}).get("name"))}
        if self.tuned_dir is not None:
            out["tuned"] = self.tuned_dir.name
        return out

    def manifest_files(self) -> dict[str, Any]:
        """The tuned model's files as the manifest lists them (hashed once, after the fit that
        tuned it); none without a tuned model."""
        if self.tuned_dir is None:
            return {}
        if not self.tuned_files:
            self.tuned_files = self.store.describe_tree(self.tuned_dir)
        return self.tuned_files
