"""`similar_items` with a Filter and `exclude`: the library, `kindling similar` and
GET /items/{item_id}/similar, over a real FAISS index and the fake encoder."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import engine.runtime.encoders as encoders_module
from engine import Config, Engine, Filter, InvalidInputError, UnknownItemError
from engine.cli import main

from conftest import FakeEncoder, small_catalog


def ids(recs) -> list[str]:
    return [r.item_id for r in recs]


@pytest.fixture
def flat(tmp_path: Path, fake_encoder: FakeEncoder) -> Iterator[Engine]:
    """The small catalog on an exact (flat) FAISS index, where a filtered search must equal the
    full ranking restricted to the items that qualify."""
    eng = Engine.create(tmp_path / "flat", Config(index="flat"), encoder=fake_encoder)
    eng.add_items(small_catalog())
    yield eng
    eng.close(save=False)


# ---- the library -----------------------------------------------------------------------------
RULES = [
    Filter(categories_any=["food"]),
    Filter(categories_any=["food", "ball"], deny=["ball-2"]),
    Filter(categories_none=["space"]),
    Filter(allow=["space-3", "food-1", "ball-0", "nope"]),
    Filter(categories_any=["space", "ball"], categories_none=["ball"], deny=["space-1"]),
]


@pytest.mark.parametrize("flt", RULES, ids=[repr(f) for f in RULES])
def test_filtered_list_is_the_full_ranking_restricted_to_the_matching_items(flat, flt):
    full = flat.similar_items("space-0", k=11)
    matching = {i for i in ids(full) if _matches(flat, i, flt)}
    want = [r for r in full if r.item_id in matching]
    assert flat.similar_items("space-0", k=11, filter=flt) == want
    assert flat.similar_items("space-0", k=2, filter=flt) == want[:2]  # k whenever k qualify


def _matches(eng: Engine, item_id: str, flt: Filter) -> bool:
    cats = set(eng.get_item(item_id).categories)
    return ((not flt.categories_any or bool(cats & set(flt.categories_any)))
            and not cats & set(flt.categories_none)
            and (flt.allow is None or item_id in flt.allow) and item_id not in flt.deny)


def test_exclude_leaves_out_those_ids_and_combines_with_the_filter(flat):
    full = ids(flat.similar_items("food-0", k=11))
    assert ids(flat.similar_items("food-0", k=11, exclude=["food-1", "nope", "food-1"])) \
        == [i for i in full if i != "food-1"]
    got = ids(flat.similar_items("food-0", k=11, filter=Filter(categories_any=["food"]), exclude={"food-2"}))
    assert got == [i for i in full if i in ("food-1", "food-3")]


def test_no_filter_and_an_empty_filter_change_nothing(flat):
    plain = flat.similar_items("ball-0", k=6)
    assert flat.similar_items("ball-0", k=6, filter=None, exclude=None) == plain
    assert flat.similar_items("ball-0", k=6, filter=Filter(), exclude=[]) == plain


def test_the_item_itself_stays_out_even_when_allowed(flat):
    assert ids(flat.similar_items("space-0", k=5, filter=Filter(allow=["space-0"]))) == []


BAD = [
    ({"filter": {"categories_any": ["food"]}}, "filter must be an engine.Filter or None; got dict"),
    ({"exclude": "food-1"}, "exclude must be a list of item ids, not str"),
    ({"exclude": 3}, "exclude must be a list of item ids, not int"),
    ({"exclude": ["food-1", " food-2"]}, "exclude: each item id must not start or end with whitespace"),
    ({"exclude": [7]}, "exclude: each item id must be a string; got int"),
]


@pytest.mark.parametrize("kwargs,rule", BAD, ids=[r for _, r in BAD])
def test_bad_filter_or_exclude_is_refused_naming_the_rule(flat, kwargs, rule):
    with pytest.raises(InvalidInputError, match="^" + rule.replace("(", r"\(").replace(")", r"\)")):
        flat.similar_items("space-0", k=3, **kwargs)
    with pytest.raises(InvalidInputError, match="^" + rule.replace("(", r"\(").replace(")", r"\)")):
        flat.recommend("someone", k=3, **kwargs)  # the same check (a bare string was read as its characters)


def test_a_bad_filter_rule_is_refused_where_the_filter_is_made():
    with pytest.raises(InvalidInputError, match="Filter.categories_any must be a list of strings"):
        Filter(categories_any="food")


def test_unknown_item_is_still_a_key_error_with_a_filter(flat):
    with pytest.raises(UnknownItemError):
        flat.similar_items("nope", filter=Filter(categories_any=["food"]))


# ---- the CLI ---------------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A store the CLI opens with the fake encoder in place of the model."""
    enc = FakeEncoder()
    monkeypatch.setattr(encoders_module, "Encoder", lambda *args, **kwargs: enc)
    path = tmp_path / "cli-store"
    with Engine.create(path, encoder=enc) as eng:
        eng.add_items(small_catalog())
    return path


def run(*args: str):
    return CliRunner().invoke(main, ["similar", *args])


def test_cli_similar_takes_the_category_options_of_recommend(store):
    with Engine.open(store, read_only=True) as eng:
        want = ids(eng.similar_items("space-0", k=11, filter=Filter(categories_any=["food", "ball"],
                                                                  categories_none=["ball"])))
    result = run(str(store), "space-0", "-k", "11", "--category", "food", "--category", "ball",
                 "--not-category", "ball", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["item"] == "space-0" and [r["item_id"] for r in data["items"]] == want
    assert sorted(want) == ["food-0", "food-1", "food-2", "food-3"]
    result = run(str(store), "space-0", "-k", "3", "--category", "nothing-has-this")
    assert result.exit_code == 0 and result.stdout.strip() == "(no items)"


def test_cli_bad_category_is_one_line_naming_the_rule(store):
    result = run(str(store), "space-0", "--category", " ")
    assert result.exit_code == 1 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.startswith("Error: Filter.categories_any: each category")
    assert len(result.stderr.strip().splitlines()) == 1


# ---- HTTP ------------------------------------------------------------------------------------
@pytest.fixture
def client(flat: Engine):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from engine.http.app import create_app

    with TestClient(create_app(flat)) as c:
        yield c


def test_http_similar_takes_the_filter_as_query_parameters(client, flat):
    want = ids(flat.similar_items("space-0", k=4, filter=Filter(categories_any=["food", "ball"], deny=["ball-2"]),
                                    exclude=["food-0"]))
    resp = client.get("/items/space-0/similar", params={"k": 4, "categories": ["food", "ball"], "deny": "ball-2",
                                                        "exclude": ["food-0"]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["item"] == "space-0" and ids_of(resp) == want and len(want) == 4
    resp = client.get("/items/space-0/similar?not_categories=space&not_categories=ball&k=11")
    assert sorted(ids_of(resp)) == ["food-0", "food-1", "food-2", "food-3"]
    resp = client.get("/items/space-0/similar?allow=food-1&allow=space-2&k=5")
    assert ids_of(resp) == ids(flat.similar_items("space-0", k=5, filter=Filter(allow=["food-1", "space-2"])))


def ids_of(resp) -> list[str]:
    assert resp.status_code == 200, resp.text
    return [r["item_id"] for r in resp.json()["items"]]


HTTP_BAD = [
    ("/items/space-0/similar?allow=", 400, "Filter.allow: each item id must not be empty"),
    ("/items/space-0/similar?categories=%20", 400, "Filter.categories_any: each category"),
    ("/items/space-0/similar?exclude=%20x", 400, "exclude: each item id must not start or end with whitespace"),
    ("/items/space-0/similar?category=food", 422, "query.category: Extra inputs are not permitted"),
    ("/items/space-0/similar?k=many", 422, "query.k"),
    ("/items/space-0/similar?k=0", 400, "k must be an integer between 1 and 10000"),
    ("/items/nope/similar?categories=food", 404, "unknown item id 'nope'"),
]


@pytest.mark.parametrize("url,status,rule", HTTP_BAD, ids=[u.split("?")[-1] for u, _, _ in HTTP_BAD])
def test_http_bad_filter_is_a_4xx_naming_the_rule(client, url, status, rule):
    resp = client.get(url)
    assert resp.status_code == status, resp.text
    assert rule in resp.json()["detail"]


def test_openapi_describes_the_query_parameters(client):
    params = client.get("/openapi.json").json()["paths"]["/items/{item_id}/similar"]["get"]["parameters"]
    query = {p["name"]: p for p in params if p["in"] == "query"}
    assert set(query) == {"k", "categories", "not_categories", "allow", "deny", "exclude"}
    assert query["categories"]["schema"]["type"] == "array"
    assert all(p.get("description") for p in query.values())
