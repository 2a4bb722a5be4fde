"""A bounded pool for predictions: a fixed number of threads and a fixed number of waiting requests.

A request beyond that gets :class:`Overloaded` at once (the API answers 503 with Retry-After)
instead of joining a backlog that would only grow while the line keeps posting.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor


class Overloaded(Exception):
    def __init__(self, retry_after: int):
        self.retry_after = retry_after
        super().__init__(f"all workers are busy and the queue is full; retry in {retry_after} s")


class InferencePool:
    def __init__(self, workers: int, queue: int):
        if workers < 1 or queue < 0:
            raise ValueError(f"need at least one worker and a queue of zero or more, got {workers} and {queue}")
        self.workers = workers
        self.capacity = workers + queue
        #: Jobs running or waiting. A job leaves it when its thread finishes it, not when its request
        #: gives up waiting (a client that disconnects does not free a worker).
        self.pending = 0
        self._lock = threading.Lock()
        self._seconds_per_job = 0.1
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="defectlens-predict")

    @property
    def full(self) -> bool:
        return self.pending >= self.capacity

    def retry_after(self) -> int:
        """Seconds the jobs now running or waiting will take to finish."""
        return max(1, math.ceil(self.pending / self.workers * self._seconds_per_job))

    async def run(self, function, *args):
        with self._lock:
            if self.pending >= self.capacity:
                raise Overloaded(self.retry_after())
            self.pending += 1
        future = self._executor.submit(self._timed, function, *args)
        future.add_done_callback(self._finished)
        return await asyncio.wrap_future(future)

    def _timed(self, function, *args):
        started = time.perf_counter()
        try:
            return function(*args)
        finally:
            # A running mean of the time a job holds a worker (its wait in the queue excluded).
            seconds = time.perf_counter() - started
            with self._lock:
                self._seconds_per_job = 0.9 * self._seconds_per_job + 0.1 * seconds

    def _finished(self, _future) -> None:
        with self._lock:
            self.pending -= 1

    def shutdown(self) -> None:
        """Finish the jobs already accepted, then stop the threads."""
        self._executor.shutdown(wait=True)
