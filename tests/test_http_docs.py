"""/docs and /redoc work offline: every script, style sheet and icon they load is served by the
service itself (fastapi-offline's files), none by a CDN."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from engine import Engine

from conftest import FakeEncoder, small_catalog

pytest.importorskip("fastapi")
pytest.importorskip("fastapi_offline")

ASSET = re.compile(r"""<(?:script|link)\b[^>]*?\b(?:src|href)\s*=\s*["']([^"']+)["']""", re.I)


@pytest.fixture
def client(tmp_path, fake_encoder: FakeEncoder) -> Iterator:
    from fastapi.testclient import TestClient

    from engine.http.app import create_app

    eng = Engine.create(tmp_path / "store", encoder=fake_encoder)
    eng.add_items(small_catalog())
    with TestClient(create_app(eng)) as c:
        yield c
    eng.close(save=False)


@pytest.mark.parametrize("page,kinds", [("/docs", {".js", ".css", ".png"}), ("/redoc", {".js", ".png"})])
def test_docs_pages_load_their_assets_from_this_server(client, page, kinds):
    resp = client.get(page)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    html = resp.text
    assert "http://" not in html and "https://" not in html, html  # no CDN, no validator badge
    urls = ASSET.findall(html)
    assert {u[u.rindex("."):] for u in urls} == kinds, urls
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 1000, (url, asset.status_code)
    assert client.get("/openapi.json").status_code == 200  # what both pages read


def test_swagger_ui_bundle_is_javascript_and_the_css_is_css(client):
    js = client.get("/docs-assets/swagger-ui-bundle.js")
    assert "javascript" in js.headers["content-type"] and b"SwaggerUIBundle" in js.content
    css = client.get("/docs-assets/swagger-ui.css")
    assert css.headers["content-type"].startswith("text/css") and b".swagger-ui" in css.content


def test_the_assets_are_not_part_of_the_api(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith(("/docs", "/redoc"))]


@pytest.mark.parametrize("key", [None, "k" * 16])
def test_the_schema_names_the_key_only_where_the_server_checks_one(tmp_path, fake_encoder, key):
    from engine.http.app import create_app

    with Engine.create(tmp_path / "store", encoder=fake_encoder) as eng:
        paths = create_app(eng, api_key=key).openapi()["paths"]
    events, recommend = paths["/events"]["post"], paths["/recommend"]["post"]
    if key is None:
        assert "security" not in events and "security" not in recommend and "401" not in events["responses"]
    else:
        assert events["security"] == [{"HTTPBearer": []}] and "401" in events["responses"]
        assert recommend["security"] == [{}, {"HTTPBearer": []}]  # only a request with a profile
