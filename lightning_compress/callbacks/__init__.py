"""Lightning callbacks: thin glue over ``core``, ``sparsity`` and ``quant``."""

from lightning_compress.callbacks.pruning import MagnitudePruning

__all__ = ["MagnitudePruning"]
