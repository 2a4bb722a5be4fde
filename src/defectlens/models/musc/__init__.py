from .model import MuSc

__all__ = ["MuSc"]
