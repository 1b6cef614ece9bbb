"""LoRA settings, validated once: the callback and the PEFT reader both build one."""

from __future__ import annotations

import math
import os
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Sequence, Tuple

import torch
from torch import nn

from lightning_compress.core.incompatible import LayerIssue, check_on_incompatible, grouped_convolution
from lightning_compress.core.targeting import Target, validate_name, validate_targets, weight_name
from lightning_compress.core.transforms import raw_weight
from lightning_compress.core.validate import ArgumentError, check_bool, check_fraction, check_name, check_positive, dtype_of, is_int
from lightning_compress.quant.nf4 import NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE, check_nf4_compatible

# nn.MultiheadAttention: its packed `in_proj_weight` (query, key and value of one width); its
# `out_proj` is a Linear of its own.
ADAPTABLE_TYPES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)
DEFAULT_TYPES = (nn.Linear, nn.MultiheadAttention)
MAX_RANK = 65536  # far above any useful rank; stops a typo from allocating terabytes
BASES = ("float", "nf4")
_COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoRAConfig:
    """What to adapt and how; the names are PEFT's (``r``, ``lora_alpha``, ``target_modules``).

    See :class:`lightning_compress.LoRA` for the meaning of each field: the callback's
    arguments are these fields. The PEFT reader builds one from ``adapter_config.json``
    (the training fields keep their defaults there). Every field is checked when the
    config is built.

    Raises:
        ArgumentError: naming the bad field.
    """

    r: int = 8
    lora_alpha: float = 16.0
    target_modules: Sequence[Target] | None = None
    _: KW_ONLY
    lora_dropout: float = 0.0
    use_rslora: bool = False
    exclude_modules: Sequence[Target] | None = None
    modules_to_save: Sequence[str] | None = None
    base: str = "float"
    compute_dtype: torch.dtype | str | None = None
    nf4_block_size: int = NF4_BLOCK_SIZE
    nf4_scaler_block_size: int = NF4_SCALER_BLOCK_SIZE
    merge_on_fit_end: bool = False
    adapter_dir: str | os.PathLike | None = None
    peft_root: str | None = None
    adapter_only_checkpoints: bool = False
    on_incompatible: str = "error"
    name: str | None = None

    def __post_init__(self) -> None:
        if not is_int(self.r) or self.r <= 0 or self.r > MAX_RANK:
            raise ArgumentError(
                "r", f"`r` (the adapter rank) must be a positive int, got {self.r!r}; typical values are 4 to 64,"
                f" and at most {MAX_RANK}"
            )
        check_positive("lora_alpha", self.lora_alpha)
        check_fraction("lora_dropout", self.lora_dropout)
        check_bool("use_rslora", self.use_rslora)
        object.__setattr__(self, "target_modules", validate_targets("target_modules", self.target_modules, ADAPTABLE_TYPES))
        object.__setattr__(self, "exclude_modules", validate_targets("exclude_modules", self.exclude_modules, ADAPTABLE_TYPES))
        object.__setattr__(self, "modules_to_save", _validate_names("modules_to_save", self.modules_to_save))
        if self.base not in BASES:
            raise ArgumentError("base", f"unknown `base` {self.base!r}; choose 'float' or 'nf4' (QLoRA)")
        for argument in ("nf4_block_size", "nf4_scaler_block_size"):
            value = getattr(self, argument)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2 or value % 2:
                raise ArgumentError(argument, f"`{argument}` must be an even int >= 2, got {value!r}")
        object.__setattr__(self, "compute_dtype", _compute_dtype(self.compute_dtype, self.base))
        check_bool("merge_on_fit_end", self.merge_on_fit_end)
        check_bool("adapter_only_checkpoints", self.adapter_only_checkpoints)
        if self.adapter_dir is not None:
            if not isinstance(self.adapter_dir, (str, os.PathLike)) or not str(self.adapter_dir):
                raise ArgumentError(
                    "adapter_dir", f"`adapter_dir` must be a directory path or None, got {self.adapter_dir!r}"
                )
            object.__setattr__(self, "adapter_dir", Path(self.adapter_dir))
        check_name("peft_root", self.peft_root, what="a submodule name such as 'model'")
        check_on_incompatible(self.on_incompatible)
        object.__setattr__(self, "name", validate_name(self.name))

    def layer_issue(self, name: str, layer: nn.Module) -> LayerIssue | None:
        """Why LoRA (with this rank and base) cannot adapt the selected layer ``name``, or
        ``None``: a grouped convolution, a layer an NF4 base cannot store, or one smaller
        than the rank."""
        grouped = grouped_convolution(layer)
        if grouped is not None:
            return LayerIssue(
                "target_modules", _plain_targets(self.target_modules),
                f"layer {name!r} is a grouped convolution ({grouped}); LoRA adapts only groups=1 convolutions (a"
                " B·A adapter of rank r is not grouped, and PEFT's format has none). Remove it from `target_modules`",
            )
        if isinstance(layer, nn.MultiheadAttention) and layer._parameters.get("in_proj_weight") is None:
            return LayerIssue(
                "target_modules", _plain_targets(self.target_modules),
                f"layer {name!r} is an nn.MultiheadAttention with separate query/key/value weights (its key or value"
                " width differs from its query's); LoRA adapts an attention layer's packed in_proj_weight only (PEFT's"
                " format has no form for separate ones). Remove it from `target_modules`; its out_proj is a Linear",
            )
        if self.base == "nf4":
            if not isinstance(layer, (nn.Linear, nn.MultiheadAttention)):
                return LayerIssue("base", self.base, f"layer {name!r} is a {type(layer).__name__}; base='nf4' (QLoRA)"
                                                     " stores the weights of Linear and attention layers only. Exclude"
                                                     " it, or use base='float'")
            weight = raw_weight(layer, weight_name(layer))
            try:
                check_nf4_compatible(name, weight, self.nf4_block_size, self.nf4_scaler_block_size)
            except ValueError as err:  # the blocks fit, so the scale blocks do not: name the setting behind it
                blocks_fit = weight.dim() <= 2 and weight.numel() % self.nf4_block_size == 0
                setting = "nf4_scaler_block_size" if blocks_fit else "nf4_block_size"
                return LayerIssue(setting, getattr(self, setting), str(err))
        try:
            check_rank(name, layer, self.r)
        except ArgumentError as err:
            return LayerIssue("r", self.r, str(err))
        return None

    @property
    def scaling(self) -> float:
        """The factor on ``B·A``: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def check_rank(name: str, layer: nn.Module, r: int) -> None:
    """Refuse a rank above what ``layer`` can use: ``B·A`` has rank at most
    ``min(fan_in, fan_out)``, so a larger ``r`` only adds parameters (and memory).

    Raises:
        ArgumentError: naming ``r`` and the layer.
    """
    if isinstance(layer, nn.Embedding):
        fan_in, fan_out = layer.num_embeddings, layer.embedding_dim
    else:
        shape = tuple(raw_weight(layer, weight_name(layer)).shape)
        fan_in, fan_out = math.prod(shape[1:]), shape[0]
    if r > min(fan_in, fan_out):
        raise ArgumentError(
            "r",
            f"`r`={r} is larger than layer {name!r} ({type(layer).__name__}, {fan_in} in, {fan_out} out) can use:"
            f" an adapter's rank is at most min(in, out) = {min(fan_in, fan_out)}. Lower `r`, or leave the layer"
            " out (`target_modules` / `exclude_modules`)",
        )


def _plain_targets(targets: Sequence[Target] | None) -> list | None:
    return None if targets is None else [t if isinstance(t, str) else t.__name__ for t in targets]


def _compute_dtype(dtype, base: str) -> torch.dtype | None:
    if dtype is not None and dtype_of(dtype) not in _COMPUTE_DTYPES.values():  # "torch.float16" and "half" too
        raise ArgumentError("compute_dtype", f"unknown `compute_dtype` {dtype!r}; choose one of"
                                             f" {sorted(_COMPUTE_DTYPES)} (or the torch dtype)")
    dtype = dtype_of(dtype)
    if dtype is not None and base != "nf4":
        raise ArgumentError(
            "compute_dtype",
            "`compute_dtype` sets the dtype the NF4 base is dequantized to, so it needs"
            " base='nf4'; for a float base choose the Trainer's `precision` instead",
        )
    return dtype


def _validate_names(argument: str, names: Sequence[str] | None) -> Tuple[str, ...] | None:
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n.strip() for n in names):
        raise ArgumentError(argument, f"`{argument}` must be a list of module names or globs, e.g. ['classifier'], got {names!r}")
    return tuple(names)
