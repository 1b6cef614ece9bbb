"""lightning-compress: model compression for PyTorch Lightning.

Add the callbacks to the ``Trainer`` you already have; they stack on one model and
resume exactly from checkpoints.
"""

from lightning_compress.callbacks import (
    CompressedExport,
    KnowledgeDistillation,
    LoRA,
    MagnitudePruning,
    QuantizationAwareTraining,
)
from lightning_compress.callbacks.compatibility import IncompatibleLayersSkipped, IncompatibleSettings
from lightning_compress.core.tracking import wandb_logger, wandb_run_dir
from lightning_compress.core.validate import ArgumentError
from lightning_compress.distill.config import DistillationConfig
from lightning_compress.formats.config import ExportConfig
from lightning_compress.formats.errors import ExportError, PackedFormatError, ParityError
from lightning_compress.formats.export import ExportReport, export
from lightning_compress.formats.loader import load_packed
from lightning_compress.formats.peft import AdapterFormatError, load_adapters, save_adapters
from lightning_compress.lora import LoRAConfig, merge_adapters
from lightning_compress.quant import QuantizedWeight, QuantSpec, quantized_weights
from lightning_compress.quant.config import QATConfig
from lightning_compress.recipes import Recipe, RecipeError, from_recipe, load_recipe
from lightning_compress.sensitivity import layer_sensitivity, mixed_precision_recipe
from lightning_compress.sparsity.config import PruningConfig
from lightning_compress.version import __version__


__all__ = [
    "AdapterFormatError",
    "ArgumentError",
    "DistillationConfig",
    "ExportConfig",
    "PruningConfig",
    "QATConfig",
    "CompressedExport",
    "ExportError",
    "ExportReport",
    "IncompatibleLayersSkipped",
    "IncompatibleSettings",
    "PackedFormatError",
    "ParityError",
    "export",
    "from_recipe",
    "load_recipe",
    "Recipe",
    "RecipeError",
    "load_packed",
    "KnowledgeDistillation",
    "LoRA",
    "LoRAConfig",
    "MagnitudePruning",
    "QuantizationAwareTraining",
    "QuantSpec",
    "QuantizedWeight",
    "load_adapters",
    "merge_adapters",
    "save_adapters",
    "quantized_weights",
    "layer_sensitivity",
    "mixed_precision_recipe",
    "wandb_logger",
    "wandb_run_dir",
    "__version__",
]
