from .model import Composition

__all__ = ["Composition"]
