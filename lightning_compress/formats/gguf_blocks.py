"""Our QAT grids as GGUF block types, from the exact codes (never requantized).

A GGUF block covers 32 consecutive weights of a row with float16 parameters, so only a
group-32 grid with float16 scales can be written exactly. What each grid becomes
(``c``: our signed code, ``s``: the scale, ``z``: the zero point, ``w = s·(c − z)``):

- int4 symmetric → ``Q4_0``: ``d = s``, ``q = c + 8``; llama.cpp computes ``d·(q − 8)``.
- int8 symmetric → ``Q8_0``: ``d = s``, ``q = c``; ``d·q``.
- int5 symmetric → ``Q5_0``: ``d = s``, ``q = c + 16``; ``d·(q − 16)``.
- int4 asymmetric → ``Q4_1`` (``d·q + m``) when every block's minimum ``m`` is a float16
  number: either ``d = s, q = c + 8, m = −(z + 8)·s`` or ``d = −s, q = 7 − c,
  m = (7 − z)·s``, whichever is exact (both are when ``z`` is 0 or −1, the usual zero
  points of a range around zero). ``m`` is ``s`` times an integer up to 15, which float16
  holds only when ``s`` has spare mantissa bits; on trained weights about 3 blocks in 10
  fail, and then the layer is written as ``Q5_0`` (``d = s``, ``q = c − z + 16``:
  ``c − z`` is in [−15, 15]), exact at 5.5 bits a weight instead of 5.

Every product ``d·q`` and sum ``d·q + m`` above is exact in float32 (an 11-bit float16
mantissa times an integer of at most 5 bits), so llama.cpp's dequantization (and the
``gguf`` package's) gives ``s·(c − z)`` bit for bit: the value our fake quantization
computes. Other grids (group size other than 32, per-channel or per-tensor scales,
float32/bfloat16 scales, 2, 3, 6 or 7 bits, asymmetric int5/int8) have no GGUF type that
holds them exactly: :func:`gguf_type` says why, and the export refuses them.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from lightning_compress.quant.fake_quant import QuantizedWeight
from lightning_compress.quant.spec import QuantSpec

BLOCK = 32
# (bits, symmetric) -> GGUF type of a group-32 float16-scale grid
_TYPES = {(4, True): "Q4_0", (4, False): "Q4_1", (5, True): "Q5_0", (8, True): "Q8_0"}


def gguf_type(spec: QuantSpec) -> Tuple[Optional[str], str]:
    """The GGUF type a grid is written as (``None`` when none holds it exactly) and, for
    ``None``, why, with the setting to train instead."""
    problems = []
    if spec.granularity != "group" or spec.group_size != BLOCK:
        problems.append(f"{spec.granularity_label} scales (GGUF blocks are 32 weights: train group_size=32)")
    if spec.scale_dtype != "float16":
        problems.append(f"{spec.scale_dtype} scales (GGUF stores float16: train scale_dtype='float16')")
    kind = _TYPES.get((spec.bits, spec.symmetric))
    if kind is None:
        grid = f"int{spec.bits} {'symmetric' if spec.symmetric else 'asymmetric'}"
        problems.append(f"{grid} codes (GGUF's exact types: int4 symmetric Q4_0, int4 asymmetric Q4_1, int5"
                        " symmetric Q5_0, int8 symmetric Q8_0)")
    if problems:
        return None, "; ".join(problems)
    return kind, ""


def encode(weight: QuantizedWeight, kind: str, rows: Optional[torch.Tensor] = None) -> Tuple[np.ndarray, str]:
    """The GGUF blocks of ``weight`` (``uint8 [rows, blocks · block bytes]``) as ``kind``,
    with its rows reordered by ``rows`` (the rotary permutation of q/k projections; codes,
    scales and zero points move together). Returns the blocks and the type written, which
    is ``"Q5_0"`` for a ``"Q4_1"`` layer whose minimums float16 cannot hold."""
    # On the CPU: the blocks become numpy arrays (a model trained on a GPU packs its codes there).
    codes, scale, zero = weight.codes.cpu(), weight.scale.detach().cpu(), weight.zero_point.cpu()
    codes = codes.reshape(codes.shape[0], -1, BLOCK).to(torch.int16)
    scale = scale.reshape(codes.shape[0], -1).double()
    zero = zero.reshape(codes.shape[0], -1).to(torch.int16)
    if rows is not None:
        rows = rows.cpu()
        codes, scale, zero = codes[rows], scale[rows], zero[rows]
    if kind == "Q4_0":
        return _concat(_half(scale), _nibbles(codes + 8)), kind
    if kind == "Q8_0":
        return _concat(_half(scale), codes.to(torch.int8).numpy().view(np.uint8)), kind
    if kind == "Q5_0":
        return _q5_0(codes, scale, zero), kind
    if kind == "Q4_1":
        direct, flipped = -(zero + 8) * scale, (7 - zero) * scale
        use_direct = _exact_half(direct)
        if not bool((use_direct | _exact_half(flipped)).all()):
            return _q5_0(codes, scale, zero), "Q5_0"
        d = torch.where(use_direct, scale, -scale)
        m = torch.where(use_direct, direct, flipped)
        q = torch.where(use_direct[..., None], codes + 8, 7 - codes)
        return _concat(_half(d), _half(m), _nibbles(q)), kind
    raise ValueError(f"unknown GGUF type {kind!r}")


def q4_1_fallback_share(weight: QuantizedWeight) -> float:
    """The share of ``weight``'s blocks whose Q4_1 minimum float16 cannot hold."""
    scale = weight.scale.reshape(-1).double()
    zero = weight.zero_point.reshape(-1).double()
    exact = _exact_half(-(zero + 8) * scale) | _exact_half((7 - zero) * scale)
    return float((~exact).double().mean())


def _q5_0(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> np.ndarray:
    q = codes - zero[..., None] + 16  # in [1, 31]
    high = ((q >> 4) & 1).to(torch.int64) << torch.arange(BLOCK, dtype=torch.int64)
    qh = high.sum(-1).to(torch.int64).numpy().astype("<u4").view(np.uint8).reshape(*q.shape[:2], 4)
    return _concat(_half(scale), qh, _nibbles(q & 15))


def _nibbles(q: torch.Tensor) -> np.ndarray:
    """Byte ``j`` of a block: element ``j`` in the low nibble, ``j + 16`` in the high one."""
    q = q.to(torch.uint8)
    return (q[..., : BLOCK // 2] | (q[..., BLOCK // 2:] << 4)).numpy()


def _half(values: torch.Tensor) -> np.ndarray:
    return values.numpy().astype("<f2").view(np.uint8).reshape(*values.shape, 2)


def _exact_half(values: torch.Tensor) -> torch.Tensor:
    as_half = values.to(torch.float16)
    return torch.isfinite(as_half) & (as_half.double() == values)


def _concat(*parts: np.ndarray) -> np.ndarray:
    blocks = np.concatenate(parts, axis=-1)
    return np.ascontiguousarray(blocks.reshape(blocks.shape[0], -1))


__all__ = ["BLOCK", "encode", "gguf_type", "q4_1_fallback_share"]
