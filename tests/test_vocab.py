"""The id vocabulary: external string ids <-> dense rows, stable and append-only."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import InvalidInputError
from engine.state.vocab import Vocabulary
from engine.types import MAX_ID_LENGTH, check_id

valid_ids = st.text(min_size=1, max_size=40).filter(lambda s: s == s.strip() and "\x00" not in s)


@given(st.lists(valid_ids, max_size=60))
def test_round_trip_ids_rows_ids(ids):
    vocab = Vocabulary(ids)
    unique = list(dict.fromkeys(ids))
    assert len(vocab) == len(unique)
    assert vocab.ids() == unique
    for i in unique:
        row = vocab.row(i)
        assert vocab.id(row) == i
        assert i in vocab
    assert sorted(vocab.row(i) for i in unique) == list(range(len(unique)))


@given(st.lists(valid_ids, max_size=30), st.lists(valid_ids, max_size=30))
def test_rows_never_move_when_more_ids_arrive(first, more):
    vocab = Vocabulary(first)
    before = {i: vocab.row(i) for i in first}
    for i in more:
        vocab.add(i)
    assert {i: vocab.row(i) for i in first} == before
    assert vocab.ids() == list(dict.fromkeys(first + more))


@given(valid_ids)
def test_check_id_accepts_valid(value):
    assert check_id(value) == value


@pytest.mark.parametrize("bad, rule", [
    ("", "must not be empty"),
    (" padded", "whitespace"),
    ("tab\t", "whitespace"),
    ("nul\x00", "NUL"),
    ("x" * (MAX_ID_LENGTH + 1), "at most"),
    (42, "must be a string"),
    (None, "must be a string"),
])
def test_check_id_rejects_with_the_rule(bad, rule):
    with pytest.raises(InvalidInputError, match=rule):
        check_id(bad, "item_id")


def test_unknown_id_has_no_row():
    vocab = Vocabulary(["a"])
    assert vocab.row("b") is None and "b" not in vocab
    with pytest.raises(IndexError):
        vocab.id(5)


def test_nfc_and_nfd_spellings_are_different_ids():
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    vocab = Vocabulary([nfc, nfd])
    assert vocab.row(nfc) != vocab.row(nfd)
