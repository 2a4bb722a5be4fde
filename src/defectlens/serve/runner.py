"""Start the service (uvicorn) or export from its history; what `defectlens serve` calls."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from ..engine.outputs import check_output_folder
from ..errors import UsageError
from .blobs import BlobStore
from .config import ServeConfig
from .export import export_folder
from .inspection import LoadedModel
from .store import InspectionStore

log = logging.getLogger("defectlens.serve")


def run(config: ServeConfig, max_connections: int = 256, log_level: str = "info") -> None:
    """Load every model, open the database, and serve until SIGINT/SIGTERM. On a stop signal the
    server stops accepting, waits up to ``config.graceful_timeout`` s for in-flight requests, then
    finishes queued predictions and closes the database."""
    import uvicorn

    from ..runtime import runtime_of
    from .app import create_app

    config.check_exposure()
    # Before the models load, which takes a while: where it would listen and write.
    check_can_listen(config.host, config.port)
    check_data_folder(config)
    models = {}
    for name, path in config.models.items():
        models[name] = LoadedModel.load(name, path, config.runtime)
        detector = models[name].detector
        runtime = "" if config.runtime == "torch" else f" (backbone on {runtime_of(detector)})"
        print(f"loaded {name}: {detector.name} from {path}{runtime}", flush=True)
    app = create_app(config, models)
    print(f"history in {config.database_url if config.db_url else Path(config.data_dir).resolve()}; "
          f"dashboard at http://{config.host}:{config.port}/", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, server_header=False,
                timeout_graceful_shutdown=config.graceful_timeout, limit_concurrency=max_connections)


def check_can_listen(host: str, port: int) -> None:
    """Refuse, as a usage error, an address this process cannot listen on (the port taken, the
    host not an address of this machine); the check binds and lets go at once."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as error:
        raise UsageError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def check_data_folder(config: ServeConfig) -> None:
    """Refuse a data folder the stored images and maps (and the SQLite history, without a database
    URL) cannot go to, as a usage error naming it."""
    check_output_folder(config.data_dir, what="--data")
    if not config.db_url and (Path(config.data_dir) / "inspections.db").is_dir():
        raise UsageError(f"--data {config.data_dir}: inspections.db there is a folder, not the history database")


def export_good(config: ServeConfig, folder: str | Path) -> dict[str, int]:
    """Write each model's operator-confirmed good images to ``folder/<model>/train/good/``."""
    store = InspectionStore(config.database_url)
    blobs = BlobStore(Path(config.data_dir) / "blobs")
    try:
        return {name: export_folder(store, blobs, name, Path(folder) / name) for name in config.models}
    finally:
        store.close()
