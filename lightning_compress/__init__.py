"""lightning-compress: model compression for PyTorch Lightning.

Add the callbacks to the ``Trainer`` you already have; they stack on one model and
resume exactly from checkpoints.
"""

from lightning_compress.callbacks import KnowledgeDistillation, MagnitudePruning, QuantizationAwareTraining
from lightning_compress.quant import QuantizedWeight, QuantSpec, quantized_weights

__version__ = "0.1.0"

__all__ = [
    "KnowledgeDistillation",
    "MagnitudePruning",
    "QuantizationAwareTraining",
    "QuantSpec",
    "QuantizedWeight",
    "quantized_weights",
    "__version__",
]
