from .model import Ensemble

__all__ = ["Ensemble"]
