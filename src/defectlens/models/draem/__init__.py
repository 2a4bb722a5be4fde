from .model import Draem

__all__ = ["Draem"]
