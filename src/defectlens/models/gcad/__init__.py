from .model import GCAD

__all__ = ["GCAD"]
