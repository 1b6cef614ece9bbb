"""4-bit NormalFloat (NF4) weights for QLoRA, on torchao's ``NF4Tensor``.

NF4 (Dettmers et al. 2023) stores each weight as one of 16 quantiles of N(0, 1), scaled
by the absolute maximum of its block of ``block_size`` weights. Double quantization
stores those block scales in 8 bits, in blocks of ``scaler_block_size`` after subtracting
their mean. torchao's tensor does both, runs on CPU and CUDA, dequantizes inside
``F.linear`` (saving only the 4-bit tensor for backward), and is an allowed global for
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_compress._torchao import import_torchao

try:
    _nf4 = import_torchao("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
except ModuleNotFoundError:  # torchao < 0.18 kept NF4Tensor under dtypes/ (the same class)
    _nf4 = import_torchao("torchao.dtypes.nf4tensor")
NF4Tensor = _nf4.NF4Tensor

NF4_BLOCK_SIZE = 64
NF4_SCALER_BLOCK_SIZE = 256


def nf4_sharding_issue() -> str | None:
    """Why FSDP2 cannot all-gather an NF4 weight with this torch and torchao, or None.

    From torch 2.11 FSDP2 wraps each all-gathered shard with
    ``_c10d_functional._wrap_tensor_autograd``; torchao's NF4Tensor handles that op only
    in its newer releases (0.18 does, 0.13 does not), and fails inside the first forward.
    """
    op = getattr(torch.ops._c10d_functional, "_wrap_tensor_autograd", None)
    if op is None or op.default in _nf4.NF4_OPS_TABLE:
        return None
    import torchao

    return (f"QLoRA under FSDP2: torch {torch.__version__} wraps FSDP2's all-gathered shards with"
            f" _c10d_functional._wrap_tensor_autograd, which torchao {torchao.__version__}'s NF4Tensor does not"
            " handle; upgrade torchao (0.18 handles it), or train QLoRA with DDP")


def check_nf4_compatible(name: str, weight: Tensor, block_size: int, scaler_block_size: int) -> None:
    """Raise a ValueError naming layer ``name`` if its weight cannot be stored in NF4 blocks.

    The weight is quantized flattened, so its size must split into blocks of
    ``block_size``, and the number of blocks into scale blocks of ``scaler_block_size``.
    """
    numel = weight.numel()
    if weight.dim() > 2:
        raise ValueError(f"layer {name!r}: NF4 stores 1-D or 2-D weights, got shape {tuple(weight.shape)}")
    if numel % block_size:
        raise ValueError(
            f"layer {name!r}: `nf4_block_size`={block_size} does not divide its {numel} weights"
            f" (shape {tuple(weight.shape)}); choose a block size that divides it, or exclude the layer"
        )
    blocks = numel // block_size
    if blocks % scaler_block_size:
        raise ValueError(
            f"layer {name!r}: its {blocks} NF4 blocks do not split into `nf4_scaler_block_size`="
            f"{scaler_block_size} scale blocks; choose a scaler block size that divides {blocks},"
            " or exclude the layer"
        )


def to_nf4(weight: Tensor, block_size: int = NF4_BLOCK_SIZE, scaler_block_size: int = NF4_SCALER_BLOCK_SIZE) -> Tensor:
    """Quantize ``weight`` to an NF4 tensor that dequantizes to ``weight.dtype``."""
    return _nf4.to_nf4(weight.detach().contiguous(), block_size, scaler_block_size)


def copy_nf4(tensor: Tensor) -> Tensor:
    """An exact copy of an NF4 tensor: its codes and scales cloned.

    ``copy.deepcopy`` goes through torchao's ``clone``, which quantizes the dequantized
    weight again with the default block sizes: a different tensor, or an error for block
    sizes that do not divide it that way.
    """
    names, context = tensor.__tensor_flatten__()
    inner = {name: getattr(tensor, name).clone() for name in names}
    return NF4Tensor.__tensor_unflatten__(inner, context, tensor.size(), tensor.stride())


def nf4_deepcopy_memo(module: nn.Module) -> dict:
    """Entries for ``copy.deepcopy(module, memo)`` that copy its NF4 parameters exactly."""
    return {
        id(p): nn.Parameter(copy_nf4(p), requires_grad=p.requires_grad)
        for _, p in module.named_parameters(remove_duplicate=False)
        if is_nf4(p)
    }


def is_nf4(tensor: Tensor) -> bool:
    return isinstance(tensor, NF4Tensor)


def dequantize_nf4(tensor: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The dense weight an NF4 tensor stands for (in ``dtype``, default its own)."""
    dense = tensor.get_original_weight()
    return dense if dtype is None else dense.to(dtype)


def storage_tensors(tensor: Tensor) -> list:
    """The plain tensors that hold ``tensor``: NF4's codes, scales and tables, else itself."""
    if is_nf4(tensor):
        names, _ = tensor.__tensor_flatten__()
        return [getattr(tensor, n) for n in names]
    return [tensor]


def weight_nbytes(tensor: Tensor) -> int:
    """Bytes a weight occupies: packed codes, scales and tables for NF4; plain size otherwise."""
    return sum(t.numel() * t.element_size() for t in storage_tensors(tensor))


def tensor_digest(digest, tensor: Tensor) -> None:
    """Feed the bytes that store ``tensor`` (NF4: its codes and scales) into a hashlib digest."""
    for part in storage_tensors(tensor):
        flat = part.detach().cpu().reshape(-1)
        if flat.dtype == torch.bfloat16:  # numpy has no bfloat16: hash its bits
            flat = flat.view(torch.int16)
        digest.update(flat.numpy().tobytes())
