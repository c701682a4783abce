"""notelab: ML study notes turned into working, tested, fast PyTorch code."""

__version__ = "0.1.0"
