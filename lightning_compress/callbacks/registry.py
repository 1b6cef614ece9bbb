"""The compression methods by name: recipe section -> callback class and its config.

Recipes build their schema (and their sections) from here, so adding a method is one
entry (its callback, whose ``config_class`` holds the arguments), with no edit in
``core/`` or ``recipes.py``. The CLI and the rules between methods (``compatibility.py``)
find a method by its callback's ``section``. The order is canonical:
the order ``from_recipe`` returns the callbacks in (LoRA puts its adapters in first; the
export writes at fit end after the others are done).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Tuple

from lightning_compress.callbacks.distillation import KnowledgeDistillation
from lightning_compress.callbacks.export import CompressedExport
from lightning_compress.callbacks.lora import LoRA
from lightning_compress.callbacks.pruning import MagnitudePruning
from lightning_compress.callbacks.qat import QuantizationAwareTraining


@dataclass(frozen=True)
class Method:
    """One compression method: its recipe section and callback (and so its config)."""

    section: str
    callback: type

    @property
    def config(self) -> type:
        return self.callback.config_class

    def arguments(self) -> Tuple[dataclasses.Field, ...]:
        """The config fields a user sets (the recipe keys), in declaration order."""
        return tuple(f for f in dataclasses.fields(self.config) if f.init)


METHODS: Dict[str, Method] = {
    cls.section: Method(cls.section, cls)
    for cls in (LoRA, KnowledgeDistillation, MagnitudePruning, QuantizationAwareTraining, CompressedExport)
}

__all__ = ["Method", "METHODS"]
