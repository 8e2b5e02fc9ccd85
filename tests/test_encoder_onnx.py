"""The opt-in ONNX Runtime encoder backends, exported locally from the bundled model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine import Config, Engine, Item, ModelLoadError
from engine.text.encoder import Encoder
from engine.text.encoder_onnx import check_mean_pooled

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytestmark = pytest.mark.model

TEXTS = ["Toy Story (1995) Animation Children Comedy", "a quiet film about a lighthouse keeper",
         "Heat (1995) Tags: bank robbery, Al Pacino", "a cooking show", "an animated movie for kids",
         "Seven (a.k.a. Se7en) (1995) Mystery Thriller Two detectives hunt a serial killer."]


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.mark.parametrize("backend, floor", [("onnx", 0.9999), ("onnx-int8", 0.98)])
def test_backend_agrees_with_torch(real_encoder, onnx_cache, backend, floor):
    enc = Encoder(backend=backend, show_progress=False, cache_dir=onnx_cache)
    ref, vecs = real_encoder.encode(TEXTS), enc.encode(TEXTS)
    assert vecs.shape == (len(TEXTS), 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert ((vecs * ref).sum(1) >= floor).all()
    assert enc.encode([]).shape == (0, 384)


def test_fp32_batch_equals_single_calls(onnx_cache):
    enc = Encoder(backend="onnx", show_progress=False, cache_dir=onnx_cache, cache_size=0, batch_size=4)
    batch = enc.encode(TEXTS)
    singles = np.vstack([enc.encode([t]) for t in TEXTS])
    np.testing.assert_allclose(batch, singles, atol=2e-5)


def test_int8_is_repeatable_and_close_across_batchings(onnx_cache):
    # Dynamic int8 quantisation scales activations per batch, so a text's vector moves slightly with
    # the texts batched beside it; the same call gives the same bytes, and batchings agree closely.
    enc = Encoder(backend="onnx-int8", show_progress=False, cache_dir=onnx_cache, cache_size=0, batch_size=4)
    batch = enc.encode(TEXTS)
    np.testing.assert_array_equal(batch, enc.encode(TEXTS))
    singles = np.vstack([enc.encode([t]) for t in TEXTS])
    assert ((batch * singles).sum(1) >= 0.98).all()


def test_export_is_cached(onnx_cache):
    Encoder(backend="onnx-int8", show_progress=False, cache_dir=onnx_cache)
    files = sorted(onnx_cache.rglob("*.onnx"))
    stamps = [f.stat().st_mtime_ns for f in files]
    Encoder(backend="onnx-int8", show_progress=False, cache_dir=onnx_cache)
    assert sorted(onnx_cache.rglob("*.onnx")) == files and [f.stat().st_mtime_ns for f in files] == stamps
    assert not list(onnx_cache.rglob("*.tmp.onnx"))


def test_unknown_backend_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        Encoder(backend="tensorflow")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="encoder_backend must be one of"):
        Config(encoder_backend="tensorflow")  # type: ignore[arg-type]


def test_non_mean_pooled_model_refused(tmp_path):
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    with pytest.raises(ModelLoadError, match="mean Pooling"):
        check_mean_pooled(tmp_path)


def test_engine_uses_the_configured_backend(tmp_path, monkeypatch, onnx_cache):
    monkeypatch.setenv("KINDLING_CACHE", str(onnx_cache))
    items = [Item("toy", "Toy Story (1995)", "Tags: pixar, fun", ("Animation", "Children")),
             Item("heat", "Heat (1995)", "Tags: bank robbery", ("Action", "Crime"))]
    with Engine.create(tmp_path / "s", Config(encoder_backend="onnx-int8")) as eng:
        eng.add_items(items)
        assert eng.recommend("a", k=1, profile="cartoons for children")[0].item_id == "toy"
    eng = Engine.open(tmp_path / "s")
    try:
        assert eng.config.encoder_backend == "onnx-int8" and eng.encoder.backend == "onnx-int8"
    finally:
        eng.close()
