"""External string ids <-> dense int64 rows. Rows are never reused, so they stay stable."""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import InvalidInputError

MAX_ID_LENGTH = 512


def check_id(value: object, what: str = "id") -> str:
    """Return `value` if it is a valid external id, else raise naming the rule.

    The rule: a non-empty str of at most 512 characters with no NUL, no lone surrogate and no
    leading or trailing whitespace. Ids are compared exactly as given: NFC and NFD spellings are
    different ids.
    """
    if not isinstance(value, str):
        raise InvalidInputError(f"{what} must be a string; got {type(value).__name__}")
    if not value:
        raise InvalidInputError(f"{what} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidInputError(f"{what} must be at most {MAX_ID_LENGTH} characters; got {len(value)}")
    if "\x00" in value:
        raise InvalidInputError(f"{what} must not contain NUL characters; got {value!r}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInputError(f"{what} must be valid Unicode (no lone surrogate code points, as "
                                    f"undecodable bytes become); got {value!r}") from None
    if value != value.strip():
        raise InvalidInputError(f"{what} must not start or end with whitespace; got {value!r}")
    return value


class Vocabulary:
    """Append-only mapping between external ids and rows 0..n-1."""

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._ids: list[str] = []
        self._rows: dict[str, int] = {}
        for i in ids:
            self.add(i)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def add(self, key: str) -> int:
        """The row of `key`, appending it when new."""
        row = self._rows.get(key)
        if row is None:
            row = len(self._ids)
            self._rows[key] = row
            self._ids.append(key)
        return row

    def row(self, key: str) -> int | None:
        return self._rows.get(key)

    def id(self, row: int) -> str:
        return self._ids[row]

    def ids(self) -> list[str]:
        return list(self._ids)
