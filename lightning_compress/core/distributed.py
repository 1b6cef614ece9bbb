"""Keeping compression state identical on every rank."""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """The number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_rank_zero() -> bool:
    """Whether this process speaks for all (rank 0, or the only process)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def broadcast_from_rank_zero(tensors: List[Tensor]) -> List[Tensor]:
    """Return ``tensors`` as rank 0 holds them, on every rank, in one collective.

    Masks and quantizer ranges are computed on every rank from weights that DDP keeps
    identical; broadcasting rank 0's copy makes agreement a guarantee rather than a
    consequence of deterministic kernels (GPU top-k ties, reduction order).
    All tensors must share one dtype (pack masks to uint8 first: 1/8 of the bytes).
    """
    if not tensors or not is_distributed():
        return tensors
    flat = _for_backend(torch.cat([t.detach().flatten() for t in tensors]))
    dist.broadcast(flat, src=0)
    out, offset = [], 0
    for tensor in tensors:
        chunk = flat[offset : offset + tensor.numel()].view_as(tensor)
        out.append(chunk.to(tensor.device))
        offset += tensor.numel()
    return out


def all_reduce_max(tensor: Tensor) -> Tensor:
    """Element-wise maximum over ranks (``tensor`` itself when not distributed)."""
    if not is_distributed():
        return tensor
    reduced = _for_backend(tensor.detach().clone())
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    return reduced.to(tensor.device)


def all_reduce_mean_(tensors: List[Tensor]) -> None:
    """Average ``tensors`` over ranks in place (gradients DDP does not see)."""
    if tensors and is_distributed():
        _copy_back(_summed(tensors) / dist.get_world_size(), tensors)


def all_reduce_sum_(tensors: List[Tensor]) -> None:
    """Sum ``tensors`` over ranks in place, in one collective (statistics each rank
    gathered from its own batches: calibration Hessians, input-feature norms)."""
    if tensors and is_distributed():
        _copy_back(_summed(tensors), tensors)


def _for_backend(tensor: Tensor) -> Tensor:
    """``tensor`` where the backend can reduce it: NCCL takes CUDA tensors only (a CPU
    one, flags or statistics, travels through the GPU)."""
    return tensor.cuda() if dist.get_backend() == "nccl" else tensor


def _summed(tensors: List[Tensor]) -> Tensor:
    """``tensors`` flattened into one, summed over ranks (one collective), on their device."""
    flat = torch.cat([t.flatten() for t in tensors])
    reduced = _for_backend(flat)
    dist.all_reduce(reduced)
    return reduced.to(flat.device)


def _copy_back(flat: Tensor, tensors: List[Tensor]) -> None:
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()
