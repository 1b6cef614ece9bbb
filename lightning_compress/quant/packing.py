"""Dense integer packing of quantization codes into int32 words (pure torch).

The layout is compressed-tensors' ``pack-quantized``: a signed ``bits``-bit code ``q`` is
stored unsigned as ``q + 2**(bits-1)``, and the codes of a row form one little-endian
bit stream, code ``i`` at bits ``[i*bits, (i+1)*bits)``, cut into int32 words. For 4 bits
this is 8 codes a word, low nibble first; for 3, 5, 6 and 7 bits codes straddle word
boundaries, so no bit is wasted. A row of ``n`` codes takes ``ceil(n * bits / 32)`` words.

The fast paths (2, 4 and 8 bits) read the words as bytes and so assume a little-endian
host; other hosts, and other bit widths, take the general bit-matrix path.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import Tensor

_LITTLE_ENDIAN = sys.byteorder == "little"


def packed_words(count: int, bits: int) -> int:
    """int32 words that hold ``count`` codes of ``bits`` bits."""
    return -(-count * bits // 32)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack int8 codes ``[rows, cols]`` (in ``[-2**(bits-1), 2**(bits-1) - 1]``) into int32
    ``[rows, ceil(cols * bits / 32)]``. A 1-D tensor is packed as one row and stays 1-D."""
    _check_bits(bits)
    if codes.dtype != torch.int8:
        raise TypeError(f"codes must be int8, got {codes.dtype}")
    flat = codes.dim() == 1
    rows = codes.reshape(1, -1) if flat else codes
    if rows.dim() != 2:
        raise ValueError(f"codes must be 1-D or 2-D, got shape {tuple(codes.shape)}")
    count, cols = rows.shape
    words = packed_words(cols, bits)
    if _LITTLE_ENDIAN and bits in (2, 4, 8):
        return _pack_bytes(rows, bits, words).view(-1) if flat else _pack_bytes(rows, bits, words)
    unsigned = rows.to(torch.int64) + (1 << (bits - 1))
    # One little-endian bit stream per row, padded to whole words.
    shifts = torch.arange(bits, device=codes.device)
    stream = ((unsigned.unsqueeze(-1) >> shifts) & 1).reshape(count, cols * bits)
    stream = torch.nn.functional.pad(stream, (0, words * 32 - cols * bits))
    weights = torch.ones(32, dtype=torch.int64, device=codes.device) << torch.arange(32, device=codes.device)
    packed = (stream.view(count, words, 32) * weights).sum(dim=-1)
    # Values up to 2**32 - 1 wrap into int32's two's complement, as in compressed-tensors.
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return packed.view(-1) if flat else packed


def unpack_codes(packed: Tensor, bits: int, cols: int) -> Tensor:
    """Inverse of :func:`pack_codes`: int32 words → int8 codes ``[rows, cols]`` (or 1-D)."""
    _check_bits(bits)
    if packed.dtype != torch.int32:
        raise TypeError(f"packed codes must be int32, got {packed.dtype}")
    flat = packed.dim() == 1
    rows = packed.reshape(1, -1) if flat else packed
    count, words = rows.shape
    if words != packed_words(cols, bits):
        raise ValueError(f"{words} words per row cannot hold {cols} codes of {bits} bits")
    offset = 1 << (bits - 1)
    if _LITTLE_ENDIAN and bits in (2, 4, 8):
        out = _unpack_bytes(rows, bits, cols, offset)
    else:
        shifts = torch.arange(32, device=packed.device)
        stream = (rows.to(torch.int64).unsqueeze(-1) >> shifts) & 1
        stream = stream.reshape(count, words * 32)[:, : cols * bits].view(count, cols, bits)
        values = (stream << torch.arange(bits, device=packed.device)).sum(dim=-1)
        out = (values - offset).to(torch.int8)
    return out.reshape(-1) if flat else out


def unpack_biased(packed: Tensor, bits: int, cols: int) -> Optional[Tensor]:
    """The stored (biased, unsigned) codes ``q + 2**(bits-1)`` as uint8 ``[rows, cols]``,
    for 2 and 4 bits on a little-endian host; ``None`` where only :func:`unpack_codes`
    applies. The runtime's dequantization subtracts ``zero_point + 2**(bits-1)`` from these
    directly, which skips :func:`unpack_codes`' signed int8 copy (half the passes)."""
    if not (_LITTLE_ENDIAN and bits in (2, 4)) or packed.dtype != torch.int32 or packed.dim() != 2:
        return None
    if packed.shape[1] != packed_words(cols, bits):
        raise ValueError(f"{packed.shape[1]} words per row cannot hold {cols} codes of {bits} bits")
    # reshape(-1) first: a contiguous [n, 1] tensor may still carry a stride other than 1.
    data = packed.contiguous().reshape(-1).view(torch.uint8).view(packed.shape[0], -1)  # low byte first
    per_byte = 8 // bits
    out = torch.empty(*data.shape, per_byte, dtype=torch.uint8, device=data.device)
    mask = (1 << bits) - 1
    for slot in range(per_byte):  # code `slot` of each byte sits at bits [slot*bits, (slot+1)*bits)
        torch.bitwise_and(data if slot == 0 else data >> (slot * bits), mask, out=out[..., slot])
    out = out.view(data.shape[0], -1)
    return out if out.shape[1] == cols else out[:, :cols]


def _pack_bytes(rows: Tensor, bits: int, words: int) -> Tensor:
    # Codes of 2, 4 and 8 bits never straddle a byte: build the bytes, read them as words
    # (a 2048x2048 int4 matrix: 19x faster than the bit stream, which holds an int64 per bit).
    count, cols = rows.shape
    per_byte = 8 // bits
    unsigned = (rows.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
    unsigned = torch.nn.functional.pad(unsigned, (0, words * 4 * per_byte - cols))  # zero bits, as the stream pads
    codes = unsigned.view(count, words * 4, per_byte)
    data = codes[..., 0].clone()
    for slot in range(1, per_byte):  # code `slot` of each byte at bits [slot*bits, (slot+1)*bits)
        data |= codes[..., slot] << (slot * bits)
    return data.view(torch.int32).view(count, words)


def _unpack_bytes(rows: Tensor, bits: int, cols: int, offset: int) -> Tensor:
    # Codes of 2, 4 and 8 bits never straddle a byte: split bytes instead of words.
    # reshape(-1) first: a contiguous [n, 1] tensor may still carry a stride other than 1.
    data = rows.contiguous().reshape(-1).view(torch.uint8).view(rows.shape[0], -1)
    if bits == 8:
        values = data
    elif bits == 4:
        values = torch.stack((data & 0xF, data >> 4), dim=-1)
    else:
        values = torch.stack((data & 3, (data >> 2) & 3, (data >> 4) & 3, data >> 6), dim=-1)
    values = values.reshape(rows.shape[0], -1)[:, :cols]
    return (values.to(torch.int16) - offset).to(torch.int8)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int from 1 to 8, got {bits!r}")
