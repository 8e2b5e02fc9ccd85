"""Tuning the language model on co-clicks in `fit` (Config.tune_steps): the pairs, the store's
tuned model (saved, verified, loaded offline, used for every later item), and no leak."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine import Config, CorruptStoreError, Engine, Event, InvalidInputError, Item
from engine.evaluation.datasets import EventTable
from engine.evaluation.splits import item_cold_split
from engine.text.catalog import item_text, read_events, read_items
from engine.text.encoder import Encoder
from engine.training.encoder_tuning import _batches, co_click_pairs
from engine.training.fit import click_histories, training_users
from engine.storage.records import EventRecord

from conftest import FakeEncoder, small_catalog

pytestmark = pytest.mark.model


def test_pairs_are_clicks_close_in_time_of_one_user():
    pairs = co_click_pairs([np.array([1, 2, 3, 7]), np.array([3, 1, 1]), np.array([5])], window=2)
    assert pairs.tolist() == [[1, 2], [1, 3], [2, 3], [2, 7], [3, 7]]
    assert co_click_pairs([], window=2).shape == (0, 2)


def test_a_batch_never_holds_an_item_twice():
    pairs = co_click_pairs([np.arange(40), np.arange(40)[::-1]], window=3)
    for batch in _batches(pairs, steps=30, batch=8, rng=np.random.default_rng(0)):
        items = [r for pair in batch for r in pair]
        assert len(batch) == 8 and len(items) == len(set(items))


def test_cold_items_of_a_split_are_in_no_pair(tmp_path):
    """The pairs come from the events `fit` is given only: the store's own clicks on an item-cold
    split's cold items (imported before the fit) never make a pair."""
    catalog = small_catalog()
    rng = np.random.default_rng(3)
    n_users, per_user = 30, 6
    user = np.repeat(np.arange(n_users), per_user)
    item = np.concatenate([rng.choice(len(catalog), per_user, replace=False) for _ in range(n_users)])
    ts = np.arange(len(user), dtype=np.int64) + 1_000
    split = item_cold_split(EventTable(user, item, ts, np.ones(len(user))), np.random.default_rng(0))
    cold = {catalog[int(r)].item_id for r in split.cold_items}
    assert cold, "the split must hold cold items for the test to mean anything"
    every = [Event(f"u{u}", catalog[int(i)].item_id, "click", 1.0, int(t)) for u, i, t in zip(user, item, ts)]
    train = [Event(f"u{u}", catalog[int(i)].item_id, "click", 1.0, int(t))
             for u, i, t in zip(split.train.user, split.train.item, split.train.timestamp)]
    with Engine.create(tmp_path / "s", encoder=FakeEncoder()) as eng:
        eng.add_items(catalog)
        eng.import_events(every)  # the store holds the cold items' clicks too
        state = eng._core.state
        recs = [EventRecord(e.user_id, e.item_id, e.event, e.value, int(e.timestamp)) for e in train]
        pairs = co_click_pairs(click_histories(training_users(state, recs).states, state.items))
        assert len(pairs)
        paired = {state.items.item(int(r)).item_id for r in np.unique(pairs)}
        assert not paired & cold
        assert paired <= {e.item_id for e in train}


@pytest.fixture(scope="module")
def tuned_store(tmp_path_factory, ml_slice, real_encoder):
    """A store of the MovieLens slice fit with tune_steps=4: (path, fit summary)."""
    path = tmp_path_factory.mktemp("tuned") / "store"
    config = Config(tune_steps=4, proj_epochs=1, rerank_epochs=2)
    events = read_events(ml_slice)
    with Engine.create(path, config=config, encoder=real_encoder) as eng:
        eng.ingest(read_items(ml_slice), progress=False)
        summary = eng.fit(events, progress=False)
    return path, summary


def test_fit_tunes_saves_and_embeds_with_the_tuned_model(tuned_store, ml_slice, real_encoder):
    path, summary = tuned_store
    assert summary["encoder_tuned"] and summary["encoder_steps"] == 4 and summary["encoder_pairs"] >= 128
    manifest = json.loads((path / "manifest.json").read_text())
    tuned = manifest["model"]["tuned"]
    folder = path / tuned
    assert manifest["format_version"] == 3
    assert (folder / "model.safetensors").is_file()
    assert f"{tuned}/model.safetensors" in manifest["files"]
    assert not [p for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")]
    items = read_items(ml_slice)
    texts = [item_text(it) for it in items[:20]]
    tuned_vecs = Encoder(str(folder), show_progress=False).encode(texts)
    base_vecs = real_encoder.encode(texts)
    assert np.abs(tuned_vecs - base_vecs).max() > 1e-5  # the steps changed the model
    with Engine.open(path) as eng:  # no encoder given: the store's tuned model is loaded
        assert Path(eng.encoder.model_path) == folder
        rows = [eng._core.state.items.live_row(it.item_id) for it in items[:20]]
        np.testing.assert_allclose(eng._core.state.items.vector_rows(np.array(rows)), tuned_vecs, atol=2e-5)
        new = Item("new-1", "A quiet documentary about lighthouse keepers", "", ("Documentary",))
        eng.add_items([new])
        got = eng._core.state.items.vector_rows(np.array([eng._core.state.items.live_row("new-1")]))[0]
        want = Encoder(str(folder), show_progress=False).encode([item_text(new)])[0]
        np.testing.assert_allclose(got, want, atol=2e-5)
        assert eng.recommend("user-never-seen", k=5, history=["1"])


def test_an_encoder_given_to_open_of_the_base_model_is_replaced(tuned_store, real_encoder, tmp_path):
    import shutil

    path = tmp_path / "copy"
    shutil.copytree(tuned_store[0], path)
    with Engine.open(path, encoder=real_encoder) as eng:
        assert eng.encoder is not real_encoder
        assert Path(eng.encoder.model_path).parent == path


def test_a_refit_tunes_a_new_folder_and_the_old_one_goes(tuned_store, ml_slice, tmp_path):
    import shutil

    path = tmp_path / "copy"
    shutil.copytree(tuned_store[0], path)
    before = json.loads((path / "manifest.json").read_text())["model"]["tuned"]
    with Engine.open(path) as eng:
        eng.fit(read_events(ml_slice)[:1500], progress=False)
    after = json.loads((path / "manifest.json").read_text())["model"]["tuned"]
    assert after != before and (path / after).is_dir() and not (path / before).exists()


def test_a_damaged_tuned_model_is_refused(tuned_store, tmp_path):
    import shutil

    path = tmp_path / "copy"
    shutil.copytree(tuned_store[0], path)
    tuned = json.loads((path / "manifest.json").read_text())["model"]["tuned"]
    weights = path / tuned / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x40
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match="checksum"):
        Engine.open(path)


def test_tuning_needs_a_sentence_transformers_encoder(tmp_path, ml_slice):
    with Engine.create(tmp_path / "s", config=Config(tune_steps=2), encoder=FakeEncoder()) as eng:
        eng.add_items(small_catalog())
        before = json.loads((tmp_path / "s" / "manifest.json").read_text())["generation"]
        with pytest.raises(InvalidInputError, match="tune_steps"):
            eng.fit([Event("u", small_catalog()[0].item_id, "click")], progress=False)
        assert json.loads((tmp_path / "s" / "manifest.json").read_text())["generation"] == before


def test_onnx_int8_export_of_the_tuned_model_agrees(tuned_store, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    folder = tuned_store[0] / json.loads((tuned_store[0] / "manifest.json").read_text())["model"]["tuned"]
    texts = ["Toy Story (1995) Animation Children Comedy", "a quiet film about a lighthouse keeper",
             "Heat (1995) Crime Thriller", "an animated movie for kids about toys that come alive"]
    ref = Encoder(str(folder), show_progress=False).encode(texts)
    got = Encoder(str(folder), show_progress=False, backend="onnx-int8", cache_dir=tmp_path).encode(texts)
    assert ((ref * got).sum(1) >= 0.99).all()


def test_cli_init_sets_the_tuning_steps(tmp_path):
    from click.testing import CliRunner

    from engine.cli import main

    out = CliRunner().invoke(main, ["init", str(tmp_path / "s"), "--tune-steps", "40"])
    assert out.exit_code == 0, out.output
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["config"]["tune_steps"] == 40
    out = CliRunner().invoke(main, ["init", str(tmp_path / "t"), "--tune-steps", "-1"])
    assert out.exit_code == 2 and "tune-steps" in out.output
