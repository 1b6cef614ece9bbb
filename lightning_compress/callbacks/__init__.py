"""Lightning callbacks: thin glue over ``core``, ``sparsity`` and ``quant``."""

from lightning_compress.callbacks.distillation import KnowledgeDistillation
from lightning_compress.callbacks.pruning import MagnitudePruning
from lightning_compress.callbacks.qat import QuantizationAwareTraining

__all__ = ["KnowledgeDistillation", "MagnitudePruning", "QuantizationAwareTraining"]
