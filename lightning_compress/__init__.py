"""lightning-compress: model compression for PyTorch Lightning.

Add the callbacks to the ``Trainer`` you already have; they stack on one model and
resume exactly from checkpoints.
"""

from lightning_compress.callbacks import KnowledgeDistillation, LoRA, MagnitudePruning, QuantizationAwareTraining
from lightning_compress.formats.peft import AdapterFormatError, load_adapters, save_adapters
from lightning_compress.lora import LoRAConfig, merge_adapters
from lightning_compress.quant import QuantizedWeight, QuantSpec, quantized_weights

__version__ = "0.1.0"

__all__ = [
    "AdapterFormatError",
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
    "__version__",
]
