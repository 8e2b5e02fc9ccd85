"""The real sentence-transformers encoder (loaded once per session) and model-folder checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine import InvalidInputError, ModelLoadError
from engine.text.encoder import Encoder, check_model_dir, default_model_path

pytestmark = pytest.mark.model


def test_shape_dtype_unit_norm(real_encoder):
    vecs = real_encoder.encode(["a film about robots", "a cooking show", "Toy Story (1995)"])
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert real_encoder.dim == 384


def test_meaning_is_captured(real_encoder):
    a, b, c = real_encoder.encode(["an animated movie for kids", "a cartoon film for children",
                                   "a tax law handbook"])
    assert a @ b > a @ c + 0.2


def test_empty_list_gives_empty_array(real_encoder):
    out = real_encoder.encode([])
    assert out.shape == (0, 384) and out.dtype == np.float32


@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
def test_empty_text_rejected(real_encoder, bad):
    with pytest.raises(InvalidInputError, match="#1 is empty"):
        real_encoder.encode(["fine", bad])


def test_non_string_rejected(real_encoder):
    with pytest.raises(InvalidInputError):
        real_encoder.encode([None])  # type: ignore[list-item]
    with pytest.raises(InvalidInputError, match="wrap it in a list"):
        real_encoder.encode("one text, not a list")  # type: ignore[arg-type]


def test_long_text_truncated_without_error(real_encoder):
    long = "robots and spaceships " * 20_000  # far past the model's 256-token limit
    head = "robots and spaceships " * 200
    v_long, v_head = real_encoder.encode([long, head])
    assert np.isfinite(v_long).all() and abs(np.linalg.norm(v_long) - 1.0) < 1e-5
    assert v_long @ v_head > 0.99  # only the first tokens count


def test_cache_returns_identical_vectors(real_encoder):
    texts = ["a quiet film about a lighthouse keeper", "another, different text"]
    first = real_encoder.encode(texts)
    again = real_encoder.encode(texts[::-1])
    np.testing.assert_array_equal(first, again[::-1])
    first[0, :] = 0.0  # the caller's array is theirs: mutating it must not poison the cache
    np.testing.assert_array_equal(real_encoder.encode(texts[:1])[0], again[1])


def test_cache_is_used(real_encoder, monkeypatch):
    text = "a text that is encoded exactly once"
    real_encoder.encode([text])

    def boom(*args, **kwargs):
        raise AssertionError("the model was called for a cached text")

    monkeypatch.setattr(real_encoder._model, "encode", boom)
    assert real_encoder.encode([text]).shape == (1, 384)


def test_batch_and_single_agree(real_encoder, monkeypatch):
    monkeypatch.setattr(real_encoder, "_cache_size", 0)  # compare fresh encodings, not the cache
    texts = ["first batch text about trains", "second one on gardening in spring",
             "third about medieval castles"]
    batch = real_encoder.encode(texts)
    single = np.vstack([real_encoder.encode([t]) for t in texts])
    np.testing.assert_allclose(batch, single, atol=1e-5)


def test_model_with_auto_map_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for f in Path(default_model_path()).iterdir():  # the real model, by links, with its config edited
        (model / f.name).symlink_to(f)
    (model / "config.json").unlink()
    config = json.loads((Path(default_model_path()) / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="auto_map"):
        Encoder(str(model))


def test_pickle_only_weights_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelLoadError, match="safetensors"):
        check_model_dir(str(tmp_path))


def test_missing_path_gives_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not a directory"):
        Encoder(str(tmp_path / "no-such-model"))


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(ModelLoadError, match="cannot load"):
        Encoder(str(tmp_path))
