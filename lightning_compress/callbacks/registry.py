"""The compression methods by name: recipe section -> callback class and config.

Recipes, the CLI and the compatibility check find the methods here, so adding a method
is one entry (and its callback and config), with no edit in ``core/`` or ``recipes.py``.
The order is canonical: the order ``from_recipe`` returns the callbacks in (LoRA puts
its adapters in first; the export writes at fit end after the others are done).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, Tuple

from lightning_compress.callbacks.base import CompressionCallback
from lightning_compress.callbacks.compatibility import RULES
from lightning_compress.callbacks.distillation import KnowledgeDistillation
from lightning_compress.callbacks.export import CompressedExport
from lightning_compress.callbacks.lora import LoRA
from lightning_compress.callbacks.pruning import MagnitudePruning
from lightning_compress.callbacks.qat import QuantizationAwareTraining


@dataclass(frozen=True)
class Method:
    """One compression method: its recipe section, callback and config class."""

    section: str
    callback: type

    @property
    def config(self) -> type:
        return self.callback.config_class

    def arguments(self) -> Tuple[str, ...]:
        """The config fields a user sets (the recipe keys), in declaration order."""
        return tuple(f.name for f in fields(self.config) if f.init)


METHODS: Dict[str, Method] = {
    cls.section: Method(cls.section, cls)
    for cls in (LoRA, KnowledgeDistillation, MagnitudePruning, QuantizationAwareTraining, CompressedExport)
}
# Rules between methods (see `compatibility`): checked for every Trainer and recipe.
COMPATIBILITY_RULES = RULES


def method_of(callback: CompressionCallback) -> Method:
    """The registered method a callback instance belongs to."""
    return METHODS[callback.section]


__all__ = ["Method", "METHODS", "COMPATIBILITY_RULES", "method_of"]
