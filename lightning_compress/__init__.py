"""lightning-compress: model compression for PyTorch Lightning.

Add the callbacks to the ``Trainer`` you already have; they stack on one model and
resume exactly from checkpoints.
"""

from lightning_compress.callbacks import MagnitudePruning

__version__ = "0.1.0"

__all__ = ["MagnitudePruning", "__version__"]
