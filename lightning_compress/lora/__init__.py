"""LoRA / QLoRA numerics and injection (pure PyTorch; the callback is ``callbacks/lora.py``)."""

from lightning_compress.lora.adapter import DropoutRNG, LoRAAdapter
from lightning_compress.lora.config import ADAPTABLE_TYPES, LoRAConfig
from lightning_compress.lora.inject import adapters_of, inject_adapters, merge_adapters, parameter_counts

__all__ = [
    "ADAPTABLE_TYPES",
    "DropoutRNG",
    "LoRAAdapter",
    "LoRAConfig",
    "adapters_of",
    "inject_adapters",
    "merge_adapters",
    "parameter_counts",
]
