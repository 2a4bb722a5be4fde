from .model import WinCLIP

__all__ = ["WinCLIP"]
