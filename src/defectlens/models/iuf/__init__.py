from .model import IUF

__all__ = ["IUF"]
