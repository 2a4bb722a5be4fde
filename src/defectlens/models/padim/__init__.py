from .model import PaDiM

__all__ = ["PaDiM"]
