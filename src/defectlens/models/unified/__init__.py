from .model import UnifiedBank

__all__ = ["UnifiedBank"]
