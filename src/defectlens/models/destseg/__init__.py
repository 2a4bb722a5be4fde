from .model import DeSTSeg

__all__ = ["DeSTSeg"]
