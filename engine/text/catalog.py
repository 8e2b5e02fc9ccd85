"""Reading and validating item and event tables; the text an item is embedded from."""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..errors import InvalidInputError
from ..types import EVENT_KINDS, Event, Item, check_id

MAX_TITLE_CHARS = 2_000
MAX_TEXT_CHARS = 100_000
MAX_CATEGORIES = 100
MAX_CATEGORY_CHARS = 200
#: The largest `expires_at` accepted (unix seconds; the year 10,000).
MAX_EXPIRES_AT = 253_402_300_800
SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")


#: Markup that seller text carries over from web pages: comments (which often wrap CSS), style and
#: script elements, bare CSS rules (".class {prop: value; ...}") and any remaining tag.
_MARKUP = re.compile(
    r"<!--.*?(?:-->|$)|<(style|script)\b.*?(?:</\1\s*>|$)|(?:[#.][\w-]+[\w\s,.#:>-]{0,80})?\{[^{}]*:[^{}]*\}|<[^<>]{0,500}>"
    r"|<[a-z/][^<>]*$|\bbr\s*/?>",
    re.IGNORECASE | re.DOTALL)
#: Entities whose leading "&" was lost or doubly escaped ("amp;quot;", "&amp;nbsp;").
_BROKEN_ENTITY = re.compile(r"&?(?:amp;)+(?=#?\w+;)|(?<![&\w])amp;", re.IGNORECASE)


def clean_text(text: str) -> str:
    """Seller or editor text as a person reads it: markup, CSS and entities gone, spaces collapsed.

    Used for what is embedded (`item_text`) and for bag-of-words baselines alike, so leftover web
    markup weighs in neither.
    """
    if "<" in text or "{" in text:
        text = _MARKUP.sub(" ", text)
    if "&" in text or "amp;" in text:
        text = html.unescape(_BROKEN_ENTITY.sub("&", text))
    return " ".join(text.split())


def item_text(item: Item) -> str:
    """The string the language model embeds for `item`: title, categories, then free text
    (cleaned by `clean_text`)."""
    parts = [clean_text(item.title)]
    if item.categories:
        parts.append("Categories: " + ", ".join(item.categories) + ".")
    text = clean_text(item.text)
    if text:
        parts.append(text)
    return " ".join(parts)


def check_text(value: object, what: str, max_chars: int = MAX_TEXT_CHARS, empty_ok: bool = False) -> str:
    """Return `value` if it is storable text, else raise InvalidInputError naming the rule.

    The rule: a str of at most `max_chars` characters, not blank unless `empty_ok`, with no NUL and
    no lone surrogate (what undecodable bytes become; it cannot be written as UTF-8).
    """
    if not isinstance(value, str):
        raise InvalidInputError(f"{what} must be a string; got {type(value).__name__}")
    if not empty_ok and not value.strip():
        raise InvalidInputError(f"{what} must be a non-empty string")
    if len(value) > max_chars:
        raise InvalidInputError(f"{what} must be at most {max_chars:,} characters; got {len(value):,}")
    if "\x00" in value:
        raise InvalidInputError(f"{what} must not contain NUL characters")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInputError(f"{what} must be valid Unicode (no lone surrogate code points)") from None
    return value


def validate_item(item: Item, where: str = "item") -> Item:
    """Check one item against the catalog rules; raise InvalidInputError naming the rule."""
    check_id(item.item_id, f"{where}: item_id")
    check_text(item.title, f"{where}: title", MAX_TITLE_CHARS)
    check_text(item.text, f"{where}: text", MAX_TEXT_CHARS, empty_ok=True)
    if len(item.categories) > MAX_CATEGORIES:
        raise InvalidInputError(f"{where}: at most {MAX_CATEGORIES} categories")
    for c in item.categories:
        check_text(c, f"{where}: each category", MAX_CATEGORY_CHARS)
    e = item.expires_at
    if e is not None and (isinstance(e, bool) or not isinstance(e, int) or not 0 <= e <= MAX_EXPIRES_AT):
        raise InvalidInputError(f"{where}: expires_at must be None or an int of unix seconds between 0 and "
                                f"{MAX_EXPIRES_AT}; got {e!r}")
    return item


def validate_items(items: Iterable[Item | dict[str, Any]], source: str = "items") -> list[Item]:
    """Coerce and check a batch; duplicate ids within the batch are rejected (rows are 1-based)."""
    out: list[Item] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(items, start=1):
        where = f"{source}, row {n}"
        item = _coerce_item(raw, where)
        validate_item(item, where)
        if item.item_id in seen:
            raise InvalidInputError(
                f"{where}: duplicate item_id {item.item_id!r} (first at row {seen[item.item_id]}); "
                "ids must be unique within a batch")
        seen[item.item_id] = n
        out.append(item)
    return out


def _coerce_item(raw: Item | dict[str, Any], where: str) -> Item:
    if isinstance(raw, Item):
        return raw
    if not isinstance(raw, dict):
        raise InvalidInputError(f"{where}: an item must be an Item or a dict; got {type(raw).__name__}")
    if "item_id" not in raw:
        raise InvalidInputError(f"{where}: missing required field 'item_id'")
    cats = raw.get("categories") or ()
    if isinstance(cats, str):
        cats = [c for c in cats.split("|") if c.strip()]
    if not isinstance(cats, (list, tuple)):
        raise InvalidInputError(f"{where}: categories must be a list of strings")
    text = raw.get("text")
    text = "" if text is None or (isinstance(text, float) and math.isnan(text)) else text
    title = raw.get("title")
    expires = raw.get("expires_at")
    expires = None if isinstance(expires, float) and math.isnan(expires) else expires
    return Item(item_id=raw["item_id"], title=title if title is not None else "", text=text,
                categories=tuple(cats), expires_at=expires)


def table_files(root: Path, stem: str) -> list[Path]:
    """The files DIR/stem.{parquet,csv,jsonl,json} that exist, in SUFFIXES order."""
    return [root / f"{stem}{suffix}" for suffix in SUFFIXES if (root / f"{stem}{suffix}").is_file()]


def _table_path(path: str | Path, stem: str) -> Path:
    """`path` itself if it is a file, else DIR/stem.{parquet,csv,jsonl}."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        found = table_files(p, stem)
        if found:
            return found[0]
        raise InvalidInputError(f"{p}: no {stem}.parquet, {stem}.csv or {stem}.jsonl in this directory")
    raise InvalidInputError(f"{p}: no such file or directory")


def read_table(path: str | Path, string_columns: Sequence[str] = ()) -> pa.Table:
    """Read a Parquet, CSV or JSONL file into an Arrow table (named columns kept as strings)."""
    p = Path(path)
    suffix = p.suffix.lower()
    try:
        if suffix == ".parquet":
            return pq.read_table(p)
        if suffix == ".csv":
            opts = pacsv.ConvertOptions(column_types={c: pa.string() for c in string_columns},
                                        strings_can_be_null=False)
            return pacsv.read_csv(p, convert_options=opts)
        if suffix in (".jsonl", ".json"):
            return pa.Table.from_pylist(_read_jsonl(p))
    except (pa.ArrowException, OSError) as exc:
        raise InvalidInputError(f"{p}: cannot be read as {suffix[1:]}: {exc}") from exc
    raise InvalidInputError(f"{p}: unsupported file type {suffix!r}; use .parquet, .csv or .jsonl")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidInputError(f"{path}, line {n}: not UTF-8 text ({exc.reason})") from exc
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{path}, line {n}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise InvalidInputError(f"{path}, line {n}: each line must be a JSON object")
            rows.append(obj)
    return rows


def _require_columns(table: pa.Table, path: Path, required: Sequence[str]) -> None:
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise InvalidInputError(
            f"{path}: missing required column(s) {', '.join(missing)}; "
            f"found {', '.join(table.column_names) or 'none'}")


def _require_string(table: pa.Table, path: Path, column: str) -> None:
    typ = table.schema.field(column).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_null(typ)):
        values = table.column(column).to_pylist()
        n = next((r for r, v in enumerate(values, start=1) if v is not None), 1)
        raise InvalidInputError(f"{path}, row {n}: column {column!r} must hold strings; "
                                f"got {typ} ({values[n - 1]!r})")


def read_items(path: str | Path) -> list[Item]:
    """Items from a file, or from DIR/items.{parquet,csv,jsonl}, checked row by row.

    Raises:
        InvalidInputError: naming the file, the row (1-based) and the rule broken.
    """
    p = _table_path(path, "items")
    rows = _read_rows(p, ("item_id", "title", "text", "categories"), required=("item_id", "title"))
    for n, row in enumerate(rows, start=1):
        if row.get("item_id") is None:
            raise InvalidInputError(f"{p}, row {n}: item_id is empty")
    return validate_items(rows, source=str(p))


def _read_rows(p: Path, string_columns: Sequence[str], required: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of a table file as dicts, after the column checks.

    JSONL rows stay plain dicts (no Arrow type inference), so a value of the wrong type is
    reported by the per-row checks with its row number instead of failing the whole file.
    """
    if p.suffix.lower() in (".jsonl", ".json"):
        rows = _read_jsonl(p)
        names = list(dict.fromkeys(k for row in rows for k in row))
        missing = [c for c in required if c not in names]
        if missing:
            raise InvalidInputError(f"{p}: missing required column(s) {', '.join(missing)}; "
                                    f"found {', '.join(names) or 'none'}")
        return rows
    table = read_table(p, string_columns=string_columns)
    _require_columns(table, p, required)
    for col in required:
        _require_string(table, p, col)
    return table.to_pylist()


def read_events(path: str | Path, min_value: float | None = None) -> list[Event]:
    """Events from a file or DIR/events.*; rows of unknown kind become clicks or skips by value.

    Kinds click/skip/impression are kept. Any other kind (rating, review, ...) becomes a click
    when `min_value` is None or value >= min_value, else a skip.
    """
    p = _table_path(path, "events")
    rows = _read_rows(p, ("user_id", "item_id", "event"), required=("user_id", "item_id"))
    out = []
    for n, row in enumerate(rows, start=1):
        where = f"{p}, row {n}"
        value = row.get("value")
        value = 1.0 if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            raise InvalidInputError(f"{where}: value must be a finite number; got {value!r}")
        kind = row.get("event") or "click"
        if not isinstance(kind, str):
            raise InvalidInputError(f"{where}: event must be a string; got {kind!r}")
        if kind not in EVENT_KINDS:
            kind = "click" if min_value is None or float(value) >= min_value else "skip"
        ts = row.get("timestamp")
        if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int)):
            raise InvalidInputError(f"{where}: timestamp must be an integer (unix seconds); got {ts!r}")
        out.append(Event(check_id(row.get("user_id"), f"{where}: user_id"),
                         check_id(row.get("item_id"), f"{where}: item_id"), kind, float(value), ts))
    return out
