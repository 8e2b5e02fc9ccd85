"""Reading and validating item and event tables; ingestion is all or nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine import Engine, InvalidInputError, Item
from engine.text.catalog import clean_text, item_text, read_events, read_items, validate_items

ROWS = [
    {"item_id": "a", "title": "Alpha", "text": "first item", "categories": ["x", "y"]},
    {"item_id": "b", "title": "Beta", "text": "", "categories": []},
    {"item_id": "c", "title": "Gamma", "text": "third", "categories": ["z"]},
]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    cols = list(rows[0])
    lines = [",".join(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            v = "|".join(v) if isinstance(v, list) else str(v)
            cells.append('"' + v.replace('"', '""') + '"')
        lines.append(",".join(cells))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


WRITERS = {"parquet": write_parquet, "csv": write_csv, "jsonl": write_jsonl}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_read_items_each_format(tmp_path, fmt):
    path = WRITERS[fmt](tmp_path / f"items.{fmt}", ROWS)
    items = read_items(path)
    assert [i.item_id for i in items] == ["a", "b", "c"]
    assert items[0] == Item("a", "Alpha", "first item", ("x", "y"))
    assert items[1].text == "" and items[1].categories == ()


def test_read_items_from_dataset_directory(tmp_path):
    write_jsonl(tmp_path / "items.jsonl", ROWS)
    assert len(read_items(tmp_path)) == 3


def test_read_items_directory_without_table(tmp_path):
    with pytest.raises(InvalidInputError, match="no items.parquet"):
        read_items(tmp_path)


def test_bundled_slice_reads(ml_slice):
    items = read_items(ml_slice)
    assert len(items) == 300
    toy = next(i for i in items if i.item_id == "1")
    assert toy.title == "Toy Story (1995)" and "Animation" in toy.categories


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_missing_item_id_column(tmp_path, fmt):
    rows = [{k: v for k, v in r.items() if k != "item_id"} for r in ROWS]
    path = WRITERS[fmt](tmp_path / f"items.{fmt}", rows)
    with pytest.raises(InvalidInputError) as err:
        read_items(path)
    assert str(path) in str(err.value) and "item_id" in str(err.value) and "missing" in str(err.value)


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_empty_id_names_file_row_and_rule(tmp_path, fmt):
    rows = [dict(r) for r in ROWS]
    rows[1]["item_id"] = ""
    path = WRITERS[fmt](tmp_path / f"items.{fmt}", rows)
    with pytest.raises(InvalidInputError) as err:
        read_items(path)
    msg = str(err.value)
    assert str(path) in msg and "row 2" in msg and "empty" in msg


def test_null_id_in_parquet(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[2]["item_id"] = None
    path = write_parquet(tmp_path / "items.parquet", rows)
    with pytest.raises(InvalidInputError, match=r"row 3: item_id is empty"):
        read_items(path)


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_duplicate_id_names_both_rows(tmp_path, fmt):
    rows = [dict(r) for r in ROWS]
    rows[2]["item_id"] = "a"
    path = WRITERS[fmt](tmp_path / f"items.{fmt}", rows)
    with pytest.raises(InvalidInputError) as err:
        read_items(path)
    msg = str(err.value)
    assert str(path) in msg and "row 3" in msg and "duplicate" in msg and "row 1" in msg


def test_wrong_type_id_column_parquet(tmp_path):
    rows = [dict(r, item_id=n) for n, r in enumerate(ROWS, start=1)]
    path = write_parquet(tmp_path / "items.parquet", rows)
    with pytest.raises(InvalidInputError) as err:
        read_items(path)
    msg = str(err.value)
    assert str(path) in msg and "item_id" in msg and "string" in msg and "row 1" in msg


def test_wrong_type_id_in_one_jsonl_row(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[1]["item_id"] = 17
    path = write_jsonl(tmp_path / "items.jsonl", rows)
    with pytest.raises(InvalidInputError) as err:
        read_items(path)
    msg = str(err.value)
    assert str(path) in msg and "row 2" in msg and "string" in msg


def test_wrong_type_title_in_jsonl(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[0]["title"] = 3.5
    path = write_jsonl(tmp_path / "items.jsonl", rows)
    with pytest.raises(InvalidInputError) as err:
        read_items(path)
    assert str(path) in str(err.value) and "row 1" in str(err.value) and "title" in str(err.value)


def test_wrong_type_categories_in_jsonl(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[2]["categories"] = {"not": "a list"}
    path = write_jsonl(tmp_path / "items.jsonl", rows)
    with pytest.raises(InvalidInputError, match=r"row 3: categories"):
        read_items(path)


def test_invalid_json_line_is_named(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(InvalidInputError, match=r"line 2: not valid JSON"):
        read_items(path)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "items.xml"
    path.write_text("<items/>")
    with pytest.raises(InvalidInputError, match="unsupported file type"):
        read_items(path)


def test_validate_items_rejects_blank_title_and_long_text():
    with pytest.raises(InvalidInputError, match="row 1: title must be a non-empty"):
        validate_items([{"item_id": "x", "title": "  "}])
    with pytest.raises(InvalidInputError, match="text must be at most"):
        validate_items([Item("x", "X", "a" * 100_001)])
    with pytest.raises(InvalidInputError, match="must not start or end with whitespace"):
        validate_items([Item(" x", "X")])


def test_item_text_joins_title_categories_text():
    text = item_text(Item("1", "Toy Story", "Tags: pixar", ("Animation", "Children")))
    assert text == "Toy Story Categories: Animation, Children. Tags: pixar"
    assert item_text(Item("2", "Heat")) == "Heat"


def test_read_events_kinds_and_values(tmp_path):
    rows = [
        {"user_id": "u1", "item_id": "a", "timestamp": 10, "event": "rating", "value": 4.5},
        {"user_id": "u1", "item_id": "b", "timestamp": 11, "event": "rating", "value": 2.0},
        {"user_id": "u2", "item_id": "a", "timestamp": 12, "event": "skip", "value": 1.0},
    ]
    path = write_parquet(tmp_path / "events.parquet", rows)
    events = read_events(path, min_value=4.0)
    assert [e.event for e in events] == ["click", "skip", "skip"]
    assert events[0].timestamp == 10 and events[0].value == 4.5
    assert [e.event for e in read_events(path)] == ["click", "click", "skip"]


def test_read_events_rejects_nan_value(tmp_path):
    rows = [{"user_id": "u1", "item_id": "a", "timestamp": 10, "event": "click", "value": float("nan")}]
    path = write_parquet(tmp_path / "events.parquet", rows)
    with pytest.raises(InvalidInputError, match=r"row 1: value must be a finite number"):
        read_events(path)


def test_read_events_of_slice(ml_slice):
    events = read_events(ml_slice, min_value=4.0)
    assert len(events) == 3000
    assert {e.event for e in events} <= {"click", "skip"}


# ---- nothing half-ingested ----------------------------------------------------------------------

def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != "LOCK"}


def test_bad_row_in_ingest_file_leaves_store_unchanged(tmp_path, fake_encoder, catalog):
    store = tmp_path / "store"
    with Engine.create(store, encoder=fake_encoder) as eng:
        eng.ingest(catalog[:4], progress=False)
    before = _snapshot(store)
    rows = [{"item_id": f"new-{n}", "title": f"New {n}", "text": "fresh words"} for n in range(50)]
    rows[40]["title"] = ""
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with Engine.open(store, encoder=fake_encoder) as eng:
        with pytest.raises(InvalidInputError, match="row 41"):
            eng.ingest(read_items(path), progress=False)
        assert "new-0" not in eng and eng.stats()["live_items"] == 4
    assert _snapshot(store) == before


def test_ingest_of_ids_already_in_store_adds_nothing(tmp_path, fake_encoder, catalog):
    store = tmp_path / "store"
    with Engine.create(store, encoder=fake_encoder) as eng:
        eng.ingest(catalog[:4], progress=False)
        with pytest.raises(InvalidInputError, match="already in the store"):
            eng.ingest(catalog[2:8], progress=False)
        assert eng.stats()["live_items"] == 4 and catalog[5].item_id not in eng


def test_add_items_batch_with_bad_item_adds_nothing(engine):
    before = engine.stats()["live_items"]
    with pytest.raises(InvalidInputError, match="row 2"):
        engine.add_items([Item("ok-1", "Fine"), Item("", "No id")])
    assert "ok-1" not in engine and engine.stats()["live_items"] == before


def test_jsonl_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + b'{"item_id": "\xff\xfe", "title": "x"}\n')
    with pytest.raises(InvalidInputError, match=r"line 2: not UTF-8"):
        read_items(path)


def test_csv_that_is_not_utf8_is_refused_cleanly(tmp_path):
    path = tmp_path / "items.csv"
    path.write_bytes(b"item_id,title\na,\xff\xfe\n")
    with pytest.raises(InvalidInputError, match=str(path)):
        read_items(path)


@pytest.mark.parametrize("raw, clean", [
    ("Black.  <!-- .headerM {color:#000;font-size:24px;} .sub {font-weight: bold; } --> Next", "Black. Next"),
    ("<p>Hello <b>world</b></p><style>.a{b:c}</style> done", "Hello world done"),
    ("Max: 1amp;quot; Sheet, Tom &amp; Jerry &quot;x&quot;", 'Max: 1" Sheet, Tom & Jerry "x"'),
    ("uses <2W), AT&T and iPrint&Scan", "uses <2W), AT&T and iPrint&Scan"),
    ("templates. Br><br", "templates."),
    ("a set {of braces} stays,\n\t spaces   collapse", "a set {of braces} stays, spaces collapse"),
])
def test_clean_text_strips_markup_and_keeps_prose(raw, clean):
    assert clean_text(raw) == clean


def test_item_text_is_cleaned():
    item = Item("p1", "Pen <b>Set</b>", "Blue ink.<br/>Fine &amp; smooth.", ("Office",))
    assert item_text(item) == "Pen Set Categories: Office. Blue ink. Fine & smooth."
