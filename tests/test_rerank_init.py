"""The reranker's first weights are drawn in numpy (models/, what serving runs) and equal, bit for
bit, the torch module's own initialisation (training/), so stores drawn or fit before the move
rank the same and serving needs no torch to draw them."""

import numpy as np
import pytest
import torch

from engine.models.rerank import initial_weights, torch_uniform_stream, weight_shapes
from engine.training.reranker import RerankNet, to_numpy


@pytest.mark.parametrize("seed", [0, 1, 7, 12345, 2**31 - 1])
@pytest.mark.parametrize("hidden", [8, 32, 64])
def test_numpy_draw_equals_torch_module(seed, hidden):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        expected = to_numpy(RerankNet(hidden))
    got = initial_weights(hidden, seed)
    assert list(got) == list(weight_shapes(hidden))
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].dtype == np.float32 and got[name].shape == value.shape, name
        assert np.array_equal(got[name], value), name


@pytest.mark.parametrize("n", [1, 5, 1000])
def test_uniform_stream_equals_torch(n):
    draw = torch_uniform_stream(3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        first = torch.empty(n).uniform_(-0.25, 0.25).numpy()
        second = torch.empty(n).uniform_(-2.0, 2.0).numpy()
    assert np.array_equal(draw(n, 0.25), first)
    assert np.array_equal(draw(n, 2.0), second)  # the stream goes on where the first draw ended


def test_seeds_give_different_weights():
    a, b = initial_weights(16, 0), initial_weights(16, 1)
    assert not np.array_equal(a["mlp.0.weight"], b["mlp.0.weight"])
