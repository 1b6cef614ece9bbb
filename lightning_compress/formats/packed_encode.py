"""Encoding a packed model's tensors (the layout is in :mod:`lightning_compress.formats.packed`):
one quantized layer, or one float tensor, at a time."""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from torch import Tensor

from lightning_compress.core.targeting import parameter_key
from lightning_compress.formats.blocks import has_infinite, pack_rows
from lightning_compress.formats.packed import DTYPES, PackedLayer, dtype_name
from lightning_compress.quant.fake_quant import QuantizedWeight
from lightning_compress.quant.packing import packed_words
from lightning_compress.sparsity.masks import pack_mask


def _scale_shape(q: QuantizedWeight) -> tuple:
    if q.spec.granularity == "tensor":
        return (1,)
    return (q.shape[0], -1)


def encode_layer(name: str, layer: PackedLayer, sparse_threshold: Optional[float], pack_8bit: bool = False):
    """Tensors and metadata entry of one quantized layer (``pack_8bit``: 8-bit codes too in int32)."""
    q, spec, p = layer.weight, layer.weight.spec, (f"{name}." if name else "")
    w = parameter_key(name, layer.param)  # the weight's tensors: `p.weight`, `p.weight_scale`, ...
    matrix = q.codes.reshape(q.shape[0], -1)
    zero = q.zero_point.reshape(-1, 1).to(torch.int8)
    width = matrix.numel() // zero.numel()
    kept = (matrix.reshape(-1, width) != zero).reshape(-1)
    bits = spec.bits
    packed = bits < 8 or pack_8bit
    dense_bits = matrix.shape[0] * packed_words(matrix.shape[1], bits) * 32 if packed else matrix.numel() * 8
    count = int(torch.count_nonzero(kept))
    sparse_bits = math.ceil(matrix.numel() / 8) * 8 + packed_words(count, bits) * 32
    sparse = _use_sparse(matrix.numel(), count, dense_bits, sparse_bits, sparse_threshold)
    tensors: Dict[str, Tensor] = {}
    if sparse:
        values = matrix.reshape(-1)[kept]
        tensors[w + "_bitmask"] = pack_mask(kept)
        if packed:
            tensors[w + "_packed"] = pack_rows(values, bits)
        else:
            tensors[w] = values.contiguous()
    elif packed:
        tensors[w + "_packed"] = pack_rows(matrix, bits)
    else:
        tensors[w] = q.codes.reshape(q.shape).contiguous()
    if packed:
        tensors[w + "_shape"] = torch.tensor(q.shape, dtype=torch.int64)
    scale_dtype = DTYPES[spec.scale_dtype]
    tensors[w + "_scale"] = q.scale.reshape(_scale_shape(q)).to(scale_dtype).contiguous()
    if not spec.symmetric:
        zero_point = q.zero_point.reshape(_scale_shape(q)).to(torch.int8)
        if packed and spec.granularity != "tensor":
            zero_point = pack_rows(zero_point.t().contiguous(), bits).t()
        tensors[w + "_zero_point"] = zero_point.contiguous()
    if layer.activations == "int8_static":
        scale, zero_point = layer.input_qparams
        tensors[p + "input_scale"] = scale.reshape(1).float()
        tensors[p + "input_zero_point"] = zero_point.reshape(1).to(torch.int8)
    entry = {
        "module": layer.module,
        **({} if layer.param == "weight" else {"param": layer.param}),
        "shape": list(q.shape),
        "dtype": dtype_name(q.dtype),
        "bits": bits,
        "granularity": spec.granularity,
        "group_size": spec.group_size,
        "symmetric": spec.symmetric,
        "scale_dtype": spec.scale_dtype,
        "packing": "int32-dense" if packed else "int8",
        "sparsity": "bitmask" if sparse else "dense",
        "kept": count,
        "activations": layer.activations,
        "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
    }
    return tensors, entry


def encode_tensor(key: str, tensor: Tensor, sparse_threshold: Optional[float]) -> tuple[dict, dict]:
    """Tensors and metadata entry of one unquantized state-dict tensor."""
    tensor = tensor.detach().cpu().contiguous()
    count = int(torch.count_nonzero(tensor))
    bits = tensor.element_size() * 8
    sparse = tensor.is_floating_point() and _use_sparse(
        tensor.numel(), count, tensor.numel() * bits, math.ceil(tensor.numel() / 8) * 8 + count * bits, sparse_threshold
    )
    entry = {"shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype), "sparsity": "dense",
             **({"infinite": True} if has_infinite(tensor) else {})}  # -inf masks
    if not sparse:
        return {key: tensor}, entry
    kept = (tensor != 0).reshape(-1)
    entry.update(sparsity="bitmask", kept=count)
    return {key + "_bitmask": pack_mask(kept), key + "_values": tensor.reshape(-1)[kept].contiguous()}, entry


def _use_sparse(numel: int, kept: int, dense_bits: int, sparse_bits: int, threshold: Optional[float]) -> bool:
    if threshold is None or numel == 0:
        return False
    return 1 - kept / numel >= threshold and sparse_bits < dense_bits


__all__ = ["encode_layer", "encode_tensor"]
