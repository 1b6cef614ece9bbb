"""How far a teacher-output cache's outputs are from the teacher's own (the check of
:meth:`~lightning_compress.distill.cache.TeacherOutputCache.check_hit`)."""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

from lightning_compress.distill.losses import TopKTargets


def difference_from(cached: Tensor | TopKTargets, fresh: Tensor | TopKTargets, eps: float, softmax: bool) -> Tuple[float, float]:
    """How far ``cached`` is from ``fresh``: the relative L2 error, and the agreement on the
    entries that rank first (top-k: on every kept entry) where the teacher's margin is beyond
    rounding. Differences within two roundings (``eps``) of the stored dtype are left out, and
    equal entries (``-inf`` masks included) are equal.

    Top-k targets are compared as the log-probabilities of their kept entries and of the rest
    (the normalizer and remaining mass a top-k KL reads, which the sorted values alone do
    not hold). Full outputs trained by a softmax loss (``softmax``) are compared without their
    shift per position (softmax ignores it, and a large shared offset would hide the rest);
    others (MSE, cosine targets) as they are.
    """
    if isinstance(fresh, TopKTargets):
        def log_probabilities(targets):
            kept = targets.values.float() / targets.temperature - targets.log_normalizer.float()[..., None]
            return torch.cat([kept, targets.log_rest.float()[..., None]], -1)

        c, v = log_probabilities(cached), log_probabilities(fresh)
        scale = torch.cat([fresh.values.float().abs() / fresh.temperature, torch.zeros_like(v[..., -1:])], -1)
        values = fresh.values.float()
        gaps = torch.full_like(values, math.inf)  # to the neighbouring kept entries
        gaps[..., 1:] = values[..., :-1] - values[..., 1:]
        gaps[..., :-1] = torch.minimum(gaps[..., :-1], values[..., :-1] - values[..., 1:])
        decided = gaps > 2 * eps * values.abs().clamp_min(1.0)
        agree = cached.indices.long() == fresh.indices.long()
    else:
        c, v = cached.float(), fresh.float()
        scale = torch.maximum(c.abs(), v.abs())
        decided = agree = None
        if softmax:
            top_two = v.topk(min(2, v.shape[-1]), dim=-1).values
            decided = (top_two[..., 0] - top_two[..., -1] > 2 * eps * top_two[..., 0].abs().clamp_min(1.0))
            decided = decided | (top_two.shape[-1] == 1)
            agree = c.argmax(-1) == v.argmax(-1)
    finite = torch.isfinite(c) & torch.isfinite(v)
    difference = torch.where(c == v, torch.zeros_like(v), c - v)
    difference[finite & (difference.abs() <= 2 * eps * scale)] = 0  # rounding
    reference = torch.where(torch.isfinite(v), v, torch.zeros_like(v))
    if softmax and not isinstance(fresh, TopKTargets):
        difference = difference - difference.mean(-1, keepdim=True)
        reference = reference - reference.mean(-1, keepdim=True)
    error = float(difference.norm() / reference.norm().clamp_min(1e-12))
    if math.isnan(error):  # an infinity against a finite value: they differ
        error = math.inf
    agreement = float(agree[decided].float().mean()) if decided is not None and decided.any() else 1.0
    return error, agreement


__all__ = ["difference_from"]
