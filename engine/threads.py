"""The thread pools the engine sizes: numpy's BLAS, apart from the OpenMP runtime FAISS uses.

threadpoolctl's `user_api="blas"` also reaches a BLAS that threads with OpenMP (faiss-cpu's
wheel bundles one), and limiting that one sets the OpenMP thread count of the calling thread:
FAISS's index builds on it then run on one core (a 1M HNSW build took one core in a process
that had made an Engine). So the engine limits only the BLAS libraries that thread on their own
pool; FAISS's OpenMP threads are set per search (`Config.search_threads`) and left to FAISS for
builds.
"""

from __future__ import annotations

#: BLAS threading layers that are an OpenMP runtime (shared with FAISS): never limited here.
OPENMP_LAYERS = ("openmp", "gnu", "intel")


def numpy_blas():
    """A threadpoolctl controller of the BLAS libraries loaded in this process that do not
    thread through OpenMP (numpy's OpenBLAS threads with pthreads). `.limit(limits=n)` sets
    them (and, used as a context manager, gives the counts back after)."""
    from threadpoolctl import ThreadpoolController

    ctl = ThreadpoolController()
    paths = [lib["filepath"] for lib in ctl.info()
             if lib["user_api"] == "blas" and lib.get("threading_layer") not in OPENMP_LAYERS]
    return ctl.select(filepath=paths)


__all__ = ["numpy_blas"]
