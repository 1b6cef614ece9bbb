"""Row blocks: per-layer work done a few rows at a time, so a large layer (an LLM's
vocabulary head: 32000 x 768 weights, 98 MB in float32) never has more than a block of
float temporaries beside it. Every grid keeps its groups inside a row, so row blocks give
bit for bit what the whole matrix gives."""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_compress.quant.fake_quant import QuantizedWeight, dequantize_codes, quantize_codes
from lightning_compress.quant.packing import pack_codes, packed_words, unpack_codes
from lightning_compress.quant.spec import QuantSpec

BLOCK_ELEMENTS = 1 << 22
"""Elements per block: 16 MB of float32 temporaries."""


def row_blocks(rows: int, cols: int, elements: int = BLOCK_ELEMENTS) -> Iterator[slice]:
    """Slices of ``rows`` holding about ``elements`` elements (rows of ``cols``) each."""
    step = max(1, elements // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def linear_in_row_blocks(x: Tensor, weight_rows: Callable[[slice], Tensor], out_features: int,
                         bias: Optional[Tensor]) -> Tensor:
    """``F.linear(x, weight, bias)`` with ``weight`` made a block of rows (output features)
    at a time by ``weight_rows(block)``, so a layer larger than a block (a vocabulary head)
    never has its whole float weight in memory. The output is written in place, a block of
    columns at a time (each column is the same dot product as in one ``F.linear``, up to
    the BLAS's summation order)."""
    out = x.new_empty(*x.shape[:-1], out_features)
    for block in row_blocks(out_features, x.shape[-1]):
        out[..., block] = F.linear(x, weight_rows(block), None if bias is None else bias[block].to(x.dtype))
    return out


def grid_rows(grid: Tensor, rows: slice, total_rows: int, spec: QuantSpec) -> Tensor:
    """The scales (or zero points) of ``rows``, from a grid of a ``total_rows``-row matrix
    (one per group, row-major; one for the whole tensor per tensor)."""
    if spec.granularity == "tensor":
        return grid
    return grid.reshape(total_rows, -1)[rows]


def quantize_rows(matrix: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """:func:`~lightning_compress.quant.fake_quant.quantize_codes` of ``matrix`` ``[rows,
    cols]``, a row block at a time."""
    codes = torch.empty(matrix.shape, dtype=torch.int8, device=matrix.device)
    for rows in row_blocks(*matrix.shape):
        codes[rows] = quantize_codes(matrix[rows], grid_rows(scale, rows, matrix.shape[0], spec),
                                     grid_rows(zero_point, rows, matrix.shape[0], spec), spec)
    return codes


def dequantizes_to(q: QuantizedWeight, weight: Tensor) -> bool:
    """Whether ``q.dequantize()`` equals ``weight`` bit for bit, compared a row block at a time."""
    codes = q.codes.reshape(q.shape[0], -1)
    if tuple(weight.shape) != tuple(q.shape):
        return False
    matrix = weight.reshape(codes.shape)
    # Smaller blocks than the default: the whole effective weight is held beside them.
    for rows in row_blocks(*codes.shape, BLOCK_ELEMENTS // 4):
        block = dequantize_codes(codes[rows], grid_rows(q.scale, rows, codes.shape[0], q.spec),
                                 grid_rows(q.zero_point, rows, codes.shape[0], q.spec), q.spec)
        if not torch.equal(block.to(q.dtype).to(matrix.device), matrix[rows]):
            return False
    return True


PACK_ELEMENTS = 1 << 20
"""Codes per block when packing: bit widths other than 2, 4 and 8 hold an int64 per bit
while packing (24 MB for a block of 3-bit codes)."""


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """:func:`~lightning_compress.quant.packing.pack_codes`, a block at a time (rows of a
    matrix; runs of 32 codes, a whole number of words at any width, of a 1-D tensor)."""
    if codes.dim() == 1:
        out = torch.empty(packed_words(codes.numel(), bits), dtype=torch.int32, device=codes.device)
        step = PACK_ELEMENTS  # a multiple of 32
        for start in range(0, codes.numel(), step):
            part = pack_codes(codes[start: start + step], bits)
            out[start // 32 * bits: start // 32 * bits + part.numel()] = part
        return out
    out = torch.empty(codes.shape[0], packed_words(codes.shape[1], bits), dtype=torch.int32, device=codes.device)
    for rows in row_blocks(*codes.shape, PACK_ELEMENTS):
        out[rows] = pack_codes(codes[rows], bits)
    return out


def unpack_rows(packed: Tensor, bits: int, cols: int) -> Tensor:
    """:func:`~lightning_compress.quant.packing.unpack_codes`, a block at a time (``cols``:
    codes per row, or in all for a 1-D tensor)."""
    if packed.dim() == 1:
        out = torch.empty(cols, dtype=torch.int8, device=packed.device)
        for start in range(0, cols, PACK_ELEMENTS):
            count = min(PACK_ELEMENTS, cols - start)
            first = start // 32 * bits
            out[start: start + count] = unpack_codes(packed[first: first + packed_words(count, bits)], bits, count)
        return out
    out = torch.empty(packed.shape[0], cols, dtype=torch.int8, device=packed.device)
    for rows in row_blocks(packed.shape[0], cols, PACK_ELEMENTS):
        out[rows] = unpack_codes(packed[rows], bits, cols)
    return out


def finite(tensor: Tensor, allow_infinite: bool = False) -> bool:
    """No NaN (and, unless ``allow_infinite``, no infinity) in ``tensor``, checked a block at a
    time: ``torch.isfinite`` of a whole 98 MB embedding holds 110 MB of temporaries."""
    if not tensor.is_floating_point():
        return True
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), BLOCK_ELEMENTS):
        block = flat[start: start + BLOCK_ELEMENTS]
        if (block.isnan().any() if allow_infinite else not torch.isfinite(block).all()):
            return False
    return True


def has_infinite(tensor: Tensor) -> bool:
    """Whether ``tensor`` holds an infinity, checked a block at a time."""
    flat = tensor.reshape(-1)
    return tensor.is_floating_point() and any(
        bool(flat[start: start + BLOCK_ELEMENTS].isinf().any()) for start in range(0, flat.numel(), BLOCK_ELEMENTS))


__all__ = ["BLOCK_ELEMENTS", "PACK_ELEMENTS", "dequantizes_to", "finite", "grid_rows", "has_infinite", "pack_rows",
           "quantize_rows", "row_blocks", "unpack_rows"]


class WordsWeight(QuantizedWeight):
    """A :class:`~lightning_compress.quant.fake_quant.QuantizedWeight` read from a file,
    whose sub-8-bit codes stay in the file's ``words`` (:func:`pack_rows`' int32 layout:
    rows of ``cols`` codes) until ``codes`` is first read. The packed loader keeps the
    words as they are: an int4 layer's int8 codes (twice its words) and the repacking of
    them never exist (a 65.5M-weight int4 g128 head, a 35 MB file, peaked at 3.48x the
    file's size while loading, 1.41x now)."""

    def __init__(self, words: Optional[Tensor] = None, cols: int = 0, *, codes: Optional[Tensor] = None,
                 **fields) -> None:
        self.words, self.cols, self._codes = words, cols, None
        super().__init__(codes=codes, **fields)  # given codes (dataclasses.replace) replace the words

    @property
    def codes(self) -> Tensor:
        if self._codes is None:  # unpacked once, on demand (checks and other formats read them)
            self._codes = unpack_rows(self.words, self.spec.bits, self.cols)
        return self._codes

    @codes.setter
    def codes(self, value: Optional[Tensor]) -> None:
        if value is not None:  # the words no longer hold the codes
            self._codes, self.words = value, None
