"""Distillation losses: pure torch, no Lightning.

Every loss takes ``student`` and ``teacher`` outputs of the same shape ``[..., C]`` and
returns a scalar averaged over the leading positions (batch, and sequence positions for
token-level outputs). The math runs in float32 at least, so a bf16 teacher or student
does not lose the small probabilities a soft-target KL is made of.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor, Tensor, float], Tensor]


def _as_rows(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    if student.shape != teacher.shape:
        raise ValueError(
            f"student output shape {tuple(student.shape)} differs from teacher output shape {tuple(teacher.shape)}"
        )
    dtype = torch.promote_types(student.dtype, torch.float32)
    columns = student.shape[-1] if student.dim() else 1
    return student.reshape(-1, columns).to(dtype), teacher.reshape(-1, columns).to(dtype)


def kl_divergence(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Soft-target KD (Hinton et al. 2015): ``T**2 * KL(softmax(t/T) || softmax(s/T))``.

    The ``T**2`` factor keeps the gradient scale independent of the temperature. Averaged
    over every leading position of ``[..., C]`` logits.
    """
    s, t = _as_rows(student, teacher)
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return kl.mean() * temperature**2


def reverse_kl_divergence(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Mode-seeking ``T**2 * KL(softmax(s/T) || softmax(t/T))``, averaged like :func:`kl_divergence`."""
    return kl_divergence(teacher, student, temperature)  # the same divergence, roles swapped


def mse(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean squared error between the raw outputs (the temperature is not used)."""
    s, t = _as_rows(student, teacher)
    return F.mse_loss(s, t)


def cosine(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """``1 - cosine similarity`` along the last dimension, averaged (for embeddings)."""
    s, t = _as_rows(student, teacher)
    return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()


LOSSES: Dict[str, LossFn] = {
    "kl": kl_divergence,
    "reverse_kl": reverse_kl_divergence,
    "mse": mse,
    "cosine": cosine,
}


def distillation_loss(name: str, student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """The loss called ``name`` (one of :data:`LOSSES`)."""
    if name not in LOSSES:
        raise ValueError(f"unknown distillation loss {name!r}; choose one of {tuple(LOSSES)}")
    return LOSSES[name](student, teacher, temperature)


def top1_agreement(student: Tensor, teacher: Tensor) -> Tensor:
    """Fraction of positions where the argmax over the last dimension agrees."""
    student, teacher = student.detach(), teacher.detach()
    return (student.argmax(-1) == teacher.argmax(-1)).float().mean()


__all__ = [
    "LOSSES",
    "distillation_loss",
    "kl_divergence",
    "reverse_kl_divergence",
    "mse",
    "cosine",
    "top1_agreement",
]
