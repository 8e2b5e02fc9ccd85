"""Loading is cheap and leaves the process as it was: no torch until a model is trained or text
embedded, no evaluation package for the CLI, no change to torch's seed or to the environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import Config, Engine, Event, Item

from conftest import ROOT, FakeEncoder

#: What serving must not load: the model libraries, the evaluation, and the training modules.
HEAVY = ("torch", "sentence_transformers", "transformers", "sklearn", "engine.evaluation",
         "engine.training.towers", "engine.training.reranker")


#: What only `kindling serve` loads.
SERVICE = ("fastapi", "uvicorn", "starlette", "pydantic", "engine.http")


def heavy_modules_after(code: str, modules: tuple[str, ...] = HEAVY) -> list[str]:
    """The `modules` a fresh interpreter holds after running `code`."""
    probe = f"{code}\nimport sys, json\nprint(json.dumps([m for m in {modules!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def fitted_store(path: Path, rerank_epochs: int = 1) -> Path:
    items = [Item(f"it{i}", f"item {i}", f"topic{i % 4} word{i % 7}") for i in range(40)]
    events = [Event(f"u{u}", f"it{(u % 4) + 4 * j}", "click", 1.0, 100 * u + j) for u in range(24) for j in range(4)]
    with Engine.create(path, Config(proj_epochs=1, proj_dim=8, rerank_epochs=rerank_epochs, fsync=False),
                       encoder=FakeEncoder(dim=16)) as eng:
        eng.add_items(items)
        eng.import_events(events)
        assert eng.fit(events, progress=False)["reranker"] == bool(rerank_epochs)
    return path


def test_import_engine_loads_no_torch_model_library_or_evaluation() -> None:
    assert heavy_modules_after("import engine") == []


def test_import_engine_and_the_cli_help_load_no_web_framework() -> None:
    assert heavy_modules_after("import engine", SERVICE) == []
    run = "from engine.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n    assert not e.code"
    assert heavy_modules_after(run, SERVICE) == []


def test_cli_commands_that_embed_nothing_load_no_torch(tmp_path: Path) -> None:
    store = fitted_store(tmp_path / "s")
    run = "from engine.cli import main\ntry:\n    main({args!r})\nexcept SystemExit as e:\n    assert not e.code, e.code"
    for args in (["--help"], ["stats", str(store)], ["feedback", str(store), "--user", "u1", "--item", "it9"],
                 ["recommend", str(store), "--user", "u1", "-k", "5", "--json"]):
        assert heavy_modules_after(run.format(args=args)) == [], args


def test_the_rerankers_first_weights_are_drawn_without_torch() -> None:
    """In numpy (models/rerank.initial_weights); before, `Reranker.weights` imported the torch
    module of training/ to draw them, on the serving path (Ranker.prepare)."""
    run = ("from engine.models.rerank import N_INPUTS, Reranker\n"
           "w = Reranker(16, 0.01, 64, 8, seed=3).weights\nassert w['mlp.0.weight'].shape == (16, N_INPUTS)")
    assert heavy_modules_after(run) == []


def test_a_tower_without_a_trained_reranker_is_served_without_torch(tmp_path: Path) -> None:
    """A store fit with rerank_epochs=0 (a trained tower, the reranker's first weights) serves and
    learns online with no torch loaded."""
    store = fitted_store(tmp_path / "s", rerank_epochs=0)
    run = (f"from engine import Engine\nfrom conftest import FakeEncoder\n"
           f"eng = Engine.open({str(store)!r}, encoder=FakeEncoder(dim=16))\n"
           f"assert eng._core.state.ranker.trained and not eng._core.state.ranker.reranker.trained\n"
           f"assert len(eng.recommend('u1', k=5)) == 5\neng.record('u1', 'it3')\neng.close()")
    assert heavy_modules_after(f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\n{run}") == []


def test_opening_and_fitting_leave_torchs_random_state_alone(tmp_path: Path) -> None:
    store = fitted_store(tmp_path / "s")
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    with Engine.open(store, encoder=FakeEncoder(dim=16)) as eng:
        eng.recommend("u1", k=5)
        eng.record("u1", "it3")
    assert torch.equal(torch.get_rng_state(), state)
    fitted_store(tmp_path / "again")  # create, import and fit: training draws from a fork
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.model
def test_loading_the_model_leaves_the_environment_as_it_was() -> None:
    import sentence_transformers  # noqa: F401 - its own imports set variables (scikit-learn's KMP_*)

    from engine.text.encoder import Encoder

    before = dict(os.environ)
    Encoder(show_progress=False).encode(["a film about robots"])
    assert dict(os.environ) == before
