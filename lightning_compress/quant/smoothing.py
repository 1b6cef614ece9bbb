"""Per-input-channel scales that move quantization difficulty between activations and
weights, and the helpers that fold them into a model without changing its function.

A layer computes ``X Wᵀ = (X diag(1/s)) (W diag(s))ᵀ`` for any positive ``s``. The
``1/s`` is folded into whatever produces ``X`` (a preceding Linear's rows and bias, or a
norm's weight and bias: :func:`divide_output_rows_`), the ``s`` into the columns of
every layer that reads ``X`` (:func:`scale_input_columns_`).

- SmoothQuant (Xiao et al. 2023) picks ``s`` from activation and weight ranges, so that
  int8 activations lose less to outlier channels.
- AWQ (Lin et al. 2024) searches ``s = mean|X|^ratio`` for the ratio whose quantized
  weights reproduce the layer outputs best, protecting the weights of salient channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from lightning_compress.core.validate import ArgumentError, is_int, is_number
from lightning_compress.quant.fake_quant import check_divisible, choose_qparams, fake_quantize
from lightning_compress.quant.spec import QuantSpec

# Smallest SmoothQuant scale: a channel is never blown up by more than 1e5.
MIN_SCALE = 1e-5
# Floor of AWQ's mean |x| so a channel never seen active gets a finite scale.
MIN_ACTIVATION = 1e-4


def smoothquant_scales(activation_absmax: Tensor, weight_absmax: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's scales ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``.

    The model then computes with ``X / s`` and ``W diag(s)``: ``alpha`` near 1 moves
    more of the activations' range into the weights.

    Args:
        activation_absmax: ``[in]``, each input channel's largest ``|x|`` over calibration.
        weight_absmax: ``[in]``, each input column's largest ``|w|`` over every layer that
            reads the activation (the max over all of them).
        alpha: migration strength in ``[0, 1]``.

    Returns:
        float32 ``[in]``; 1 for channels where either maximum is 0 (nothing to balance),
        and at least ``1e-5``.

    Raises:
        ArgumentError: ``alpha`` outside ``[0, 1]``, or the maxima are not matching
            ``[in]`` vectors of finite non-negative values.
    """
    if not is_number(alpha) or not 0.0 <= alpha <= 1.0:
        raise ArgumentError("alpha", f"`alpha` must be a number in [0, 1], got {alpha!r}")
    for name, value in (("activation_absmax", activation_absmax), ("weight_absmax", weight_absmax)):
        if value.dim() != 1 or value.shape != activation_absmax.shape:
            raise ArgumentError(
                name, f"`activation_absmax` and `weight_absmax` must be [in] vectors of one size, got"
                f" {tuple(activation_absmax.shape)} and {tuple(weight_absmax.shape)}"
            )
        if not (torch.isfinite(value).all() and (value >= 0).all()):
            raise ArgumentError(name, f"`{name}` must hold finite absolute maxima (>= 0)")
    activations, weights = activation_absmax.double(), weight_absmax.double()
    scales = activations.pow(alpha) / weights.pow(1.0 - alpha)
    idle = (activations == 0) | (weights == 0)
    scales = torch.where(idle, torch.ones_like(scales), scales).clamp(min=MIN_SCALE)
    return scales.to(torch.float32)


@dataclass(frozen=True)
class AwqSearch:
    """What :func:`awq_scales` found.

    Attributes:
        scales: float32 ``[in]``, the chosen ``s`` (all ones for ratio 0).
        ratio: the chosen exponent of ``mean|x|``, one of ``0, 1/grid, ..., (grid-1)/grid``.
        loss: its summed squared output error over the weights, float.
        rtn_loss: the loss at ratio 0 (round-to-nearest), for reports.
    """

    scales: Tensor
    ratio: float
    loss: float
    rtn_loss: float


def awq_scales(
    inputs: Tensor,
    weights: Sequence[Tensor],
    spec: QuantSpec,
    choose: Callable[[Tensor], "tuple[Tensor, Tensor]"] | None = None,
    grid: int = 20,
) -> AwqSearch:
    """AWQ's grid search for per-input-channel scales of layers that read ``inputs``.

    For each ratio ``r`` in ``0, 1/grid, ..., (grid-1)/grid``:
    ``s = clamp(mean|x|, 1e-4)^r / sqrt(max * min)`` (the normalisation keeps ``s`` around
    1), each weight becomes ``fake_quantize(W diag(s)) diag(1/s)`` on the grid of the
    scaled weight, and the loss is ``sum over weights of ||X Wᵀ - X Ŵᵀ||²`` (float64).
    Ratio 0 is ``s = 1``, plain round-to-nearest, and ties keep the smaller ratio, so the
    result is never worse than round-to-nearest on ``inputs``.

    Args:
        inputs: ``[tokens, in]`` calibration inputs.
        weights: ``[out_i, in]`` matrices of every layer reading ``inputs`` (one ``s`` is
            shared: it is folded into what produces them).
        spec: the weights' grid.
        choose: ``scaled weight -> (scale, zero_point)``; default ``choose_qparams(·, spec)``.
        grid: number of ratios tried, ``>= 1``.

    Returns:
        :class:`AwqSearch` with the scales, ratio and loss chosen.

    Raises:
        ArgumentError: bad shapes (naming ``inputs`` or ``weights``), ``grid < 1``, or a
            ``group_size`` that does not divide ``in``.
    """
    weights = _check_awq(inputs, weights, spec, grid)
    choose = choose if choose is not None else (lambda matrix: choose_qparams(matrix, spec))
    rows = inputs.detach().to(torch.float64)
    saliency = inputs.detach().float().abs().mean(dim=0).clamp(min=MIN_ACTIVATION)
    best: tuple[Tensor, float, float] | None = None
    rtn_loss = 0.0
    for step in range(grid):
        ratio = step / grid
        scales = saliency.pow(ratio)
        scales = scales / (scales.max() * scales.min()).sqrt()
        loss = 0.0
        for weight in weights:
            scaled = weight * scales
            scale, zero_point = choose(scaled)
            effective = fake_quantize(scaled, scale, zero_point, spec) / scales
            loss += (rows @ (weight.double() - effective.double()).T).square().sum().item()
        if step == 0:
            rtn_loss = loss
        if best is None or loss < best[2]:
            best = (scales, ratio, loss)
    return AwqSearch(*best, rtn_loss=rtn_loss)


def _check_awq(inputs: Tensor, weights: Sequence[Tensor], spec: QuantSpec, grid: int) -> list[Tensor]:
    if not is_int(grid) or grid < 1:
        raise ArgumentError("grid", f"`grid` must be an int >= 1, got {grid!r}")
    if inputs.dim() != 2:
        raise ArgumentError("inputs", f"`inputs` must be [tokens, in], got shape {tuple(inputs.shape)}")
    if not weights:
        raise ArgumentError("weights", "`weights` is empty: give the weight of every layer reading the inputs")
    matrices = []
    for index, weight in enumerate(weights):
        if weight.dim() != 2 or weight.shape[1] != inputs.shape[1]:
            raise ArgumentError(
                "weights",
                f"`weights[{index}]` must be [out, {inputs.shape[1]}] to read inputs of shape"
                f" {tuple(inputs.shape)}, got {tuple(weight.shape)}",
            )
        check_divisible(f"weights[{index}]", weight, spec)
        matrices.append(weight.detach().float())
    return matrices


@torch.no_grad()
def scale_input_columns_(weight: Tensor, scales: Tensor) -> None:
    """Multiply input column ``j`` of a layer's weight by ``scales[j]``, in place.

    With the layer's inputs divided by ``scales`` (see :func:`divide_output_rows_` on
    what produces them) the layer computes the same function.

    Args:
        weight: a Linear weight ``[out, in]`` or a Conv weight ``[out, in, *kernel]``
            (dimension 1 is scaled).
        scales: ``[in]``.

    Raises:
        ArgumentError: ``scales`` does not have one value per input column.
    """
    if weight.dim() < 2 or scales.shape != (weight.shape[1],):
        raise ArgumentError(
            "scales", f"`scales` must be [in] = [{weight.shape[1] if weight.dim() > 1 else '?'}] for a weight"
            f" of shape {tuple(weight.shape)}, got {tuple(scales.shape)}"
        )
    weight.mul_(scales.to(weight).view(1, -1, *[1] * (weight.dim() - 2)))


@torch.no_grad()
def divide_output_rows_(weight: Tensor, bias: Tensor | None, scales: Tensor) -> None:
    """Divide output channel ``j`` of the layer producing an activation by ``scales[j]``,
    in place: rows of a Linear/Conv weight and its bias, or a norm's weight and bias vectors.

    The activation becomes ``X / s``; with every layer that reads it scaled by
    :func:`scale_input_columns_` the model computes the same function.

    Args:
        weight: ``[out, ...]`` rows, or a norm's ``[out]`` weight.
        bias: ``[out]`` or ``None``.
        scales: ``[out]``.

    Raises:
        ArgumentError: ``scales`` does not have one value per output channel.
    """
    if scales.shape != (weight.shape[0],) or (bias is not None and bias.shape != scales.shape):
        raise ArgumentError(
            "scales", f"`scales` must be [out] = [{weight.shape[0]}] for a weight of shape {tuple(weight.shape)}"
            f"{'' if bias is None else f' and bias {tuple(bias.shape)}'}, got {tuple(scales.shape)}"
        )
    weight.div_(scales.to(weight).view(-1, *[1] * (weight.dim() - 1)))
    if bias is not None:
        bias.div_(scales.to(bias))
