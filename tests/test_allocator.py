"""The fitting commands' malloc policy (engine.allocator): accepted by glibc, freed memory reused."""

import platform
import subprocess
import sys

import pytest

PROBE = """
import resource
import numpy as np
from defectlens.engine.allocator import keep_freed_memory
def faults_of_reallocating():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        pair = [np.ones(20 * 1024 * 1024 // 8) for _ in range(2)]  # 40 MB at the heap's top, then freed
        del pair
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_reallocating()
default = faults_of_reallocating()
assert keep_freed_memory()
faults_of_reallocating()
kept = faults_of_reallocating()
print(default, kept)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_makes_reallocation_reuse_pages():
    """In a fresh process (the policy is process-wide): two 20 MB arrays allocated and freed in
    turn come as fresh zeroed pages under glibc's defaults (40 MB free at the heap's top is
    trimmed), from the kept heap once the policy is set."""
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    default, kept = map(int, result.stdout.split())
    assert default >= 5000 and kept < default / 20


THREAD_PROBE = PROBE.replace("print(default, kept)", """
import threading
faults = []
worker = threading.Thread(target=lambda: faults.append(faults_of_reallocating()))
worker.start()
worker.join()
print(default, faults[0])
""")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_kept_memory_is_reused_by_other_threads():
    """The ensemble fits its members in threads: a thread's first allocations reuse what the
    main thread freed (one arena), instead of its own arena's fresh pages."""
    assert THREAD_PROBE != PROBE  # the thread's measurement replaced the main thread's
    result = subprocess.run([sys.executable, "-c", THREAD_PROBE], capture_output=True, text=True, check=True)
    default, in_thread = map(int, result.stdout.split())
    assert default >= 5000 and in_thread < default / 20
