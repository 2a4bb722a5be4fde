from .model import SPADE

__all__ = ["SPADE"]
