"""How the C library's malloc treats freed memory in a process that fits detectors.

Fitting runs the backbone in eager PyTorch over every training image, and PaDiM and the kNN
banks build large transient arrays. glibc's malloc serves allocations above a threshold (128 KB,
rising with use) by fresh mappings and gives the top of the heap back to the kernel once 2× that
is free: most of those tensors came back as new pages the kernel zeroed one by one (900,000 page
faults, 2.3 s of system time in the default's fit of 200 images at 256 px, 5.3 s of wall time for
the embedding). ``keep_freed_memory`` makes the process reuse them instead.

Kept memory is kept per malloc arena, and glibc gives each thread that allocates its own arena:
with the ensemble's members fitting in two threads, each kept its own freed heap and the fit's
peak grew from 0.92 to 1.28 GB. One arena for the process keeps it at 0.92 (the threads allocate
few, large blocks: no measurable contention).
"""

from __future__ import annotations

import ctypes

# mallopt's parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
#: glibc's largest allowed mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): bigger
#: allocations are still mapped and unmapped, so a peak of a few huge arrays is returned.
MMAP_THRESHOLD = 32 * 1024 * 1024


def keep_freed_memory() -> bool:
    """From now on, allocations up to ``MMAP_THRESHOLD`` come from the heap, one arena for all
    threads, and freed heap is kept for reuse, not trimmed. Costs peak memory (about 100 MB more
    for the default's fit) and saves time (fit 19.0 -> 17.4 s, same model). Process-wide, so
    called by the commands that fit (``fit``, ``benchmark``, ``demo``), not by the library;
    predict on an exported runtime gained nothing from it (ONNX Runtime and OpenVINO keep their
    own arenas) and would only grow. False where the C library has no ``mallopt`` (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return (bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
            and bool(mallopt(_M_ARENA_MAX, 1)))
