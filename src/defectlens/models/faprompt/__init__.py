from .model import FAPrompt

__all__ = ["FAPrompt"]
