"""Distillation losses: pure torch, no Lightning.

Every loss takes ``student`` and ``teacher`` outputs of the same shape ``[..., C]`` and
returns a scalar averaged over the leading positions (batch, and sequence positions for
token-level outputs). The math runs in float32 at least, so a bf16 teacher or student
does not lose the small probabilities a soft-target KL is made of.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Tuple

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
    if t.requires_grad and torch.is_grad_enabled():  # reverse_kl: the student is the second argument
        return _kl_sum(s, t, temperature) / s.shape[0] * temperature**2
    return _ChunkedSoftTargetKL.apply(s, t.detach(), temperature)


def _kl_sum(s: Tensor, t: Tensor, temperature: float) -> Tensor:
    """``sum over rows of KL(softmax(t/T) || softmax(s/T))`` of ``[N, C]`` logits."""
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum()


_CHUNK_BYTES = 1 << 24
"""Size of the row chunks of :class:`_ChunkedSoftTargetKL`: about 16 MiB of float32 logits."""


def _row_chunks(rows: int, columns: int) -> List[slice]:
    step = max(1, _CHUNK_BYTES // (4 * max(columns, 1)))
    return [slice(start, start + step) for start in range(0, rows, step)]


class _ChunkedSoftTargetKL(torch.autograd.Function):
    """:func:`kl_divergence` of ``[N, C]`` rows against a teacher that takes no gradient,
    computed a chunk of rows at a time; the backward recomputes each chunk's softmaxes from
    the logits (``d/ds = T · (softmax(s/T) - softmax(t/T)) / N``) instead of keeping them.

    The plain formula keeps two ``[N, C]`` float32 tensors for its backward and makes four
    more while it runs: for a language model's vocabulary that is several times the
    logits, alive at the top of the training step's memory. Here only the two logit
    tensors, which exist anyway, are kept.
    """

    @staticmethod
    def forward(ctx: Any, s: Tensor, t: Tensor, temperature: float) -> Tensor:
        ctx.save_for_backward(s, t)
        ctx.temperature = temperature
        total = sum((_kl_sum(s[rows], t[rows], temperature) for rows in _row_chunks(*s.shape)), s.new_zeros(()))
        return total / s.shape[0] * temperature**2  # no rows: NaN, as the mean of nothing

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None, None]:
        s, t = ctx.saved_tensors
        temperature = ctx.temperature
        scale = grad * temperature / max(s.shape[0], 1)
        chunks = [
            (F.softmax(s[rows] / temperature, dim=-1) - F.softmax(t[rows] / temperature, dim=-1)) * scale
            for rows in _row_chunks(*s.shape)
        ]
        return (torch.cat(chunks) if chunks else torch.zeros_like(s)), None, None


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


@dataclass(frozen=True)
class TopKTargets:
    """A teacher's ``[..., C]`` logits kept on their ``k`` largest entries per position,
    with what an exact KL on that support needs at one temperature ``T``:

    - ``values``: the top-k logits, largest first, in the teacher's output dtype (lossless);
    - ``indices``: their positions in ``[0, C)`` (int16 when ``C <= 32768``, else int32);
    - ``log_normalizer``: ``logsumexp(logits / T)`` over all ``C`` entries, so the
      teacher's probability of a kept entry is ``exp(value / T - log_normalizer)``;
    - ``log_rest``: the log of the teacher's probability outside the top k at ``T``
      (computed from the excluded logits, not as ``1 - sum``; ``-inf`` when ``k == C``).

    The last two are float32 (float64 for a float64 teacher): one pair per position.

    It reads like the logits it stands for where the callback needs that: ``shape`` is
    ``(..., C)``.
    """

    values: Tensor
    indices: Tensor
    log_normalizer: Tensor
    log_rest: Tensor
    vocab: int
    temperature: float

    @classmethod
    def from_logits(cls, logits: Tensor, k: int, temperature: float) -> "TopKTargets":
        """Keep the ``k`` largest of ``logits`` (``[..., C]``) per position at ``temperature``.

        Raises:
            ValueError: for ``k`` outside ``[1, C]``.
        """
        logits = logits.detach()
        vocab = logits.shape[-1]
        if not 1 <= k <= vocab:
            raise ValueError(f"top-k needs 1 <= k <= {vocab} (the outputs per position), got k={k}")
        values, indices = logits.topk(k, dim=-1)
        scaled = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
        log_normalizer = torch.logsumexp(scaled, dim=-1)
        outside = scaled.scatter(-1, indices, -math.inf)
        log_rest = torch.logsumexp(outside, dim=-1) - log_normalizer  # -inf - finite = -inf when k == C
        index_dtype = torch.int16 if vocab <= 2**15 else torch.int32
        return cls(values, indices.to(index_dtype), log_normalizer, log_rest, vocab, float(temperature))

    @property
    def shape(self) -> torch.Size:
        """The shape of the logits these stand for: ``(..., C)``."""
        return torch.Size((*self.values.shape[:-1], self.vocab))

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    def to(self, device: torch.device | str) -> "TopKTargets":
        return self._map(lambda tensor: tensor.to(device))

    def select(self, rows: Tensor) -> "TopKTargets":
        """The samples ``rows`` (indices along the first dimension) of these targets."""
        return self._map(lambda tensor: tensor[rows.to(tensor.device)])

    def flattened(self) -> "TopKTargets":
        """These targets with their positions in one dimension: ``shape`` ``(N, C)``."""
        positions = len(self.shape) - 1
        return self._map(lambda tensor: tensor.reshape(-1, *tensor.shape[positions:]))

    def _map(self, function) -> "TopKTargets":
        tensors = ("values", "indices", "log_normalizer", "log_rest")
        return replace(self, **{name: function(getattr(self, name)) for name in tensors})


def kept_positions(mask: Any, student: Tensor, teacher: Tensor | TopKTargets) -> Tuple[Tensor, Tensor | TopKTargets]:
    """The rows of ``[..., C]`` student and teacher outputs where ``mask`` (a bool or 0/1
    tensor of their ``[...]`` shape) is true, as ``[M, C]``: the positions a loss averages
    over (padding left out).

    A mask that keeps nothing gives no rows (with a warning): :func:`distillation_loss` is
    then 0.

    Raises:
        ValueError: ``mask`` is not such a tensor (naming ``mask_fn`` and both shapes).
    """
    positions = tuple(student.shape[:-1])
    if not isinstance(mask, Tensor) or tuple(mask.shape) != positions or mask.is_floating_point() or mask.is_complex():
        got = f"a {mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"`mask_fn` must return a bool (or 0/1 integer) tensor of the outputs' positions, shape {positions} for"
            f" outputs of shape {tuple(student.shape)}, got {got}"
        )
    if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():  # labels with -100 are no mask
        raise ValueError(f"`mask_fn` returned a {mask.dtype} tensor holding values other than 0 and 1 (e.g. labels,"
                         " whose -100 would count as kept); return a bool mask, e.g. labels != -100")
    rows = mask.to(device=student.device, dtype=torch.bool).reshape(-1).nonzero().squeeze(1)
    if rows.numel() == 0:  # one rank's batch of only padding: not an error, which would stop that rank alone
        warnings.warn("`mask_fn` keeps no position of this batch (only padding?): its distillation loss is 0",
                      UserWarning, stacklevel=3)
    flat_student = student.reshape(-1, student.shape[-1])
    if isinstance(teacher, TopKTargets):
        return flat_student[rows], teacher.flattened().select(rows)
    return flat_student[rows], teacher.reshape(-1, teacher.shape[-1])[rows]


def top_k_kl_divergence(student: Tensor, teacher: TopKTargets, temperature: float = 1.0, reverse: bool = False) -> Tensor:
    """``T**2 * KL`` between the teacher's and the student's distributions coarsened to
    ``k + 1`` outcomes: the teacher's top-k entries one by one, and one "rest" bucket
    holding everything else (the teacher's remaining mass, and ``1 - sum`` of the
    student's probabilities on those k entries). This is exactly the KL of the two
    coarsened distributions (``KL(p_T || p_S)``, or ``KL(p_S || p_T)`` with ``reverse``),
    never more than the full-vocabulary KL, and equal to it (up to float rounding) when
    ``k == C``. Averaged over positions like :func:`kl_divergence`.

    Raises:
        ValueError: for shapes that differ, or a ``temperature`` other than the one the
            targets were computed at.
    """
    if tuple(student.shape) != tuple(teacher.shape):
        raise ValueError(
            f"student output shape {tuple(student.shape)} differs from teacher output shape {tuple(teacher.shape)}"
        )
    if float(temperature) != teacher.temperature:
        raise ValueError(
            f"the top-k teacher targets were computed at temperature {teacher.temperature}, not {temperature}"
        )
    dtype = torch.promote_types(student.dtype, torch.float32)
    k, vocab = teacher.k, teacher.vocab
    scaled = student.reshape(-1, vocab).to(dtype) / temperature
    indices = teacher.indices.reshape(-1, k).long()
    log_normalizer = torch.logsumexp(scaled, dim=-1, keepdim=True)
    log_q = scaled.gather(-1, indices) - log_normalizer
    log_p = teacher.values.reshape(-1, k).to(dtype) / temperature - teacher.log_normalizer.reshape(-1, 1).to(dtype)
    if k < vocab:  # the rest bucket (empty when every entry is kept)
        log_q_rest = torch.logsumexp(scaled.scatter(-1, indices, -math.inf), dim=-1, keepdim=True) - log_normalizer
        log_q = torch.cat([log_q, log_q_rest], dim=-1)
        log_p = torch.cat([log_p, teacher.log_rest.reshape(-1, 1).to(dtype)], dim=-1)
    if reverse:
        log_p, log_q = log_q, log_p
    # An outcome the first distribution gives no mass adds nothing (0 log 0 = 0).
    terms = torch.where(torch.isneginf(log_p), 0.0, log_p.exp() * (log_p - log_q))
    return terms.sum(-1).mean() * temperature**2


SOFTMAX_LOSSES = ("kl", "reverse_kl")  # losses of the teacher's softmax: a shift of its logits changes nothing
TOP_K_LOSSES = SOFTMAX_LOSSES  # (a top-k cache holds what a KL of the softmax reads)


def distillation_loss(name: str, student: Tensor, teacher: Tensor | TopKTargets, temperature: float = 1.0) -> Tensor:
    """The loss called ``name`` (one of :data:`LOSSES`); on :class:`TopKTargets`, the
    coarsened KL of :func:`top_k_kl_divergence` (``"kl"`` and ``"reverse_kl"`` only)."""
    if name not in LOSSES:
        raise ValueError(f"unknown distillation loss {name!r}; choose one of {tuple(LOSSES)}")
    top_k = isinstance(teacher, TopKTargets)
    if top_k and name not in TOP_K_LOSSES:
        raise ValueError(f"loss {name!r} needs the teacher's full outputs, not top-k targets; use one of {TOP_K_LOSSES}")
    if student.numel() == 0:  # no position kept (see kept_positions): nothing to distil, gradient 0
        return student.sum() * 0.0
    if top_k:
        return top_k_kl_divergence(student, teacher, temperature, reverse=name == "reverse_kl")
    return LOSSES[name](student, teacher, temperature)


def top1_agreement(student: Tensor, teacher: Tensor | TopKTargets) -> Tensor:
    """Fraction of positions where the argmax over the last dimension agrees."""
    if isinstance(teacher, TopKTargets):
        teacher_top = teacher.indices[..., 0].long()  # largest first
    else:
        teacher_top = teacher.detach().argmax(-1)
    return (student.detach().argmax(-1) == teacher_top).float().mean()


__all__ = [
    "LOSSES",
    "SOFTMAX_LOSSES",
    "TOP_K_LOSSES",
    "TopKTargets",
    "top_k_kl_divergence",
    "distillation_loss",
    "kl_divergence",
    "reverse_kl_divergence",
    "mse",
    "cosine",
    "top1_agreement",
]
