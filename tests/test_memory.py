"""engine.memory: memory freed by a bulk step goes back to the OS."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from engine.memory import _libc

pytestmark = pytest.mark.skipif(_libc() is None, reason="needs glibc's malloc_trim (Linux)")

# Run apart: this process's heap holds whatever the other tests left.
CHILD = textwrap.dedent("""
    import ctypes, re
    from engine.memory import release_free_memory
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    def anon():
        return int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024
    big, small = [], []
    for _ in range(12000):  # 16 KB blocks (malloc's heap) with small ones between: freed, the
        p = libc.malloc(16 * 1024)  # heap cannot shrink from its top, so glibc keeps their pages
        ctypes.memset(p, 1, 16 * 1024)
        big.append(p)
        small.append(libc.malloc(32))
    for p in big:
        libc.free(p)
    held = anon()
    release_free_memory()
    print(held, anon())
""")


def test_release_free_memory_returns_freed_heap_pages_to_the_os() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, timeout=60)
    held, after = map(int, out.stdout.split())
    # 12,000 x 16 KB = 188 MB freed but held by malloc; measured: 223 -> 52 MB
    assert held - after > 120, (held, after)


GROW = textwrap.dedent("""
    import re
    import numpy as np
    from engine.vectors import grown
    def anon():
        return int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024
    a = np.ones((100_000, 128), np.float32)  # 51 MB
    before = anon()
    b = grown(a, len(a) + 1)
    b[len(a)] = 1.0
    print(len(b), anon() - before)
""")


def test_grown_room_is_not_resident_until_written() -> None:
    """A doubled array's new rows cost address space only: growing 51 MB of tower vectors by one
    row makes the 51 MB copy resident, not the 102 MB the doubled array spans (np.full wrote it all)."""
    out = subprocess.run([sys.executable, "-c", GROW], capture_output=True, text=True, check=True, timeout=60)
    rows, grew = map(int, out.stdout.split())
    assert rows == 200_000 and grew < 75, (rows, grew)
