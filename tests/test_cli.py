"""The `kindling` CLI through click's CliRunner, with the fake encoder in place of the model."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import engine.runtime.encoders as encoders_module
from engine import Config, Engine
from engine.cli import main

from conftest import SLICE_MUST_HAVE, FakeEncoder

ITEMS = [
    {"item_id": "m1", "title": "Rocket Moon", "text": "rocket launch orbit moon", "categories": ["space"]},
    {"item_id": "m2", "title": "Mars Rover", "text": "mars rover space rocket", "categories": ["space"]},
    {"item_id": "m3", "title": "Pasta Night", "text": "pasta recipe tomato sauce", "categories": ["food"]},
    {"item_id": "m4", "title": "Bread Oven", "text": "bread baking oven recipe", "categories": ["food"]},
    {"item_id": "m5", "title": "Cup Final", "text": "football cup final goal", "categories": ["ball"]},
]


@pytest.fixture(autouse=True)
def fake_model(monkeypatch):
    """Every Engine the CLI opens gets the same fake encoder instead of loading the real model."""
    enc = FakeEncoder()
    monkeypatch.setattr(encoders_module, "Encoder", lambda *args, **kwargs: enc)
    return enc


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def items_file(tmp_path) -> Path:
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ITEMS), encoding="utf-8")
    return path


@pytest.fixture
def store(tmp_path, runner, items_file) -> Path:
    path = tmp_path / "store"
    ok(runner, "init", str(path))
    ok(runner, "ingest", str(path), str(items_file), "--quiet")
    return path


def ok(runner: CliRunner, *args: str):
    result = runner.invoke(main, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def user_error(runner: CliRunner, *args: str, code: int = 1) -> str:
    """Run a command that must fail cleanly: the exit code, one line on stderr, no traceback."""
    result = runner.invoke(main, list(args))
    assert result.exit_code == code, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # not an escaped exception
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    if code == 1:
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("Error: ")
    return result.stderr


def test_help_lists_every_command(runner):
    out = ok(runner, "--help").output
    for cmd in ("init", "ingest", "add-item", "remove-item", "recommend", "similar", "feedback",
                "stats", "fit", "demo"):
        assert cmd in out
    assert "kindling" in ok(runner, "--version").output


def test_init_creates_a_store(runner, tmp_path):
    out = ok(runner, "init", str(tmp_path / "s")).output
    assert "created store" in out and (tmp_path / "s" / "manifest.json").is_file()
    stats = json.loads(ok(runner, "stats", str(tmp_path / "s"), "--json").stdout)
    assert stats["live_items"] == 0 and stats["index"] is None


def test_init_with_model_and_index_options(runner, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    ok(runner, "init", str(tmp_path / "s"), "--model", str(model), "--index", "hnsw")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["config"]["model_path"] == str(model.resolve())
    assert manifest["config"]["index"] == "hnsw"


def test_init_errors(runner, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    assert "not an empty directory" in user_error(runner, "init", str(tmp_path / "busy"))
    user_error(runner, "init", str(tmp_path / "s"), "--model", str(tmp_path / "nope"), code=2)
    (tmp_path / "plain").write_text("a file")
    user_error(runner, "init", str(tmp_path / "plain" / "store"))  # OSError, not a traceback


def test_ingest(runner, store):
    stats = json.loads(ok(runner, "stats", str(store), "--json").stdout)
    assert stats["live_items"] == 5 and stats["index"]["vectors"] == 5


def test_ingest_bad_file_names_the_row_and_changes_nothing(runner, store, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"item_id": "n1", "title": "New"}) + "\n"
                   + json.dumps({"item_id": "", "title": "No id"}) + "\n", encoding="utf-8")
    err = user_error(runner, "ingest", str(store), str(bad))
    assert "bad.jsonl, row 2" in err and "empty" in err
    assert json.loads(ok(runner, "stats", str(store), "--json").stdout)["live_items"] == 5
    assert "already in the store" in user_error(runner, "ingest", str(store), str(store.parent / "items.jsonl"))
    user_error(runner, "ingest", str(store), str(tmp_path / "missing.jsonl"), code=2)
    user_error(runner, "ingest", str(tmp_path / "no-store"), str(bad))


def test_add_item_and_remove_item(runner, store):
    out = ok(runner, "add-item", str(store), "--id", "m6", "--title", "Moon Base",
             "--text", "moon orbit station", "--category", "space", "--category", "scifi").output
    assert "added m6" in out
    sims = json.loads(ok(runner, "similar", str(store), "m1", "--json").stdout)
    assert "m6" in [i["item_id"] for i in sims["items"]]
    assert "already in the store" in user_error(runner, "add-item", str(store), "--id", "m6", "--title", "X")
    ok(runner, "add-item", str(store), "--id", "m6", "--title", "Moon Base II", "--upsert")
    assert "removed 2 item(s)" in ok(runner, "remove-item", str(store), "m6", "m5").output
    sims = json.loads(ok(runner, "similar", str(store), "m1", "-k", "10", "--json").stdout)
    assert {i["item_id"] for i in sims["items"]} == {"m2", "m3", "m4"}
    assert "unknown item" in user_error(runner, "remove-item", str(store), "m6")
    user_error(runner, "remove-item", str(store), code=2)  # at least one id
    user_error(runner, "add-item", str(store), "--id", "x", code=2)  # --title is required


def test_recommend_json_shape(runner, store):
    data = json.loads(ok(runner, "recommend", str(store), "--user", "u1", "-k", "3",
                         "--profile", "pasta tomato recipe", "--json").stdout)
    assert set(data) == {"user", "items"} and data["user"] == "u1"
    assert len(data["items"]) == 3
    for entry in data["items"]:
        assert set(entry) == {"item_id", "score", "title"}
        assert isinstance(entry["score"], float) and isinstance(entry["title"], str)
    assert data["items"][0]["item_id"] == "m3"
    # the profile was saved with the user: a later call without it gives the same list
    again = json.loads(ok(runner, "recommend", str(store), "--user", "u1", "-k", "3", "--json").stdout)
    assert again == data


def test_recommend_text_output(runner, store):
    out = ok(runner, "recommend", str(store), "--user", "u2", "-k", "2", "--profile", "football goal").stdout
    lines = out.rstrip("\n").splitlines()
    assert len(lines) == 2 and lines[0].startswith("  1. Cup Final  [m5]")


def test_recommend_errors(runner, store, tmp_path):
    assert "no such store" in user_error(runner, "recommend", str(tmp_path / "nope"), "--user", "u")
    user_error(runner, "recommend", str(store), "--user", "u", "-k", "0", code=2)
    user_error(runner, "recommend", str(store), code=2)  # --user is required
    assert "user_id" in user_error(runner, "recommend", str(store), "--user", " padded")


def test_similar_json_shape(runner, store):
    data = json.loads(ok(runner, "similar", str(store), "m1", "-k", "2", "--json").stdout)
    assert set(data) == {"item", "items"} and data["item"] == "m1"
    assert [set(e) for e in data["items"]] == [{"item_id", "score", "title"}] * 2
    assert data["items"][0]["item_id"] == "m2"
    assert "unknown item id 'zz'" in user_error(runner, "similar", str(store), "zz")


def test_feedback_moves_the_list_and_is_kept(runner, store):
    before = json.loads(ok(runner, "recommend", str(store), "--user", "u", "-k", "5", "--json").stdout)
    out = ok(runner, "feedback", str(store), "--user", "u", "--item", "m5").output
    assert "recorded click of u on m5" in out
    ok(runner, "feedback", str(store), "--user", "u", "--item", "m1", "--event", "skip")
    ok(runner, "feedback", str(store), "--user", "u", "--item", "m2", "--event", "impression")
    after = json.loads(ok(runner, "recommend", str(store), "--user", "u", "-k", "5", "--json").stdout)
    assert after != before
    assert {"m5", "m1"}.isdisjoint(i["item_id"] for i in after["items"])  # seen ones are left out
    stats = json.loads(ok(runner, "stats", str(store), "--json").stdout)
    assert stats["events"] == 3 and stats["pending_log_records"] >= 3
    with Engine.open(store, encoder=FakeEncoder(), read_only=True) as eng:
        assert eng.user_history("u") == ["m5"]


def test_feedback_errors(runner, store):
    assert "unknown item id 'nope'" in user_error(runner, "feedback", str(store), "--user", "u", "--item", "nope")
    user_error(runner, "feedback", str(store), "--user", "u", "--item", "m1", "--event", "like", code=2)
    assert json.loads(ok(runner, "stats", str(store), "--json").stdout)["events"] == 0


def test_feedback_refused_while_another_writer_holds_the_store(runner, store):
    eng = Engine.open(store, encoder=FakeEncoder())
    try:
        assert "locked for writing" in user_error(runner, "feedback", str(store), "--user", "u", "--item", "m1")
    finally:
        eng.close()


def test_stats_text_and_json(runner, store):
    out = ok(runner, "stats", str(store)).stdout
    assert "5 live, 0 removed" in out and "index      flat" in out
    data = json.loads(ok(runner, "stats", str(store), "--json").stdout)
    for key in ("path", "generation", "items", "live_items", "users", "removed_items", "events", "index",
                "model", "trained", "pending_log_records"):
        assert key in data
    assert "not a Kindling store" in user_error(runner, "stats", str(store.parent))


def test_fit(runner, tmp_path, items_file):
    store = tmp_path / "fit-store"
    with Engine.create(store, Config(proj_epochs=1, rerank_epochs=1), encoder=FakeEncoder()) as eng:
        eng.ingest([dict(r) for r in ITEMS], progress=False)
    events = tmp_path / "events.jsonl"
    rows = [{"user_id": f"u{n % 4}", "item_id": ITEMS[n % 5]["item_id"], "timestamp": 1000 + n,
             "event": "rating", "value": 4.0 + (n % 2)} for n in range(20)]
    events.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    summary = json.loads(ok(runner, "fit", str(store), str(events), "--min-value", "4", "--quiet",
                            "--json").stdout)
    assert summary["events"] == 20
    stats = json.loads(ok(runner, "stats", str(store), "--json").stdout)
    assert stats["users"] == 0 and stats["events"] == 0  # fit trains; it brings no history in
    counts = json.loads(ok(runner, "import", str(store), str(events), "--min-value", "4", "--json").stdout)
    assert counts == {"imported": 20, "already_held": 0, "unknown_item": 0}
    stats = json.loads(ok(runner, "stats", str(store), "--json").stdout)
    assert stats["users"] == 4 and stats["events"] == 20
    bad = tmp_path / "bad-events.jsonl"
    bad.write_text(json.dumps({"user_id": "u", "item_id": "m1", "value": "high"}) + "\n")
    assert "row 1: value must be a finite number" in user_error(runner, "fit", str(store), str(bad))


def test_demo_on_a_tiny_dataset(runner, tmp_path, ml_slice):
    data = tmp_path / "tiny"
    data.mkdir()
    items = pq.read_table(ml_slice / "items.parquet")
    keep = sorted(set(items.column("item_id").to_pylist()[:30]) | set(SLICE_MUST_HAVE))
    pq.write_table(items.filter(pc.is_in(items.column("item_id"), value_set=pa.array(keep))),
                   data / "items.parquet")
    events = pq.read_table(ml_slice / "events.parquet")
    events = events.filter(pc.is_in(events.column("item_id"), value_set=pa.array(keep))).slice(0, 60)
    pq.write_table(events, data / "events.parquet")
    store = tmp_path / "demo-store"
    out = ok(runner, "demo", "--store", str(store), "--data", str(data)).stdout
    assert "Building a store" in out and f"Embedded and indexed {len(keep)} items" in out
    assert "Imported and learned from 60 logged events" in out
    assert "Top 10 from the profile alone" in out
    assert "clicks three movies: Toy Story (1995); Finding Nemo (2003); Monsters, Inc. (2001)" in out
    assert "Top 10 after three clicks" in out
    assert "A new movie arrives" in out and "its nearest movies" in out
    assert "same top 10 as before the restart: yes" in out
    again = ok(runner, "demo", "--store", str(store), "--data", str(data)).stdout
    assert "Reusing the store" in again and "Embedded and indexed" not in again
    assert "same top 10 as before the restart: yes" in again


def test_demo_without_data_dir(runner, tmp_path):
    user_error(runner, "demo", "--store", str(tmp_path / "s"), "--data", str(tmp_path / "nope"), code=2)


def test_recommend_with_categories_diversity_and_explain(runner, store):
    args = ["recommend", str(store), "--user", "u", "-k", "5", "--json"]
    ok(runner, "feedback", str(store), "--user", "u", "--item", "m1")
    data = json.loads(ok(runner, *args, "--category", "food", "--category", "ball").stdout)
    assert sorted(e["item_id"] for e in data["items"]) == ["m3", "m4", "m5"]  # k=5, only 3 qualify
    data = json.loads(ok(runner, *args, "--not-category", "food").stdout)
    assert sorted(e["item_id"] for e in data["items"]) == ["m2", "m5"]
    plain = json.loads(ok(runner, *args).stdout)
    assert json.loads(ok(runner, *args, "--diversity", "0").stdout) == plain
    assert json.loads(ok(runner, *args, "--diversity", "0.8").stdout)["items"][0] == plain["items"][0]
    told = json.loads(ok(runner, *args, "--explain").stdout)
    assert [{k: v for k, v in e.items() if k != "because"} for e in told["items"]] == plain["items"]
    first = told["items"][0]["because"]
    assert first == {"reason": "clicked", "value": first["value"], "item_id": "m1"} and first["value"] > 0.3
    text = ok(runner, "recommend", str(store), "--user", "u", "-k", "1", "--explain").stdout
    assert "(near your click on m1 (cosine " in text


def test_recommend_for_a_users_file(runner, store, tmp_path):
    ok(runner, "feedback", str(store), "--user", "a", "--item", "m3")
    ok(runner, "feedback", str(store), "--user", "b", "--item", "m5", "--event", "dislike")
    users = tmp_path / "users.txt"
    users.write_text("a\n\n  b \nnew\n", encoding="utf-8")
    data = json.loads(ok(runner, "recommend", str(store), "--users-file", str(users), "-k", "3", "--json").stdout)
    assert [d["user"] for d in data["users"]] == ["a", "b", "new"]
    for entry in data["users"]:
        single = json.loads(ok(runner, "recommend", str(store), "--user", entry["user"], "-k", "3", "--json").stdout)
        assert entry == single
    assert "m5" not in [e["item_id"] for e in data["users"][1]["items"]]
    text = ok(runner, "recommend", str(store), "--users-file", str(users), "-k", "1").stdout.splitlines()
    assert text[0] == "a:" and text[2] == "b:" and text[4] == "new:"


def test_recommend_new_options_check_their_input(runner, store, tmp_path):
    base = ["recommend", str(store)]
    users = tmp_path / "users.txt"
    users.write_text("a\n", encoding="utf-8")
    assert "exactly one of --user and --users-file" in user_error(
        runner, *base, "--user", "a", "--users-file", str(users), code=2)
    assert "--profile goes with --user" in user_error(
        runner, *base, "--users-file", str(users), "--profile", "x", code=2)
    assert "--diversity" in user_error(runner, *base, "--user", "a", "--diversity", "1.5", code=2)
    assert "Filter.categories_any: each category must be a non-empty string" in user_error(
        runner, *base, "--user", "a", "--category", " ")
    users.write_bytes(b"a\n\xff\n")
    assert "not UTF-8" in user_error(runner, *base, "--users-file", str(users), code=2)
    users.write_text("a\n" + "x" * 600 + "\n", encoding="utf-8")
    assert "each user_id must be at most 512 characters" in user_error(runner, *base, "--users-file", str(users))


def test_recommend_help_names_every_option(runner):
    out = ok(runner, "recommend", "--help").output
    for opt in ("--user", "--users-file", "--category", "--not-category", "--diversity", "--explain", "--json",
                "--profile"):
        assert opt in out
    assert "dislike" in ok(runner, "feedback", "--help").output
