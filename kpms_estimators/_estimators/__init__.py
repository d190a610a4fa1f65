from .arhmm import ARHMM

__all__ = ["ARHMM"]
