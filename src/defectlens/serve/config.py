"""What a service runs with: its models, where it stores the history, who may call it, and its limits."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError

#: Model names appear in URLs and the database: letters, digits, '_', '-', '.', never a path.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(UsageError):
    """The service cannot start as asked; the message says what to change."""


def valid_model_name(name: str) -> bool:
    return bool(MODEL_NAME.match(name)) and ".." not in name


def parse_model_specs(specs: list[str]) -> dict[str, Path]:
    """``PATH`` or ``NAME=PATH`` per model; a bare path is named after its file stem."""
    models: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path, name = spec, Path(spec).stem
        if not valid_model_name(name):
            raise ConfigError(f"model name {name!r} ({spec}): use letters, digits, '_', '-' or '.', at most 64 "
                              "characters, starting with a letter or digit (name it with NAME=PATH)")
        if name in models:
            raise ConfigError(f"two models are named {name!r}; name them apart with NAME=PATH")
        models[name] = Path(path)
    if not models:
        raise ConfigError("give at least one model file to serve")
    return models


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


@dataclass
class ServeConfig:
    models: dict[str, Path]
    #: Folder for the SQLite database (when ``db_url`` is None) and the stored images and maps.
    data_dir: Path = Path("defectlens-serve")
    #: Any SQLAlchemy URL; None = SQLite file ``data_dir/inspections.db``.
    db_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    tokens: tuple[str, ...] = ()
    insecure: bool = False
    #: Threads that run predictions; every request beyond ``workers + queue`` gets 503.
    workers: int = 1
    queue: int = 32
    #: Whole request body, all images of a batch together.
    max_upload_bytes: int = 32 * 1024 * 1024
    #: Pixels per image, checked from the header before decoding.
    max_pixels: int = 40_000_000
    max_batch: int = 16
    #: Origins allowed to call the API from a browser; empty = CORS off (same origin only).
    cors_origins: tuple[str, ...] = ()
    #: Where the models' backbones run: torch, onnx, openvino, or auto (runtime.load_runtime).
    runtime: str = "torch"
    #: Seconds the service waits for in-flight requests when asked to stop.
    graceful_timeout: float = 30.0
    extra: dict = field(default_factory=dict)

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{Path(self.data_dir).resolve() / 'inspections.db'}"

    def check_exposure(self) -> None:
        """Refuse to listen beyond loopback without a token, unless the user said --insecure."""
        if not self.tokens and not self.insecure and not is_loopback(self.host):
            raise ConfigError(
                f"refusing to listen on {self.host} without an API token: anyone on the network could read the "
                "inspection history and post images. Set DEFECTLENS_TOKEN (or --token), or pass --insecure "
                "if this network is trusted")
        for token in self.tokens:
            if len(token) < 16:
                raise ConfigError("an API token must be at least 16 characters (e.g. `python -c 'import secrets; "
                                  "print(secrets.token_urlsafe(32))'`)")
