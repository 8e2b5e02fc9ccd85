"""Compact item columns: ids, titles and texts kept in the snapshot's Arrow arrays plus small
Python tails, and ids looked up in a numpy hash table, read exactly as plain lists and a dict."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from engine import Config, Engine, Item, UnknownItemError
from engine.state import vocab as vocab_module
from engine.state.columns import StringColumn
from engine.state.items import ITEM_SCHEMA, NEVER, ItemTable
from engine.state.vocab import Vocabulary
from engine.storage.snapshot import read_parquet, write_parquet
from tests.conftest import FakeEncoder

WORDS = ["rocket", "pasta", "goal", "orbit", "oven", "league", "moon", "sauce", "", "caf\u00e9", "\u6f22\u5b57"]


def _text(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(0, 4))).tolist()).strip()


def _check_vocab(v: Vocabulary, ref: list[str], rng: np.random.Generator) -> None:
    assert len(v) == len(ref) and v.ids() == ref
    for r, i in enumerate(ref):
        assert v.row(i) == r and v.id(r) == i and i in v
        assert v.row(i.encode().decode()) == r  # an equal str, not the same object
    for unknown in ("", "nope", f"{ref[0]}x" if ref else "x", *(f"u{j}" for j in rng.integers(0, 10**6, 20))):
        if unknown not in set(ref):
            assert v.row(unknown) is None and unknown not in v
    with pytest.raises(IndexError):
        v.id(len(ref))


def _slot_of(v: Vocabulary, key: str) -> int:
    return int(np.flatnonzero(v._slots == v.row(key))[0])


@pytest.mark.parametrize("seed", range(4))
def test_vocabulary_reads_like_a_list_and_dict_through_adds_and_rebuilds(seed):
    rng = np.random.default_rng(seed)
    ref: list[str] = []
    v = Vocabulary()
    for step in range(12):
        for _ in range(int(rng.integers(0, 300))):
            key = f"i{int(rng.integers(0, 2000))}" if rng.random() < 0.9 else f"x{_text(rng)}"
            row = v.add(key)
            if key not in ref:
                ref.append(key)
            assert row == ref.index(key)
        if step % 3 == 2:  # a snapshot round trip: the ids move into one Arrow array
            v = Vocabulary.from_arrow(pa.chunked_array([v.to_arrow()]))
        elif step % 3 == 1:  # or stay in the table with the tail folded into its array
            v.to_arrow()
        _check_vocab(v, ref, rng)
    assert len(v._slots) >= 2 * len(ref) and len(v._slots) & (len(v._slots) - 1) == 0


def test_vocabulary_handles_collisions_of_the_low_bits(monkeypatch):
    """With the real hash, a small table's ids share home slots; with a hash of 4 values every
    id collides and only the string comparison tells them apart."""
    ids = [f"id{j}" for j in range(200)]  # 512 slots: P(no two share a home) ~ e**-39
    v = Vocabulary(ids)
    home = {i: hash(i) & v._mask for i in ids}
    assert any(_slot_of(v, i) != home[i] for i in ids)  # some id was probed past its home slot
    _check_vocab(v, ids, np.random.default_rng(0))
    ids = ids[:12]
    monkeypatch.setattr(vocab_module, "_hash", lambda s: len(s) % 4 - 2)  # negative hashes too
    for build in (lambda: Vocabulary(ids * 2),
                  lambda: Vocabulary.from_arrow(pa.array(ids)),
                  lambda: Vocabulary.from_arrow(pa.chunked_array([ids[:5], ids[5:]], pa.large_string()))):
        weak = build()
        _check_vocab(weak, ids, np.random.default_rng(1))
        assert weak.row("i\ud8001") is None  # a lone surrogate with the weak hash of "id0".."id9"
        more = [f"more{j}" for j in range(40)]  # grows past 2x twice, re-placing the rows in bulk
        for i in more:
            weak.add(i)
        _check_vocab(weak, ids + more, np.random.default_rng(2))


@pytest.mark.parametrize("weak", [False, True])
def test_a_snapshot_with_a_repeated_or_null_id_is_refused(monkeypatch, weak):
    if weak:
        monkeypatch.setattr(vocab_module, "_hash", lambda s: 7)
    with pytest.raises(ValueError, match="unique.*'b'"):
        Vocabulary.from_arrow(pa.array(["a", "b", "c", "b"]))
    with pytest.raises(ValueError, match="null"):
        Vocabulary.from_arrow(pa.array(["a", None]))


def test_vocabulary_row_accepts_numpy_rows_and_odd_keys():
    v = Vocabulary.from_arrow(pa.array(["a", "b"]))
    v.add("c")
    assert v.id(np.int64(1)) == "b" and v.id(np.int32(2)) == "c" and v.id(-1) == "c"
    assert v.row(5) is None and 5 not in v and v.row(np.str_("b")) == 1
    with pytest.raises(TypeError):
        v.row(["a"])  # unhashable, as with a dict


@pytest.mark.parametrize("kind", ["string", "large_string", "chunked", "sliced", "nulls", "empty"])
def test_string_column_reads_like_a_list(kind):
    rng = np.random.default_rng(len(kind))
    ref = [_text(rng) for _ in range(200)]
    if kind == "nulls":
        ref[3] = ref[77] = None
    base = {"string": lambda: pa.array(ref, pa.string()),
            "large_string": lambda: pa.array(ref, pa.large_string()),
            "chunked": lambda: pa.chunked_array([ref[:50], ref[50:51], ref[51:]], pa.string()),
            "sliced": lambda: pa.array(["zz"] * 7 + ref + ["yy"])[7:207],
            "nulls": lambda: pa.array(ref, pa.string()),
            "empty": lambda: None}[kind]()
    if kind == "empty":
        ref = []
    col = StringColumn(base)
    for step in range(300):
        op = rng.random()
        if op < 0.4 or not ref:
            s = _text(rng)
            col.append(s)
            ref.append(s)
        elif op < 0.8:
            r = int(rng.integers(-len(ref), len(ref)))
            s = _text(rng) if rng.random() < 0.95 else None
            col[r] = s
            ref[r] = s
        elif op < 0.85:
            assert col.compact().equals(pa.array(ref, pa.string()))
        r = int(rng.integers(-len(ref), len(ref)))
        assert col[r] == ref[r] and col[np.int64(r)] == ref[r]
    assert len(col) == len(ref) and list(col) == ref and col.tolist() == ref and col[5:40:3] == ref[5:40:3]
    out = col.to_arrow()
    assert out.type == pa.string() and out.equals(pa.array(ref, pa.string()))
    with pytest.raises(IndexError):
        col[len(ref)]
    with pytest.raises(IndexError):
        col[-len(ref) - 1]


def test_string_column_takes_string_like_arrays_only():
    assert StringColumn(pa.array(["a", "b"]).dictionary_encode()).tolist() == ["a", "b"]
    assert StringColumn(pa.array(["a", None], pa.string_view())).tolist() == ["a", None]
    assert StringColumn(pa.nulls(2)).tolist() == [None, None]
    with pytest.raises(TypeError, match="must hold strings"):
        StringColumn(pa.array([1, 2]))
    with pytest.raises(TypeError, match="must hold strings"):
        Vocabulary.from_arrow(pa.array([b"a"]))


def _old_table(ids, titles, texts, cats, t: ItemTable) -> pa.Table:
    """The table as ItemTable.to_arrow wrote it from plain lists."""
    n = len(t)
    return pa.Table.from_arrays([
        pa.array(ids, pa.string()), pa.array(titles, pa.string()), pa.array(texts, pa.string()),
        pa.array([list(c) for c in cats], pa.list_(pa.string())), pa.array(t.added_at[:n]),
        pa.array(t.removed[:n]), pa.array(t.impressions[:n]), pa.array(t.clicks[:n]), pa.array(t.skips[:n]),
        pa.array(t.expires_at[:n], mask=t.expires_at[:n] == NEVER), pa.array(t.pop_clicks[:n]),
        pa.array(t.pop_t[:n]),
    ], schema=ITEM_SCHEMA)


@pytest.mark.parametrize("seed", range(3))
def test_item_table_matches_plain_lists_through_adds_upserts_removes_and_snapshots(tmp_path, seed):
    rng = np.random.default_rng(seed)
    dim = 4
    t = ItemTable(dim)
    ids: list[str] = []
    titles: list[str] = []
    texts: list[str] = []
    cats: list[tuple[str, ...]] = []
    removed: set[str] = set()
    for step in range(40):
        op = rng.random()
        if op < 0.5 or not ids:  # a new item
            key = f"item-{len(ids)}-{_text(rng)}".strip()
            item = Item(key, f"title {_text(rng)}", _text(rng), tuple(rng.choice(["a", "b", "c"], int(rng.integers(0, 3))).tolist()))
            t.append(item, rng.standard_normal(dim).astype(np.float32), now=step)
            ids.append(key), titles.append(item.title), texts.append(item.text), cats.append(item.categories)
            removed.discard(key)
        elif op < 0.75:  # an upsert (or a revival) of a row, of the snapshot or added since
            r = int(rng.integers(0, len(ids)))
            item = Item(ids[r], f"new {_text(rng)}", _text(rng), ("b",) if rng.random() < 0.5 else ())
            assert t.append(item, np.ones(dim, np.float32), now=step) == r
            titles[r], texts[r], cats[r] = item.title, item.text, item.categories
            removed.discard(ids[r])
        elif op < 0.9:  # a removal (the engine sets the flag)
            r = int(rng.integers(0, len(ids)))
            t.removed[r] = True
            removed.add(ids[r])
        else:  # save and reopen: a real Parquet round trip
            table = t.to_arrow()
            assert table.equals(_old_table(ids, titles, texts, cats, t))
            assert not (t.titles._tail or t.texts._changed or t.vocab._ids._tail)  # folded into Arrow
            path = tmp_path / f"items-{step}.parquet"
            write_parquet(path, table)
            t = ItemTable.from_arrow(read_parquet(path), t.vectors.copy())
        assert len(t) == len(t.vocab) == len(ids)
        for r, key in enumerate(ids):
            assert t.vocab.row(key) == r
            assert (t.live_row(key) is None) == (key in removed)
            assert t.item(r) == Item(key, titles[r], texts[r], cats[r])
        assert t.vocab.row("missing") is None and t.live_row("missing") is None
        for c in "abc":
            assert set(np.flatnonzero(t.category_mask([c])).tolist()) == {r for r in range(len(ids)) if c in cats[r]}
    assert t.to_arrow().equals(_old_table(ids, titles, texts, cats, t))


def test_engine_store_reads_the_same_items_after_saves_and_reopens(tmp_path):
    rng = np.random.default_rng(5)
    path = tmp_path / "store"
    eng = Engine.create(path, config=Config(seed=0, fsync=False), encoder=FakeEncoder())
    ref: dict[str, Item] = {}
    try:
        for rnd in range(5):
            batch = [Item(f"r{rnd}-{j}", f"title {rnd} {j} {_text(rng)}", f"text {j} {_text(rng)}",
                          ("odd",) if j % 2 else ()) for j in range(15)]
            eng.add_items(batch)
            ref.update((i.item_id, i) for i in batch)
            if ref and rnd:  # upserts of rows of earlier snapshots
                keys = rng.choice(sorted(ref), 4, replace=False).tolist()
                ups = [Item(k, f"changed {rnd}", f"changed text {k}", ("up",)) for k in keys]
                eng.add_items(ups, upsert=True)
                ref.update((i.item_id, i) for i in ups)
            gone = rng.choice(sorted(ref), 2, replace=False).tolist()
            eng.remove_items(gone)
            for k in gone:
                del ref[k]
            eng.record("user", sorted(ref)[0], "click")
            if rnd % 2:
                eng.close()
                eng = Engine.open(path, encoder=FakeEncoder())
            for k, item in ref.items():
                assert eng.get_item(k) == item
            for k in ("never-added", *gone):
                with pytest.raises(UnknownItemError):
                    eng.get_item(k)
    finally:
        eng.close()


@pytest.mark.parametrize("table", ["items", "users"])
def test_a_store_whose_table_repeats_an_id_does_not_open(tmp_path, table):
    """An intact file (its checksum matches) from a foreign writer that gives two rows one id:
    the store does not open, the error names the file, and the file is left as it was."""
    import json

    import pyarrow.parquet as pq

    from engine import CorruptStoreError
    from engine.storage.store import manifest_digest, sha256_file

    store = tmp_path / "s"
    with Engine.create(store, config=Config(seed=0, fsync=False), encoder=FakeEncoder()) as eng:
        eng.add_items([Item(f"i{j}", f"title {j}", f"rocket {j}") for j in range(3)])
        eng.record("ann", "i0")
        eng.record("bob", "i1")
        eng.save()
    manifest = json.loads((store / "manifest.json").read_text())
    name = next(n for n in manifest["files"] if n.startswith(f"{table}-"))
    key = "item_id" if table == "items" else "user_id"
    t = pq.read_table(store / name)
    ids = t.column(key).to_pylist()
    ids[-1] = ids[0]
    pq.write_table(t.set_column(t.column_names.index(key), key, pa.array(ids, pa.string())), store / name)
    manifest["files"][name] = {"bytes": (store / name).stat().st_size, "sha256": sha256_file(store / name)}
    manifest["checksum"] = manifest_digest(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))
    before = (store / name).read_bytes()
    with pytest.raises(CorruptStoreError, match=f"{name}.*ids must be unique"):
        Engine.open(store, encoder=FakeEncoder())
    assert (store / name).read_bytes() == before
