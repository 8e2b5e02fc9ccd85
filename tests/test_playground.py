"""The playground at `GET /` in a real headless Chromium (Debian's `chromium`, driven by Playwright).

A person types a user and a profile, sees the list with its explanations, clicks an item and
watches the list change, then adds an item and finds it at once. `make test` installs chromium;
without it (or without Playwright) the test is skipped, saying which is missing.

`KINDLING_PLAYGROUND_SHOT=PATH` also saves a screenshot of the page after the click there (the one
in the README was made so).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from helpers.serving import Server, serve_copy  # noqa: E402

pytestmark = pytest.mark.model

KEY = "playground-key-0123456789"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ID = re.compile(r"\[([^\]]+)\]$")
#: Each step's wait (ms): the first profile embeds text in the server, which loads the model then.
WAIT_MS = 120_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, real_store_template: Path) -> Iterator[Server]:
    srv = serve_copy(tmp_path_factory.mktemp("playground"), real_store_template, KEY)
    yield srv
    srv.stop()
    assert "Traceback" not in srv.output(), srv.output()


@pytest.fixture(scope="module")
def page(server: Server):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    with sync_api.sync_playwright() as pw:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1000, "height": 900})
        pg.set_default_timeout(WAIT_MS)
        pg.goto(server.url + "/")
        yield pg
        browser.close()


def shown_ids(pg, list_id: str) -> list[str]:
    return [ID.search(t.strip()).group(1) for t in pg.locator(f"#{list_id} li .item").all_text_contents()]


def add_on_page(pg, key: str, item_id: str, title: str, text: str, categories: str) -> None:
    for field, value in (("key", key), ("new_id", item_id), ("new_title", title), ("new_text", text),
                         ("new_categories", categories)):
        pg.fill(f"#{field}", value)
    pg.click("#add")


def test_the_page_recommends_explains_and_a_click_changes_the_list(page, server: Server):
    assert page.title() and page.locator("#go").is_visible()
    page.fill("#key", KEY)
    page.fill("#user", "browser-user")
    page.fill("#profile", "I love animated films for children")
    page.fill("#k", "8")
    page.click("#go")
    page.wait_for_function("document.querySelectorAll('#list li').length === 8")
    first = shown_ids(page, "list")
    whys = page.locator("#list li .why").all_text_contents()
    assert len(set(first)) == 8 and all(w.strip() for w in whys), whys
    assert any(w.startswith(("near your profile", "popular", "new item")) for w in whys), whys

    clicked = first[0]
    page.locator("#list li .item").first.click()  # sends a click, then asks again
    page.wait_for_function(f"document.querySelector('#history').textContent.includes({clicked!r})")
    page.wait_for_function("document.querySelectorAll('#list li').length === 8")
    after = shown_ids(page, "list")
    assert clicked not in after and after != first
    assert "recorded click" in page.text_content("#msg")
    assert server.client.get("/users/browser-user").json()["history"] == [clicked]  # the server has it too
    shot = os.environ.get("KINDLING_PLAYGROUND_SHOT")
    if shot:
        page.screenshot(path=shot, full_page=True)


def test_an_item_added_on_the_page_is_found_at_once(page, server: Server):
    add_on_page(page, KEY, "pg-new-1", "Paws Across the Stars (2026)",
                "An animated space adventure for children: a puppy crew explores the galaxy.", "Animation, Children")
    page.wait_for_function("document.querySelectorAll('#similar li').length === 5")
    assert "found Paws Across the Stars (2026) [pg-new-1]" in page.text_content("#msg")
    assert "pg-new-1" not in shown_ids(page, "similar")  # its neighbours, not itself
    assert server.client.get("/items/pg-new-1").status_code == 200


def test_a_write_without_the_key_shows_the_rule_not_a_crash(page):
    add_on_page(page, "", "pg-new-2", "Nobody's Film", "Added without the API key.", "")
    page.wait_for_function("document.querySelector('#msg').className === 'err'")
    msg = page.text_content("#msg")
    assert msg.startswith("401") and "Bearer" in msg, msg
