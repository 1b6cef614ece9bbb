"""Distillation settings, validated once: the arguments of :class:`lightning_compress.KnowledgeDistillation`."""

from __future__ import annotations

import os
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from lightning_compress.core.targeting import validate_name
from lightning_compress.core.validate import (
    ArgumentError, check_callable, check_choice, check_number, check_positive, is_int, is_number, dtype_of,
)
from lightning_compress.distill.capture import check_features
from lightning_compress.distill.losses import LOSSES, TOP_K_LOSSES
from lightning_compress.distill.teacher import check_teacher

CACHES = ("memory", "disk")
TEACHER_STRATEGIES = ("replicate", "fsdp2")


@dataclass(frozen=True)
class DistillationConfig:
    """Which teacher, which loss and how to mix it in. See
    :class:`lightning_compress.KnowledgeDistillation` for the meaning of each field; every
    field is checked when the config is built.

    ``teacher_path`` is derived: the checkpoint file when ``teacher`` names one.

    Raises:
        ArgumentError: naming the bad field.
    """

    teacher: nn.Module | str | os.PathLike | None = None
    _: KW_ONLY
    teacher_class: Optional[type] = None
    temperature: float = 4.0
    alpha: float | Callable[[int], float] = 0.5
    loss: str = "kl"
    student_layer: str | None = None
    teacher_inputs: Callable[[Any], Any] | None = None
    mask_fn: Callable[[Any], Any] | None = None
    teacher_dtype: torch.dtype | None = None
    teacher_strategy: str = "replicate"
    features: Sequence[Tuple[str, str]] | None = None
    feature_weight: float = 1.0
    projection_lr: float = 1e-3
    cache: str | None = None
    cache_dir: str | os.PathLike | None = None
    cache_top_k: int | None = None
    index_fn: Callable[[Any], Tensor] | None = None
    name: str | None = None
    teacher_path: Optional[Path] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "teacher_path", check_teacher(self.teacher, self.teacher_class))
        check_positive("temperature", self.temperature, what="a positive number (e.g. 4.0)")
        if not callable(self.alpha):
            if not is_number(self.alpha) or not 0.0 <= self.alpha <= 1.0:
                raise ArgumentError(
                    "alpha",
                    "`alpha` must be a float in [0, 1] (the task loss weight) or a callable alpha(step) -> float,"
                    f" got {self.alpha!r}",
                )
            object.__setattr__(self, "alpha", float(self.alpha))
        check_choice("loss", self.loss, tuple(LOSSES))
        if self.student_layer is not None and not isinstance(self.student_layer, str):
            raise ArgumentError(
                "student_layer", f"`student_layer` must be a module name such as 'model.classifier', got {self.student_layer!r}"
            )
        check_callable("teacher_inputs", self.teacher_inputs, what="a callable batch -> args tuple (or tensor), or None")
        check_callable("mask_fn", self.mask_fn, what="a callable batch -> bool tensor of the output positions, or None")
        dtype = dtype_of(self.teacher_dtype)  # "bfloat16" (a recipe's spelling) as torch.bfloat16
        object.__setattr__(self, "teacher_dtype", dtype)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ArgumentError(
                "teacher_dtype", f"`teacher_dtype` must be a floating torch dtype such as torch.bfloat16, got {dtype!r}"
            )
        check_choice("teacher_strategy", self.teacher_strategy, TEACHER_STRATEGIES)
        object.__setattr__(self, "features", check_features(self.features))
        object.__setattr__(self, "feature_weight", check_number("feature_weight", self.feature_weight, low=0.0, what="a number >= 0"))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "projection_lr", check_positive("projection_lr", self.projection_lr))
        self._check_cache()
        object.__setattr__(self, "name", validate_name(self.name))

    def _check_cache(self) -> None:
        cache, index_fn = self.cache, self.index_fn
        check_choice("cache", cache, CACHES, allow_none=True)
        if cache is not None and index_fn is None:
            raise ArgumentError(
                "index_fn",
                f"`cache`={cache!r} needs `index_fn`: a callable batch -> LongTensor of sample indices,"
                " so teacher outputs can be reused per sample",
            )
        if index_fn is not None and not callable(index_fn):
            raise ArgumentError(
                "index_fn", f"`index_fn` must be a callable batch -> sample indices (a function, or its dotted path in a"
                f" recipe), got {type(index_fn).__name__} {index_fn!r}"
            )
        if index_fn is not None and cache is None:
            raise ArgumentError(
                "index_fn", "`index_fn` (a callable batch -> sample indices) is only used with `cache`; set both"
            )
        if cache == "disk" and self.cache_dir is None:
            raise ArgumentError("cache_dir", "`cache`='disk' needs `cache_dir`, the folder for teacher_outputs.safetensors")
        if self.cache_dir is not None and cache != "disk":
            raise ArgumentError("cache_dir", "`cache_dir` is only used with `cache`='disk'; set both")
        if cache is not None and self.features:
            raise ArgumentError(
                "features",
                "`features` cannot be combined with `cache`: intermediate teacher features are not"
                " cached. Drop `cache`, or distil outputs only.",
            )
        top_k = self.cache_top_k
        if top_k is not None:
            if not is_int(top_k) or top_k < 1:
                raise ArgumentError(
                    "cache_top_k", f"`cache_top_k` must be a positive int (the logits kept per position, e.g. 64) or None, got {top_k!r}"
                )
            if cache is None:
                raise ArgumentError(
                    "cache_top_k", "`cache_top_k` keeps the teacher's top-k logits in the teacher-output cache; set `cache`"
                    " ('memory' or 'disk') and `index_fn` too, or drop `cache_top_k`"
                )
            if self.loss not in TOP_K_LOSSES:
                raise ArgumentError(
                    "cache_top_k", f"`cache_top_k` keeps only the teacher's top-k logits, which the {self.loss!r} loss cannot"
                    f" use (it needs every output); use `loss` in {TOP_K_LOSSES}, or drop `cache_top_k`"
                )
        if self.cache_dir is not None:
            if not isinstance(self.cache_dir, (str, os.PathLike)) or not str(self.cache_dir):
                raise ArgumentError("cache_dir", f"`cache_dir` must be a folder path, got {self.cache_dir!r}")
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))


__all__ = ["DistillationConfig", "CACHES", "TEACHER_STRATEGIES"]
