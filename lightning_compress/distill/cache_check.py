"""How far a teacher-output cache's outputs are from the teacher's own (the check of
:meth:`~lightning_compress.distill.cache.TeacherOutputCache.check_hit`)."""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

from lightning_compress.distill.losses import TopKTargets


# Log-probabilities below this are 0 to any loss (e^-100): masked entries (-inf, or the dtype's
# most negative number) land here on both sides and are left out, not compared.
FLOOR = -100.0


def difference_from(cached: Tensor | TopKTargets, fresh: Tensor | TopKTargets, eps: float, softmax: bool) -> Tuple[float, float]:
    """How far ``cached`` is from ``fresh``: the relative L2 error, and the agreement on the
    entries that rank first (top-k: on every kept entry) where the teacher's margin is beyond
    rounding. Differences within two roundings (``eps``) of the stored dtype are left out.

    Top-k targets are compared as the log-probabilities of their kept entries and of the rest
    (the normalizer and remaining mass a top-k KL reads, which the sorted values alone do
    not hold). Full outputs of a softmax loss (``softmax``) as log-probabilities centred over
    their unmasked entries (softmax ignores a shift, and a large shared offset or a mask would
    hide the rest); others (MSE, cosine targets) as they are.
    """
    topk = isinstance(fresh, TopKTargets)
    if topk:
        values = fresh.values.float()
        c, v = _top_k_log_probabilities(cached), _top_k_log_probabilities(fresh)
        scale = torch.cat([values.abs() / fresh.temperature, torch.zeros_like(v[..., -1:])], -1)
        steps = values[..., :-1] - values[..., 1:]
        gaps = torch.full_like(values, math.inf)  # to the neighbouring kept entries
        gaps[..., 1:] = steps
        gaps[..., :-1] = torch.minimum(gaps[..., :-1], steps)
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
            c, v = c.log_softmax(-1), v.log_softmax(-1)
    live = torch.ones_like(v, dtype=torch.bool)
    if topk or softmax:
        c, v = c.clamp_min(FLOOR), v.clamp_min(FLOOR)
        live = (c > FLOOR) | (v > FLOOR)
    difference = torch.where(c == v, torch.zeros_like(v), c - v)
    scale = torch.where(torch.isfinite(scale), scale, torch.zeros_like(scale))
    difference[difference.abs() <= 2 * eps * scale] = 0  # rounding
    reference = torch.where(live & torch.isfinite(v), v, torch.zeros_like(v))
    if softmax and not topk:
        difference, reference = _centred(difference, live), _centred(reference, live)
    error = float(difference.norm() / reference.norm().clamp_min(1e-12))
    if math.isnan(error):  # an infinity against a finite value: they differ
        error = math.inf
    agreement = float(agree[decided].float().mean()) if decided is not None and decided.any() else 1.0
    return error, agreement


def _top_k_log_probabilities(targets: TopKTargets) -> Tensor:
    kept = targets.values.float() / targets.temperature - targets.log_normalizer.float()[..., None]
    return torch.cat([kept, targets.log_rest.float()[..., None]], -1)


def _centred(values: Tensor, live: Tensor) -> Tensor:
    """``values`` less their mean over the ``live`` entries of each position (others 0)."""
    values = torch.where(live, values, torch.zeros_like(values))
    mean = values.sum(-1, keepdim=True) / live.sum(-1, keepdim=True).clamp_min(1)
    return torch.where(live, values - mean, torch.zeros_like(values))


__all__ = ["difference_from"]
