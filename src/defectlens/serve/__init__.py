"""The inspection service: REST API, inspection history, operator feedback and a live dashboard.

Needs the ``serve`` extra (``pip install "defectlens[serve]"``). Start it with
``defectlens serve MODEL...``; see docs/serve.md.
"""

from .config import ConfigError, ServeConfig, parse_model_specs

__all__ = ["ConfigError", "ServeConfig", "create_app", "parse_model_specs"]


def create_app(*args, **kwargs):
    """:func:`defectlens.serve.app.create_app`, imported on first use (FastAPI loads only when serving)."""
    from .app import create_app as build

    return build(*args, **kwargs)
