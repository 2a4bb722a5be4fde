from .model import PatchKNN

__all__ = ["PatchKNN"]
