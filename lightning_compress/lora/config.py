"""LoRA settings, validated once: the callback and the PEFT reader both build one."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
from torch import nn

from lightning_compress.core.targeting import Target, validate_targets
from lightning_compress.quant.nf4 import NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE

ADAPTABLE_TYPES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
BASES = ("float", "nf4")
_COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoRAConfig:
    """What to adapt and how; the names are PEFT's (``r``, ``lora_alpha``, ``target_modules``).

    See :class:`lightning_compress.LoRA` for the meaning of each field. Every field is
    checked when the config is built, with a message that names it.
    """

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    target_modules: Tuple[Target, ...] | None = None
    exclude_modules: Tuple[Target, ...] | None = None
    modules_to_save: Tuple[str, ...] | None = None
    base: str = "float"
    compute_dtype: torch.dtype | None = None
    nf4_block_size: int = NF4_BLOCK_SIZE
    nf4_scaler_block_size: int = NF4_SCALER_BLOCK_SIZE

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"`r` (the adapter rank) must be a positive int, got {self.r!r}; typical values are 4 to 64")
        _check_number("lora_alpha", self.lora_alpha, positive=True)
        _check_number("lora_dropout", self.lora_dropout)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"`use_rslora` must be True or False, got {self.use_rslora!r}")
        object.__setattr__(self, "target_modules", validate_targets("target_modules", self.target_modules, ADAPTABLE_TYPES))
        object.__setattr__(self, "exclude_modules", validate_targets("exclude_modules", self.exclude_modules, ADAPTABLE_TYPES))
        object.__setattr__(self, "modules_to_save", _validate_names("modules_to_save", self.modules_to_save))
        if self.base not in BASES:
            raise ValueError(f"unknown `base` {self.base!r}; choose 'float' or 'nf4' (QLoRA)")
        for argument in ("nf4_block_size", "nf4_scaler_block_size"):
            value = getattr(self, argument)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2 or value % 2:
                raise ValueError(f"`{argument}` must be an even int >= 2, got {value!r}")
        dtype = self.compute_dtype
        if isinstance(dtype, str):
            if dtype not in _COMPUTE_DTYPES:
                raise ValueError(f"unknown `compute_dtype` {dtype!r}; choose one of {sorted(_COMPUTE_DTYPES)}")
            dtype = _COMPUTE_DTYPES[dtype]
        if dtype is not None and dtype not in _COMPUTE_DTYPES.values():
            raise ValueError(f"`compute_dtype` must be a float dtype such as torch.bfloat16, got {dtype!r}")
        if dtype is not None and self.base != "nf4":
            raise ValueError(
                "`compute_dtype` sets the dtype the NF4 base is dequantized to, so it needs"
                " base='nf4'; for a float base choose the Trainer's `precision` instead"
            )
        object.__setattr__(self, "compute_dtype", dtype)

    @property
    def scaling(self) -> float:
        """The factor on ``B·A``: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def _check_number(argument: str, value, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and not value > 0):
        kind = "a positive number" if positive else "a number"
        raise ValueError(f"`{argument}` must be {kind}, got {value!r}")


def _validate_names(argument: str, names: Sequence[str] | None) -> Tuple[str, ...] | None:
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"`{argument}` must be a list of module names or globs, e.g. ['classifier'], got {names!r}")
    return tuple(names)
