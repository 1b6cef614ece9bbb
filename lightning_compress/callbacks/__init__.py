"""Lightning callbacks: thin glue over ``core``, ``sparsity``, ``quant`` and ``lora``."""

from lightning_compress.callbacks.distillation import KnowledgeDistillation
from lightning_compress.callbacks.lora import LoRA
from lightning_compress.callbacks.pruning import MagnitudePruning
from lightning_compress.callbacks.qat import QuantizationAwareTraining

__all__ = ["KnowledgeDistillation", "LoRA", "MagnitudePruning", "QuantizationAwareTraining"]
