"""F2 on a real full disk: run inside a private mount namespace with a small tmpfs at MNT.

    python rel_enospc.py MNT OUT

Builds a store on MNT, fills MNT to the last page, then checks that record, save, ingest and
add_items fail with a clear error, change nothing and leave no temp files; frees a little space
(enough for log records, too little for a snapshot) and checks again; finally frees everything,
reopens, and copies the store to OUT. Prints one JSON line: failures (empty when all held), which
operations were refused, and the acknowledged events per user for the parent to verify.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rel_fakes import FakeEncoder, generation_files, items, temp_files  # noqa: E402

from engine import Engine, StoreError  # noqa: E402

failures: list[str] = []
refused = {"record": False, "save": False, "ingest": False, "add": False}
acked: dict[str, list[str]] = {}


def expect_full(what: str, fn) -> bool:
    try:
        fn()
    except StoreError as exc:
        if "No space left" not in str(exc):
            failures.append(f"{what}: error does not say why: {exc}")
        refused[what] = True
        return False
    except Exception as exc:  # noqa: BLE001
        failures.append(f"{what}: {type(exc).__name__}: {exc}")
        return False
    return True


def record(eng: Engine, user: str, item: str) -> bool:
    ok = expect_full("record", lambda: eng.record(user, item))
    if ok:
        acked.setdefault(user, []).append(item)
    return ok


def fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            os.write(fd, b"\xff" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_unchanged(eng: Engine, files: list[str], where: str) -> None:
    if temp_files(eng.path):
        failures.append(f"{where}: temp files left: {temp_files(eng.path)}")
    if generation_files(eng.path) != files:
        failures.append(f"{where}: files changed: {generation_files(eng.path)} vs {files}")
    for user, hist in acked.items():
        if eng.user_history(user) != hist:
            failures.append(f"{where}: history of {user} is {eng.user_history(user)}, acknowledged {hist}")
    if "full0" in eng:
        failures.append(f"{where}: a refused item is in the store")


def main(mnt: Path, out: Path) -> None:
    store, filler = mnt / "store", mnt / "filler"
    eng = Engine.create(store, encoder=FakeEncoder())
    eng.add_items(items("m", 100))
    eng.save()
    fill(filler)
    for n in range(400):  # the log's last page fills up, then appends fail
        if not record(eng, "alice", f"m{n % 100}"):
            break
    files = generation_files(store)
    check_unchanged(eng, files, "full disk, record")
    expect_full("save", eng.save)
    check_unchanged(eng, files, "full disk, save")
    expect_full("ingest", lambda: eng.ingest(items("full", 10), progress=False))
    check_unchanged(eng, files, "full disk, ingest")
    expect_full("add", lambda: eng.add_items(items("full", 3)))
    check_unchanged(eng, files, "full disk, add_items")
    os.truncate(filler, filler.stat().st_size - 3 * 4096)  # room for events, not for a snapshot
    for n in range(5):
        if not record(eng, "bob", f"m{n}"):
            failures.append("12 KiB free, yet a record was refused")
    files = generation_files(store)
    expect_full("save", eng.save)
    check_unchanged(eng, files, "nearly full disk, save")
    filler.unlink()
    record(eng, "bob", "m50")
    eng.save()
    eng.close()
    eng = Engine.open(store, encoder=FakeEncoder())
    check_unchanged(eng, generation_files(store), "after reopen")
    eng.close()
    shutil.copytree(store, out / "store", ignore=shutil.ignore_patterns("LOCK"))
    print(json.dumps({"failures": failures, "refused": refused, "acked": acked}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
