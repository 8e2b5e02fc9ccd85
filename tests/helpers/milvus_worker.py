"""Subprocess worker for tests/test_milvus_store.py: a Milvus-backed store killed mid-mutation.

    python milvus_worker.py before-add STORE     add an item; print "between" once the add is in the
                                                 log and before Milvus is touched, then hang
    python milvus_worker.py before-remove STORE  the same for a removal
    python milvus_worker.py after-add STORE      add an item (log and collection), print "applied", hang

The parent SIGKILLs the process on the line. Milvus Lite runs inside this process, so the kill
takes the collection's server down with it, as a crash would.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conftest import FakeEncoder  # noqa: E402

from engine import Engine, Item  # noqa: E402
from engine.serving.milvus import MilvusIndex  # noqa: E402

NEW = Item("space-new", "Space New", "rocket orbit moon launch", ("space",))


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def hang(*_: object, **__: object) -> None:
    say("between")
    time.sleep(120)


def main(mode: str, store: str) -> None:
    eng = Engine.open(store, encoder=FakeEncoder())
    if mode == "before-add":
        MilvusIndex.add = MilvusIndex.upsert = hang  # the record is logged; the collection waits
        eng.add_items([NEW])
    elif mode == "before-remove":
        MilvusIndex.remove = hang
        eng.remove_items(["food-1"])
    elif mode == "after-add":
        eng.add_items([NEW])
        say("applied")
        time.sleep(120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
