"""Lightning callbacks: thin glue over ``core``, ``sparsity``, ``quant``, ``lora``, ``distill`` and
``formats``; ``base.CompressionCallback`` is their shared lifecycle, ``registry.METHODS`` lists them."""

from lightning_compress.callbacks.distillation import KnowledgeDistillation
from lightning_compress.callbacks.export import CompressedExport
from lightning_compress.callbacks.lora import LoRA
from lightning_compress.callbacks.pruning import MagnitudePruning
from lightning_compress.callbacks.qat import QuantizationAwareTraining
from lightning_compress.callbacks.recipe_record import RecipeRecord

__all__ = ["CompressedExport", "KnowledgeDistillation", "LoRA", "MagnitudePruning", "QuantizationAwareTraining", "RecipeRecord"]
