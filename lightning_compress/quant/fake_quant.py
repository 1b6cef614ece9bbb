"""Fake quantization: the grid torchao uses, computed with PyTorch's fused kernels.

Quantization parameters follow torchao's ``choose_qparams_affine`` formulas exactly:

- symmetric: ``scale = max(|min|, |max|) / ((qmax - qmin) / 2)``, zero point 0 (this is
  the grid of torchao's ``IntxFakeQuantizer`` for per-channel and per-group weights);
- asymmetric: ``scale = (max(max, 0) - min(min, 0)) / (qmax - qmin)``,
  ``zero_point = clamp(qmin - round(min(min, 0) / scale))``: zero is always on the grid.
  (torchao's ``IntxFakeQuantizer`` takes a tinygemm float zero point for asymmetric
  groups and truncates it to an integer, which leaves zero off the grid; we keep to the
  zero-preserving primitive so pruned weights stay exactly zero.)

Rounding is ``q = clamp(round(x * (1 / scale)) + zero_point, qmin, qmax)``,
``x_hat = (q - zero_point) * scale``. :func:`fake_quantize` computes it on a
``[groups, group_size]`` view with vectorized elementwise ops (about 2x faster on CPU than
PyTorch's scalar ``fake_quantize_per_channel_affine`` kernel, and bit-identical to it);
its backward is the straight-through estimator with clipping: gradient 1 where the code
was inside the grid, 0 where it was clamped. The tests check everything against torchao
bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch
from torch import Tensor

from lightning_compress.quant.spec import QuantSpec


def as_matrix(weight: Tensor) -> Tensor:
    """``[out, in]`` view of a Linear/Embedding weight, ``[out, in * kernel]`` of a Conv."""
    return weight.reshape(weight.shape[0], -1)


def group_width(matrix_shape: torch.Size | tuple, spec: QuantSpec) -> int:
    """Number of consecutive elements of a matrix row that share one scale."""
    if spec.granularity == "group":
        return spec.group_size
    if spec.granularity == "channel":
        return matrix_shape[1]
    return matrix_shape[0] * matrix_shape[1]


def check_divisible(name: str, weight: Tensor, spec: QuantSpec, one_grid: bool = False) -> None:
    """Raise ``ValueError`` naming the layer when ``group_size`` does not divide its rows,
    with the fix: another grid for the layer (an override), or, with ``one_grid`` (every
    layer on the same grid, as the sensitivity analysis measures), another for all."""
    if spec.granularity != "group":
        return
    # From the shape alone: an NF4 base (QLoRA) has no float view to reshape.
    width = math.prod(weight.shape[1:])
    if width % spec.group_size:
        divisors = [g for g in (256, 128, 64, 32, 16, 8) if width % g == 0]
        if one_grid:
            smaller = [g for g in divisors if g < width]
            other = f"a `group_size` that divides it (e.g. {smaller[0]}), or none" if smaller else "no `group_size`"
            fix = ("every layer is measured on one grid: leave it out (`exclude`, --exclude on the command line), or"
                   f" choose {other} (one scale per output channel)")
        else:
            fix = (f"use group_size={divisors[0]}" if divisors else "use granularity='channel'") + \
                " for it with an override, or add it to `exclude`"
        raise ValueError(f"`group_size`={spec.group_size} does not divide the input size {width} of layer"
                         f" {name!r}; {fix}")


def choose_qparams(
    matrix: Tensor, spec: QuantSpec, eps: float | None = None, clip: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Scales (float32) and integer zero points (int32), one per group, shaped ``[n_groups]``.

    Groups are consecutive runs of :func:`group_width` elements in row-major order.
    ``clip`` (one ratio in ``(0, 1]`` per group) shrinks each group's min/max range
    before the grid is fitted to it: see :func:`choose_qparams_mse`.
    """
    width = group_width(matrix.shape, spec)
    groups = matrix.detach().reshape(-1, width)
    storage = getattr(torch, spec.scale_dtype)
    if eps is None:
        eps = torch.finfo(matrix.dtype).smallest_normal
    # A scale must survive storage in `scale_dtype`: at least its smallest normal number.
    eps = max(eps, torch.finfo(storage).smallest_normal)
    if spec.symmetric:
        # max(-min(low, 0), max(high, 0)) == max(-min, max) == max|x| exactly; aminmax reads the
        # groups once without the float copy `abs()` makes (94 MB for a 32000x768 head).
        low, high = torch.aminmax(groups, dim=1)
        reach = torch.maximum(high, low.neg_())
        scale = (reach if clip is None else reach * clip) / _divisor(float(spec.qmax - spec.qmin) / 2, reach)
        scale = _round_to_storage(torch.clamp(scale, min=eps), storage)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        low, high = torch.aminmax(groups, dim=1)
        low, high = torch.clamp(low, max=0.0), torch.clamp(high, min=0.0)
        if clip is not None:
            low, high = low * clip, high * clip
        scale = _round_to_storage(torch.clamp((high - low) / _divisor(float(spec.qmax - spec.qmin), low), min=eps),
                                  storage)
        zero_point = torch.clamp(spec.qmin - torch.round(low / scale), spec.qmin, spec.qmax)
        zero_point = zero_point.to(torch.int32)
    return scale.to(torch.float32), zero_point


# Clipping ratios tried by choose_qparams_mse, largest first (ties keep the larger range).
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0, 0.95, ..., 0.5


@torch.no_grad()
def choose_qparams_mse(matrix: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Scales, zero points and the clipping ratio of each group, the ratio being the one of
    :data:`CLIP_RATIOS` whose clipped min/max range gives the least squared quantization
    error; ``choose_qparams(matrix, spec, clip=ratio)`` gives the same grid again.

    Min/max ranges give the largest weights of a group all the resolution; at 4 bits
    and below, clipping a few of them buys a finer step for the rest. On the char-LM QAT
    benchmark (int4 g32) this clipping alone took round-to-nearest perplexity from 7.495
    to 7.413 (float: 7.154).
    """
    groups = matrix.detach().float()
    rows = groups.reshape(-1, group_width(matrix.shape, spec)).shape[0]
    best = None
    for ratio in CLIP_RATIOS:
        clip = torch.full((rows,), ratio, device=groups.device)
        scale, zero_point = choose_qparams(groups, spec, clip=clip)
        error = (fake_quantize(groups, scale, zero_point, spec) - groups).reshape(rows, -1).square().sum(dim=1)
        if best is None:
            best = [scale, zero_point, clip, error]
            continue
        better = error < best[3]
        best = [torch.where(better, new, old) for new, old in zip((scale, zero_point, clip, error), best)]
    return best[0], best[1], best[2]


def _divisor(value: float, like: Tensor) -> Tensor:
    """``value`` as a tensor on ``like``'s device. Dividing a CUDA tensor by a Python number
    multiplies it by the number's reciprocal, which differs from the quotient in the last
    bit; a tensor divisor divides on every device, so a grid chosen on a GPU is the grid
    the CPU chooses (the export's checks and the ONNX check recompute it there)."""
    return torch.full((), value, dtype=like.dtype, device=like.device)  # a fill: no copy from the host


def _round_to_storage(scale: Tensor, storage: torch.dtype) -> Tensor:
    if storage == torch.float32:
        return scale
    return scale.to(storage).to(scale.dtype)


class _RoundClampSTE(torch.autograd.Function):
    """``clamp(round(x / s), lo, hi) * s`` with a clipped straight-through gradient."""

    @staticmethod
    def forward(ctx, groups: Tensor, scale: Tensor, low, high) -> Tensor:
        # In place where the arithmetic allows: this runs on every weight every step, and
        # fewer temporaries measured 26% faster on a 3072x768 weight.
        codes = groups * (1.0 / scale)
        codes.round_()
        # The clipping mask is taken before the clamp so that the clamp runs in place: one
        # float temporary of the weight's size, not two (94 MB less for a 32000x768 head).
        ctx.save_for_backward(codes.ge(low).logical_and_(codes.le(high)))
        return codes.clamp_(low, high).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad, 0.0), None, None, None


class _ScaledRoundClampSTE(torch.autograd.Function):
    """:class:`_RoundClampSTE`'s forward; EWGS's gradient (see :func:`ewgs_gradient`)."""

    @staticmethod
    def forward(ctx, groups: Tensor, scale: Tensor, low, high, delta: float) -> Tensor:
        # The backward recomputes the codes from the weight, kept in its own dtype (a bf16
        # weight: not a float32 copy, which would be twice its size); the float32 forward and
        # backward compute on an exact float32 view of it.
        ctx.save_for_backward(groups, scale)
        ctx.low, ctx.high, ctx.delta = low, high, delta
        return _on_grid(groups.to(scale.dtype), scale, low, high)

    @staticmethod
    def backward(ctx, grad: Tensor):
        groups, scale = ctx.saved_tensors
        steps, codes, inside = _codes(groups.to(scale.dtype), scale, ctx.low, ctx.high)
        return ewgs_gradient(grad, steps.sub_(codes), inside, ctx.delta).to(groups.dtype), None, None, None, None


def _codes(groups: Tensor, scale: Tensor, low, high) -> tuple[Tensor, Tensor, Tensor]:
    """``x / s``, its rounding, and where that code is inside ``[low, high]`` (not clipped)."""
    steps = groups * (1.0 / scale)
    codes = steps.round()
    return steps, codes, codes.ge(low).logical_and_(codes.le(high))


def ewgs_gradient(grad: Tensor, residual: Tensor, inside: Tensor, delta: float) -> Tensor:
    """Element-wise gradient scaling (Lee et al. 2021, EWGS): the straight-through gradient
    of each weight times ``1 + delta * sign(g) * residual``, zero where the code is clipped;
    ``residual`` is ``x/s - round(x/s)``, in code steps (the paper's is on its ``[0, 1]``
    scale of ``2^b - 1`` steps, so its delta is this one times ``2^b - 1``).

    The plain STE moves a weight by its gradient wherever it sits between two codes; EWGS
    moves it further when it sits further from the rounding boundary the gradient moves it
    toward (it has further to go to change its code), and less when it sits nearer."""
    return torch.where(inside, grad * (residual * grad.sign()).mul_(delta).add_(1.0), 0.0)


def fake_quantize(matrix: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec, *, ewgs_delta: float = 0.0
                  ) -> Tensor:
    """Quantize-dequantize ``matrix`` on the grid (STE with clipping in backward; with
    ``ewgs_delta`` > 0, EWGS's element-wise scaled STE, see :func:`ewgs_gradient`)."""
    groups = matrix.reshape(-1, group_width(matrix.shape, spec))
    scale = scale.reshape(-1, 1)
    low, high = _code_bounds(zero_point, scale, spec)
    if torch.is_grad_enabled() and (groups.requires_grad or scale.requires_grad):
        if ewgs_delta:
            return _ScaledRoundClampSTE.apply(groups, scale, low, high, ewgs_delta).view(matrix.shape)
        return _RoundClampSTE.apply(groups, scale, low, high).view(matrix.shape)
    # Nothing to differentiate (evaluation, the export's parity check): the same arithmetic
    # in place on one temporary, without the clipping mask.
    return _on_grid(groups, scale, low, high).view(matrix.shape)


def _code_bounds(zero_point: Tensor, scale: Tensor, spec: QuantSpec):
    """The range ``round(x / s)`` is clamped to: ``[qmin, qmax]`` shifted by the zero point,
    since clamp(round(x/s) + z, qmin, qmax) - z == clamp(round(x/s), qmin - z, qmax - z)."""
    if spec.symmetric:
        return spec.qmin, spec.qmax
    zero_point = zero_point.reshape(-1, 1).to(scale.dtype)
    return spec.qmin - zero_point, spec.qmax - zero_point


def _on_grid(groups: Tensor, scale: Tensor, low, high) -> Tensor:
    """``clamp(round(x / s), low, high) * s`` in place on one temporary: the export packs codes
    whose ``codes * scale`` equals this bit for bit."""
    return groups.mul(1.0 / scale).round_().clamp_(low, high).mul_(scale)


class _LearnedScaleSTE(torch.autograd.Function):
    """:class:`_RoundClampSTE`'s forward, and the LSQ gradient of the scale."""

    @staticmethod
    def forward(ctx, groups: Tensor, scale: Tensor, low, high, grad_factor: float, delta: float) -> Tensor:
        ctx.save_for_backward(groups, scale)  # the weight in its own dtype, as _ScaledRoundClampSTE
        ctx.low, ctx.high, ctx.grad_factor, ctx.delta = low, high, grad_factor, delta
        return _on_grid(groups.to(scale.dtype), scale, low, high)

    @staticmethod
    def backward(ctx, grad: Tensor):
        saved, scale = ctx.saved_tensors
        steps, codes, inside = _codes(saved.to(scale.dtype), scale, ctx.low, ctx.high)
        # d x_hat / d s: round(x/s) - x/s inside the grid, the clamped code outside it.
        slope = torch.where(inside, codes - steps, codes.clamp_(ctx.low, ctx.high))
        grad_scale = grad.mul(slope).sum(dim=1, keepdim=True).mul_(ctx.grad_factor)
        if ctx.delta:  # inside the grid, where EWGS acts, the slope is minus the residual
            grad_weights = ewgs_gradient(grad, slope.neg(), inside, ctx.delta)
        else:
            grad_weights = torch.where(inside, grad, 0.0)
        return grad_weights.to(saved.dtype), grad_scale, None, None, None, None


def fake_quantize_learned(matrix: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec, *,
                          ewgs_delta: float = 0.0) -> Tensor:
    """LSQ (Esser et al. 2020): like :func:`fake_quantize`, and ``scale`` (a parameter)
    receives the LSQ gradient, scaled by ``1 / sqrt(group_width * qmax)``; the weights'
    gradient as :func:`fake_quantize`'s (``ewgs_delta``: see :func:`ewgs_gradient`).

    The forward is :func:`fake_quantize`'s arithmetic (PyTorch's learnable fake-quant
    kernel computed the same bits on the CPU and on an H200, but the export's check compares
    the trained weight with ``codes * scale`` bit for bit, which one shared arithmetic keeps
    true by construction); the backward recomputes the codes instead of saving them."""
    width = group_width(matrix.shape, spec)
    groups, scale = matrix.reshape(-1, width), scale.reshape(-1, 1)
    low, high = _code_bounds(zero_point, scale, spec)
    grad_factor = 1.0 / (width * spec.qmax) ** 0.5
    return _LearnedScaleSTE.apply(groups, scale, low, high, grad_factor, ewgs_delta).view(matrix.shape)


def quantize_codes(matrix: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """The integer codes (int8) that :func:`fake_quantize` rounds ``matrix`` to."""
    width = group_width(matrix.shape, spec)
    groups = matrix.detach().reshape(-1, width).float()
    inv_scale = 1.0 / scale.view(-1, 1)
    codes = torch.round(groups * inv_scale) + zero_point.view(-1, 1)
    return torch.clamp(codes, spec.qmin, spec.qmax).to(torch.int8).view(matrix.shape)


def dequantize_codes(codes: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """``(codes - zero_point) * scale`` in float32, shaped like ``codes``."""
    width = group_width(codes.shape, spec)
    # One float copy of the codes, then in place: the export compares large layers with this.
    weight = codes.reshape(-1, width).to(torch.float32, copy=True)
    return weight.sub_(zero_point.view(-1, 1).float()).mul_(scale.view(-1, 1)).view(codes.shape)


@dataclass
class QuantizedWeight:
    """A layer's weight as the fake-quant saw it: exact integer codes and their grid.

    ``codes`` is int8 ``[out, in * kernel]``; ``scale`` (float32) and ``zero_point``
    (int32) are ``[out, in * kernel / group_width]`` (``[1, 1]`` per tensor);
    ``dequantize()`` equals the fake-quantized training weight bit for bit.
    """

    codes: Tensor
    scale: Tensor
    zero_point: Tensor
    spec: QuantSpec
    shape: tuple
    dtype: torch.dtype = torch.float32

    def dequantize(self) -> Tensor:
        """``(codes - zero_point) * scale`` computed in float32, returned in the weight's dtype."""
        weight = dequantize_codes(self.codes, self.scale, self.zero_point, self.spec)
        return weight.view(self.shape).to(self.dtype)
