"""Work on the next items of a stream done in threads while the caller handles the current one."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

#: Threads preparing items ahead. Decoding (PIL) and resizing (OpenCV) let go of the GIL, so they
#: overlap the forward pass and the search the caller runs meanwhile.
THREADS = 2


def mapped_ahead(function: Callable, items: Iterable, ahead: int, threads: int = THREADS) -> Iterator:
    """``function(item)`` for each item, in order, computed by ``threads`` threads at most
    ``ahead`` items before the one the caller takes. An exception is raised when the caller
    reaches its item, as it would be without threads; the work not started is then dropped."""
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="defectlens-ahead") as pool:
        queue: deque = deque()
        try:
            for item in items:
                queue.append(pool.submit(function, item))
                if len(queue) > ahead:
                    yield queue.popleft().result()
            while queue:
                yield queue.popleft().result()
        finally:
            for future in queue:
                future.cancel()
