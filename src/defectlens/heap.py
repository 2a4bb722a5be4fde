"""Giving freed heap memory back to the system between the phases of a long fit.

glibc's malloc keeps memory that Python, NumPy, PyTorch and faiss free inside its arenas (one per
thread that allocated) and returns only what lies at the top of a heap. A fit's temporaries (the
backbone's activations, each held-out fold's bank, index and normalised queries, PaDiM's float64
blocks) are freed between phases, but the holes stay mapped: the default's fit on 200 images at
256 px peaked at about 1000 MB of resident memory, of which about 300 MB was free memory that
``malloc_trim`` gives back (698 MB with a trim every 20 ms). A trim where each phase ends took its
peak from 869 to 752 MiB for 3.5 % more wall time, the pages given back being faulted in again
(benchmarks/results/speed.md). The Dask project documents the same effect for its workers' memory.
Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Return the free pages of every malloc arena to the system (a few milliseconds)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
