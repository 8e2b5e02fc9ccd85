"""Shared fixtures: a fake encoder, the real model (loaded once), and a small real slice of MovieLens."""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from engine import Engine, InvalidInputError, Item

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "index_data" / "movielens-small"
#: Movies the end-to-end tests rely on, always in the slice (Toy Story, Monsters Inc., Finding Nemo).
SLICE_MUST_HAVE = ("1", "4886", "6377")
SLICE_ITEMS = 300
SLICE_EVENTS = 3000


class FakeEncoder:
    """Hashing bag-of-words: texts sharing words get close vectors. Float32, unit norm, deterministic.

    Good for tests of code that does not care what vectors mean; `calls` counts encode calls.
    """

    def __init__(self, dim: int = 64, name: str = "fake-bow") -> None:
        self.dim, self.name = dim, name
        self.calls = 0

    def _vector(self, text: str) -> np.ndarray:
        v = np.zeros(self.dim, np.float32)
        for word in re.findall(r"\w+", text.lower()):
            h = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
            v[int.from_bytes(h[:4], "little") % self.dim] += 1.0 if h[4] & 1 else -1.0
        n = float(np.linalg.norm(v))
        if n == 0.0:  # only words that cancelled out: fall back to a hash of the whole text
            v[int.from_bytes(hashlib.blake2b(text.encode()).digest()[:4], "little") % self.dim] = 1.0
            n = 1.0
        return v / n

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise InvalidInputError(f"text #{i} is empty")
        if not len(texts):
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self._vector(t) for t in texts]).astype(np.float32)


def small_catalog() -> list[Item]:
    """Twelve items in three clear topics (space, cooking, football) for the fake encoder."""
    topics = {
        "space": ["rocket launch orbit moon", "astronaut space station orbit", "mars rover space rocket",
                  "galaxy telescope stars space"],
        "food": ["pasta recipe tomato sauce", "bread baking oven recipe", "soup recipe vegetables pot",
                 "cake baking sugar oven"],
        "ball": ["football match goal league", "football cup final goal", "league table football season",
                 "goalkeeper football penalty goal"],
    }
    out = []
    for topic, texts in topics.items():
        for n, text in enumerate(texts):
            out.append(Item(f"{topic}-{n}", f"{topic.title()} {n}", text, (topic,)))
    return out


@pytest.fixture
def fake_encoder() -> FakeEncoder:
    return FakeEncoder()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def catalog() -> list[Item]:
    return small_catalog()


@pytest.fixture
def engine(tmp_path: Path, fake_encoder: FakeEncoder, catalog: list[Item]) -> Iterator[Engine]:
    """A writable store of the small catalog, built with the fake encoder."""
    eng = Engine.create(tmp_path / "store", encoder=fake_encoder)
    eng.add_items(catalog)
    yield eng
    eng.close(save=False)


@pytest.fixture(scope="session")
def real_encoder():
    """The real all-MiniLM-L6-v2, loaded once for the whole session."""
    from engine.text.encoder import Encoder

    return Encoder(show_progress=False)


@pytest.fixture(scope="session")
def ml_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real slice of the bundled MovieLens data, in the canonical layout.

    The first items of the catalog plus a few well-known animated films, and up to 3,000 of their
    events (oldest first).
    """
    out = tmp_path_factory.mktemp("movielens-slice")
    items = pq.read_table(BUNDLED / "items.parquet")
    ids = items.column("item_id").to_pylist()
    keep = [i for i in ids if i not in SLICE_MUST_HAVE][: SLICE_ITEMS - len(SLICE_MUST_HAVE)]
    keep += list(SLICE_MUST_HAVE)
    mask = pc.is_in(items.column("item_id"), value_set=pa.array(keep))
    pq.write_table(items.filter(mask), out / "items.parquet")
    events = pq.read_table(BUNDLED / "events.parquet")
    events = events.filter(pc.is_in(events.column("item_id"), value_set=pa.array(keep)))
    events = events.sort_by("timestamp").slice(0, SLICE_EVENTS)
    pq.write_table(events, out / "events.parquet")
    return out


@pytest.fixture(scope="session")
def real_store_template(tmp_path_factory: pytest.TempPathFactory, ml_slice: Path, real_encoder) -> Path:
    """A store of the slice embedded with the real model, built once; copy it before writing."""
    from engine.text.catalog import read_items

    path = tmp_path_factory.mktemp("real") / "store"
    with Engine.create(path, encoder=real_encoder) as eng:
        eng.ingest(read_items(ml_slice), progress=False)
    return path


@pytest.fixture
def real_store(tmp_path: Path, real_store_template: Path) -> Path:
    """A private, writable copy of the real-model store."""
    dst = tmp_path / "real-store"
    shutil.copytree(real_store_template, dst)
    return dst


@pytest.fixture(scope="session")
def ds(tmp_path_factory: pytest.TempPathFactory):
    """60 users of the bundled MovieLens data, as an evaluation dataset."""
    from engine.evaluation.datasets import load_dataset, write_sample

    return load_dataset(write_sample(BUNDLED, tmp_path_factory.mktemp("eval-sample"), n_users=60))


@pytest.fixture(scope="session")
def small(tmp_path_factory: pytest.TempPathFactory):
    """40 users on their 300 most-touched items: small enough for the engine and the real model."""
    from engine.evaluation.datasets import load_dataset, write_sample

    return load_dataset(write_sample(BUNDLED, tmp_path_factory.mktemp("eval-small"), 40, max_items=300))


@pytest.fixture
def small_store_path(tmp_path: Path) -> Path:
    """A closed store of `small_catalog()` embedded by the fake encoder, at tmp_path / "store"."""
    path = tmp_path / "store"
    with Engine.create(path, encoder=FakeEncoder()) as eng:
        eng.add_items(small_catalog())
    return path
