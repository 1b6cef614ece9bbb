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
    flat = torch.cat([t.detach().flatten() for t in tensors])
    if dist.get_backend() == "nccl":
        flat = flat.cuda()
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
    reduced = tensor.detach().clone()
    if dist.get_backend() == "nccl":  # (a CPU tensor, e.g. flags, travels through the GPU)
        reduced = reduced.cuda()
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    return reduced.to(tensor.device)


def all_reduce_mean_(tensors: List[Tensor]) -> None:
    """Average ``tensors`` over ranks in place (gradients DDP does not see)."""
    if not tensors or not is_distributed():
        return
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


def all_reduce_sum_(tensors: List[Tensor]) -> None:
    """Sum ``tensors`` over ranks in place, in one collective (statistics each rank
    gathered from its own batches: calibration Hessians, input-feature norms)."""
    if not tensors or not is_distributed():
        return
    flat = torch.cat([t.flatten() for t in tensors])
    reduced = flat.cuda() if dist.get_backend() == "nccl" else flat
    dist.all_reduce(reduced)
    flat = reduced.to(flat.device)
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()
