"""Batch prediction spread over a Dask cluster, yielding the same Results as ``predict_paths``.

The model file's bytes are scattered to every worker once; each task scores one chunk of
paths with ``predict_paths`` on the worker (so a bad file is an error row there too) and a
worker keeps the loaded detector for the tasks that follow. Results come back to this process
in input order, so the CSV and maps written from them are the single-process ones. A task
whose worker dies is run again on another worker by the scheduler; each chunk's result is
taken once from its future, so no row is lost or repeated.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import UsageError
from .predict import Result

# Detectors loaded on this worker process, by the hash of their model file.
_WORKER_DETECTORS: dict = {}


def _worker_detector(token: str, model_bytes: bytes, runtime: str):
    key = (token, runtime)
    if key not in _WORKER_DETECTORS:
        from ..models import Detector

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.dlmodel"
            path.write_bytes(model_bytes)
            detector = Detector.load(path)
        if runtime != "torch":
            from ..runtime import load_runtime

            detector = load_runtime(detector, runtime)
        _WORKER_DETECTORS[key] = detector
    return _WORKER_DETECTORS[key]


def _score_chunk(token: str, model_bytes: bytes, runtime: str, paths: list[str], keep_images: bool,
                 max_pixels: int | None, maps: bool = True) -> list[Result]:
    """Runs on a worker: one chunk of paths through the ordinary single-process path."""
    from .predict import predict_paths

    detector = _worker_detector(token, model_bytes, runtime)
    return list(predict_paths(detector, [Path(p) for p in paths], keep_images=keep_images, progress=False,
                              max_pixels=max_pixels, maps=maps))


def connect(scheduler: str):
    """A Client for ``scheduler``: "local" or "local:N" starts a LocalCluster of N worker
    processes (default: one per core, one task at a time each, the cores shared out among them);
    anything else is a scheduler address."""
    from distributed import Client, LocalCluster

    if scheduler == "local" or scheduler.startswith("local:"):
        count = scheduler.split(":", 1)[1] if ":" in scheduler else str(len(os.sched_getaffinity(0)))
        if not count.isdigit() or int(count) < 1:
            raise UsageError(f"--dask local:N needs a whole number N >= 1, not {count!r}")
        workers = int(count)
        # Each worker process gets its share of the cores for torch/faiss: N processes each
        # running all cores' threads would oversubscribe them.
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                               env={"DEFECTLENS_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)})
        return Client(cluster)
    try:
        return Client(scheduler)
    except (OSError, ValueError) as error:  # unreachable, or not an address ("missing port number")
        raise UsageError(f"--dask {scheduler}: cannot reach a Dask scheduler there ({error}); give local, local:N "
                         "or a scheduler's address such as tcp://host:8786") from None


def close(client) -> None:
    """Close ``client`` and the LocalCluster it started, if any."""
    cluster = client.cluster
    client.close()
    if cluster is not None:
        cluster.close()


def predict_paths_dask(model_path: str | os.PathLike, paths: Sequence[Path], scheduler: str = "local", chunk: int = 8,
                       runtime: str = "torch", keep_images: bool = False, progress: bool = True,
                       retries: int = 2, max_pixels: int | None = None, maps: bool = True) -> Iterator[Result]:
    """Yield one Result per path, in input order, scored on the Dask cluster ``scheduler``
    (see :func:`connect`; a Client object is used as it is, and left open)."""
    from distributed import Client, as_completed

    model_bytes = Path(model_path).read_bytes()
    token = hashlib.sha256(model_bytes).hexdigest()
    client = scheduler if isinstance(scheduler, Client) else connect(scheduler)
    owned = client is not scheduler
    try:
        # One copy of the model on every worker, not one per task.
        model = client.scatter(model_bytes, broadcast=True, hash=False)
        chunks = [[str(p) for p in paths[start : start + chunk]] for start in range(0, len(paths), chunk)]
        futures = [client.submit(_score_chunk, token, model, runtime, part, keep_images, max_pixels, maps, retries=retries,
                                 pure=False)
                   for part in chunks]
        order = {future.key: index for index, future in enumerate(futures)}
        done: dict[int, list[Result]] = {}
        next_chunk = 0
        with tqdm(total=len(paths), desc="predict (dask)", unit="img", disable=not progress, leave=False) as bar:
            for future in as_completed(futures):
                done[order[future.key]] = future.result()
                future.release()
                bar.update(len(done[order[future.key]]))
                while next_chunk in done:
                    yield from done.pop(next_chunk)
                    next_chunk += 1
    finally:
        if owned:
            close(client)
