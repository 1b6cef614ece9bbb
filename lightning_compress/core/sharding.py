"""Reading and writing parameters that FSDP2 (``fully_shard``) has sharded.

Under FSDP2 a layer's parameters are ``DTensor`` shards between forward passes and
plain full tensors inside them. Compression state (masks, quantizer ranges, adapters,
NF4 bases) is computed from full tensors, so the same numbers come out as in an
unsharded run: a callback gathers the full tensor (a collective every rank joins, one
parameter at a time, so the extra memory is one full parameter) and writes its result
back as this rank's shard.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import Tensor, nn

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch built without distributed support
    DTensor = None  # type: ignore[assignment,misc]
try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:
    FSDPModule = None  # type: ignore[assignment,misc]


def is_shard(tensor: object) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter FSDP2 holds sharded)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def full(tensor: Tensor) -> Tensor:
    """The whole tensor: gathered from every rank for a shard (every rank must call
    this for the same parameter), ``tensor`` itself otherwise."""
    if not is_shard(tensor):
        return tensor
    return _settled(tensor.full_tensor())


def _settled(tensor: Tensor) -> Tensor:
    """``tensor`` with every gathered part a plain tensor: ``full_tensor()`` answers with
    an ``AsyncCollectiveTensor`` (inside the parts of a subclass such as NF4 too), which
    would pickle into checkpoints and compression state as a class ``weights_only``
    loading refuses."""
    if hasattr(tensor, "trigger_wait") and hasattr(tensor, "wait"):  # an AsyncCollectiveTensor
        return tensor.wait()
    if hasattr(tensor, "__tensor_flatten__"):
        for name in tensor.__tensor_flatten__()[0]:
            setattr(tensor, name, _settled(getattr(tensor, name)))
    return tensor


def local(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this rank stores: the local shard of a ``DTensor``."""
    return tensor.to_local() if is_shard(tensor) else tensor


def shard_like(value: Tensor, like: Tensor) -> Tensor:
    """This rank's shard of the full tensor ``value``, laid out as ``like`` is sharded
    (``value`` itself when ``like`` is not a shard). No communication: every rank holds
    ``value`` and cuts its own piece."""
    if not is_shard(like):
        return value
    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None).to_local()


def saves_distributed_checkpoint(trainer: object) -> bool:
    """Whether ``trainer`` saves Lightning's distributed checkpoint (a folder of shards,
    ``ModelParallelStrategy``'s default), which torch.distributed.checkpoint loads into
    the whole model before any hook sees the checkpoint."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = getattr(trainer, "strategy", None)
    return isinstance(strategy, ModelParallelStrategy) and bool(getattr(strategy, "_save_distributed_checkpoint", True))


def is_sharded_model(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` or anything under it."""
    return FSDPModule is not None and any(isinstance(m, FSDPModule) for m in module.modules())


def has_collective_forward(module: nn.Module) -> bool:
    """Whether ``module``'s forward runs collectives every rank must join: FSDP2 applied
    under it, or ``DTensor`` parameters (tensor parallel) however they were made."""
    return is_sharded_model(module) or any(is_shard(p) for p in module.parameters())


def resharded(module: nn.Module) -> None:
    """Put every FSDP2 module under ``module`` back to its shards (local, no collective).

    FSDP2 leaves the root's own parameters gathered after a forward without backward (a
    validation loop, the sanity check): those are then FSDP2's temporary buffers, which
    a write would not reach the shards through, and which it frees under anything that
    still uses them. Compression that reads or writes parameters outside a training step
    starts from the shards."""
    for m in module.modules():
        if FSDPModule is not None and isinstance(m, FSDPModule):
            m.reshard()


@contextlib.contextmanager
def gathered(module: nn.Module, *, here: bool = True) -> Iterator[None]:
    """Inside, ``module`` is a plain model holding full copies of its parameters: each
    FSDP2 shard is gathered (a collective: every rank must enter), and FSDP2's classes
    and hooks are taken off, so its forward passes and ``state_dict`` run locally (rank 0
    alone can then run the export and its parity check). The memory is a whole copy of
    the model's parameters for the duration, on the ranks that pass ``here=True``; the
    others join each gather and drop its result at once (one parameter at a time) and
    must not use ``module`` inside.

    Writes to the copies are lost when it exits: change parameters outside it, each rank
    its own piece (:func:`local`, :func:`shard_like`).
    """
    if not is_sharded_model(module):
        yield
        return
    resharded(module)
    if not here:
        for m in module.modules():
            for shard in [p for p in m._parameters.values() if is_shard(p)]:
                full(shard)
        yield
        return
    # Full copies swapped in for the shards (FSDP2's own unshard buffers would be freed
    # under anything the export derives from them), in one order on every rank.
    saved = []
    for m in module.modules():
        shards = {name: p for name, p in m._parameters.items() if is_shard(p)}
        saved.append((m, m.__class__, {name: getattr(m, name) for name in _HOOK_DICTS}, shards))
        for name, shard in shards.items():
            m._parameters[name] = nn.Parameter(full(shard), requires_grad=shard.requires_grad)
    try:
        for m, cls, hooks, _ in saved:
            if isinstance(m, FSDPModule):
                m.__class__ = next(base for base in cls.__mro__ if not issubclass(base, FSDPModule))
            for name, entries in hooks.items():
                setattr(m, name, type(entries)((k, h) for k, h in entries.items() if not _is_fsdp_hook(h)))
        yield
    finally:
        for m, cls, hooks, shards in saved:
            m.__class__ = cls
            for name, entries in hooks.items():
                setattr(m, name, entries)
            m._parameters.update(shards)


# The hook tables FSDP2 registers in: forward (to gather and free shards), state_dict and
# load_state_dict (to return and take shards).
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_state_dict_pre_hooks", "_state_dict_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _is_fsdp_hook(hook: object) -> bool:
    function = getattr(hook, "func", hook)  # a functools.partial
    return getattr(function, "__module__", "").startswith("torch.distributed.fsdp")
