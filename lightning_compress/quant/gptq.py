"""GPTQ (Frantar et al. 2022): round a weight matrix column by column, each column's
rounding error compensated on the columns not yet rounded, weighted by the inverse
Hessian of the layer's squared output error, ``H = sum over calibration rows x of x xᵀ``.

The result lies exactly on the grid of :mod:`lightning_compress.quant.fake_quant`:
``fake_quantize(quantized, scale, zero_point, spec)`` returns ``quantized`` bit for bit,
so a QAT run that starts from GPTQ weights trains, packs and exports them unchanged.
"""

from __future__ import annotations

from typing import Callable, Collection, Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_compress.core.validate import ArgumentError
from lightning_compress.quant.fake_quant import check_divisible, choose_qparams, dequantize_codes
from lightning_compress.quant.spec import QuantSpec

Choose = Callable[[Tensor], "tuple[Tensor, Tensor]"]

# Damping retries multiply `damp` by 10 this many times before giving up.
DAMP_RETRIES = 3


def accumulate_hessian(hessian: Tensor | None, inputs: Tensor) -> Tensor:
    """Add ``xᵀx`` over the rows of ``inputs`` to a GPTQ Hessian accumulator.

    Meant for a forward hook: call it with each calibration batch's layer inputs.

    Args:
        hessian: the ``[in, in]`` float32 accumulator so far (added to in place), or
            ``None`` for the first batch.
        inputs: the layer's inputs ``[..., in]``; every leading index is one row.

    Returns:
        The accumulator: ``hessian`` itself, or a new ``[in, in]`` float32 tensor.

    Raises:
        ArgumentError: ``hessian`` is not ``[in, in]`` for the inputs' last size.
    """
    rows = inputs.detach().reshape(-1, inputs.shape[-1]).float()
    batch = rows.T @ rows
    if hessian is None:
        return batch
    if hessian.shape != batch.shape:
        raise ArgumentError(
            "hessian",
            f"`hessian` has shape {tuple(hessian.shape)}; inputs with last size {rows.shape[1]}"
            f" need {tuple(batch.shape)}",
        )
    return hessian.add_(batch.to(hessian.device))


def conv_columns(inputs: Tensor, conv: nn.Module) -> Tensor:
    """The rows a Conv2d multiplies with its flattened weight ``[out, in * kh * kw]``.

    ``conv_columns(x, conv) @ as_matrix(conv.weight).T`` (plus the bias) is ``conv(x)``
    with its output positions as rows, so :func:`accumulate_hessian` on these rows gives
    the Hessian GPTQ needs for the conv's flattened weight.

    Args:
        inputs: ``[batch, in, height, width]`` or unbatched ``[in, height, width]``.
        conv: an ``nn.Conv2d`` with ``groups=1`` (any padding, padding mode, stride,
            dilation).

    Returns:
        ``[rows, in * kh * kw]``, one row per batch element and output position.

    Raises:
        ArgumentError: ``conv`` is not a Conv2d, or is grouped (each group of outputs
            sees other inputs, so one Hessian does not fit them all).
    """
    if not isinstance(conv, nn.Conv2d):  # (a layer with compression stages is a subclass)
        raise ArgumentError(
            "conv", f"conv_columns supports nn.Conv2d only, got {type(conv).__name__}; "
            "collect the Hessian of other layer types from their own input rows"
        )
    if conv.groups != 1:
        raise ArgumentError("conv", f"conv_columns needs groups=1, got a Conv2d with groups={conv.groups}")
    if inputs.dim() == 3:
        inputs = inputs.unsqueeze(0)
    pads: list[int] = []
    # F.pad lists the last dimension first.
    for dim in (1, 0):
        kernel, dilation = conv.kernel_size[dim], conv.dilation[dim]
        if conv.padding == "valid":
            before = after = 0
        elif conv.padding == "same":
            # As nn.Conv2d pads for "same": any odd extra goes after.
            total = dilation * (kernel - 1)
            before, after = total // 2, total - total // 2
        else:
            before = after = conv.padding[dim]
        pads += [before, after]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = F.pad(inputs, pads, mode=mode)
    columns = F.unfold(padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    return columns.transpose(1, 2).reshape(-1, columns.shape[1])


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    spec: QuantSpec,
    choose: Choose | None = None,
    *,
    keep: Tensor | None = None,
    damp: float = 0.01,
    block_size: int = 128,
) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize ``weight`` with GPTQ onto ``spec``'s grid.

    Columns are rounded left to right; each rounding error, divided by the inverse
    Hessian's Cholesky diagonal, is subtracted from the columns to its right (lazily,
    ``block_size`` columns at a time). Computed in float64; inputs never seen in
    calibration (Hessian diagonal 0) get weight 0.

    Args:
        weight: ``[out, in]`` float matrix (a Conv weight flattened by ``as_matrix``).
        hessian: ``[in, in]``, the sum of ``x xᵀ`` over calibration rows (any positive
            factor): see :func:`accumulate_hessian`.
        spec: the grid.
        choose: ``columns -> (scale, zero_point)`` for float32 columns: called once on
            the whole matrix for ``"channel"`` (one scale per row) and ``"tensor"`` (one
            scale), and for ``"group"`` on each group's ``[out, group_size]`` columns as
            GPTQ reaches the group's first column (so on the error-updated weights), one
            scale per row. Default ``choose_qparams(columns, spec)``; pass another for
            mse clipping or rounded scales.
        keep: optional bool ``[out, in]``; ``False`` marks pruned weights, which stay
            exactly 0: they cause no error and the updates landing on them are dropped.
        damp: fraction of the mean Hessian diagonal added to the diagonal; multiplied by
            10 up to 3 times while the damped Hessian is not positive definite.
        block_size: columns per lazy batch update (the result does not depend on it
            beyond float64 rounding).

    Returns:
        ``(quantized, scale, zero_point)``: float32 ``[out, in]`` weights exactly on the
        grid, float32 scales and int32 zero points shaped ``[n_groups]`` in the layout
        ``choose_qparams(weight, spec)`` returns (group ``(r, c)`` at ``r * groups_per_row + c``).

    Raises:
        ArgumentError: a shape mismatch (naming ``hessian``, ``keep`` or ``weight``),
            ``block_size < 1``, ``damp < 0``, a Hessian with non-finite entries or not
            positive definite after the damping retries, or a ``choose`` returning the
            wrong number of scales.
    """
    out_features, in_features = _check_arguments(weight, hessian, spec, keep, damp, block_size)
    choose = choose if choose is not None else (lambda columns: choose_qparams(columns, spec))
    pruned = None if keep is None else ~keep.to(device=weight.device, dtype=torch.bool)

    matrix = weight.detach().to(torch.float64).clone()
    hessian = hessian.detach().to(device=weight.device, dtype=torch.float64).clone()
    dead = torch.diagonal(hessian) == 0
    hessian[dead, dead] = 1.0
    matrix[:, dead] = 0.0
    if pruned is not None:
        matrix.masked_fill_(pruned, 0.0)
    inverse = _inverse_cholesky(hessian, damp)

    width = spec.group_size if spec.granularity == "group" else in_features
    groups_per_row = in_features // width
    scales = torch.empty(out_features, groups_per_row, dtype=torch.float32, device=weight.device)
    zero_points = torch.empty(out_features, groups_per_row, dtype=torch.int32, device=weight.device)
    if spec.granularity != "group":
        # Chosen after dead and pruned weights are zeroed: they do not widen the grid.
        scales[:, 0], zero_points[:, 0] = _grid(choose, matrix, spec)
    codes = torch.empty(out_features, in_features, dtype=torch.int8, device=weight.device)

    for start, end in _blocks(in_features, block_size, width if spec.granularity == "group" else None):
        errors = torch.zeros(out_features, end - start, dtype=torch.float64, device=weight.device)
        for column in range(start, end):
            group = column // width
            if spec.granularity == "group" and column % width == 0:
                scales[:, group], zero_points[:, group] = _grid(choose, matrix[:, column : column + width], spec)
            column_codes, rounded = _round_column(matrix[:, column], scales[:, group], zero_points[:, group], spec)
            if pruned is not None:
                column_codes = torch.where(pruned[:, column], zero_points[:, group], column_codes)
                rounded = rounded.masked_fill(pruned[:, column], 0.0)
            codes[:, column] = column_codes.to(torch.int8)
            error = (matrix[:, column] - rounded) / inverse[column, column]
            errors[:, column - start] = error
            # Within the block at once; beyond it after the block (the lazy batch update).
            matrix[:, column + 1 : end] -= torch.outer(error, inverse[column, column + 1 : end])
            if pruned is not None:
                matrix[:, column + 1 : end].masked_fill_(pruned[:, column + 1 : end], 0.0)
        matrix[:, end:] -= errors @ inverse[start:end, end:]
        if pruned is not None:
            matrix[:, end:].masked_fill_(pruned[:, end:], 0.0)

    scale, zero_point = scales.reshape(-1), zero_points.reshape(-1)
    if spec.granularity == "tensor":
        scale, zero_point = scale[:1].clone(), zero_point[:1].clone()
    return dequantize_codes(codes, scale, zero_point, spec), scale, zero_point


def _check_arguments(
    weight: Tensor, hessian: Tensor, spec: QuantSpec, keep: Tensor | None, damp: float, block_size: int
) -> tuple[int, int]:
    if weight.dim() != 2:
        raise ArgumentError(
            "weight",
            f"`weight` must be a matrix [out, in] (flatten a Conv weight with as_matrix), got shape {tuple(weight.shape)}",
        )
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ArgumentError(
            "hessian",
            f"`hessian` must be [in, in] = {(in_features, in_features)} for a weight of shape"
            f" {tuple(weight.shape)}, got {tuple(hessian.shape)}",
        )
    if not torch.isfinite(hessian).all():
        raise ArgumentError("hessian", "`hessian` has non-finite entries (inf or nan); check the calibration inputs")
    if keep is not None and keep.shape != weight.shape:
        raise ArgumentError("keep", f"`keep` must have the weight's shape {tuple(weight.shape)}, got {tuple(keep.shape)}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ArgumentError("block_size", f"`block_size` must be an int >= 1, got {block_size!r}")
    if not damp >= 0:
        raise ArgumentError("damp", f"`damp` must be >= 0, got {damp!r}")
    check_divisible("weight", weight, spec)
    return out_features, in_features


def _inverse_cholesky(hessian: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of the inverse of the damped Hessian (float64)."""
    mean_diagonal = torch.diagonal(hessian).mean()
    for attempt in range(DAMP_RETRIES + 1):
        fraction = damp * 10**attempt
        damped = hessian + fraction * mean_diagonal * torch.eye(len(hessian), dtype=hessian.dtype, device=hessian.device)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0:
                return upper
    raise ArgumentError(
        "hessian",
        f"`hessian` is not positive definite even with damping {fraction:g} x its mean diagonal"
        f" (tried `damp`={damp:g} and {DAMP_RETRIES} retries x10); it must be a sum of x xᵀ"
        " over calibration inputs: check them, or raise `damp`",
    )


def _blocks(columns: int, block_size: int, group: int | None) -> Iterator[tuple[int, int]]:
    """``[start, end)`` column blocks of at most ``block_size``.

    A block ends early at a group that starts inside it and reaches past it: that
    group's grid is chosen from its current columns, and the lazy update would leave
    those past the block stale. Blocks thus never change the result.
    """
    start = 0
    while start < columns:
        end = min(start + block_size, columns)
        if group is not None:
            last = (end - 1) // group * group
            if start < last and last + group > end:
                end = last
        yield start, end
        start = end


def _grid(choose: Choose, columns: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """``choose`` on float32 columns, checked: one scale per row, or one per tensor."""
    scale, zero_point = choose(columns.to(torch.float32))
    expected = 1 if spec.granularity == "tensor" else columns.shape[0]
    if scale.numel() != expected or zero_point.numel() != expected:
        raise ArgumentError(
            "choose",
            f"`choose` must return {expected} scale(s) and zero point(s) for columns of shape"
            f" {tuple(columns.shape)} ({spec.describe()}), got {scale.numel()} and {zero_point.numel()}",
        )
    return scale.reshape(-1).to(torch.float32), zero_point.reshape(-1).to(torch.int32)


def _round_column(column: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Codes of one column, rounded as ``quantize_codes`` rounds (float32, ``1 / scale``
    multiply), and their float32 dequantized values as float64."""
    codes = torch.round(column.to(torch.float32) * (1.0 / scale)) + zero_point
    codes = torch.clamp(codes, spec.qmin, spec.qmax)
    rounded = (codes - zero_point.to(torch.float32)) * scale
    return codes.to(torch.int32), rounded.to(torch.float64)


def gptq_issue(layer: nn.Module, attention_outputs: Collection[int] = ()) -> str | None:
    """Why GPTQ cannot round ``layer``'s weight from the inputs its forward records (a
    phrase completing "the layer ..."), or ``None``: it must be an ``nn.Linear`` or an
    ungrouped ``nn.Conv2d``, and not an ``nn.MultiheadAttention``'s ``out_proj``, whose
    weight the attention reads without calling it (known by its class, or, given the
    model's ``attention_outputs`` (their ids), by where it sits)."""
    if id(layer) in attention_outputs or isinstance(layer, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return "is an nn.MultiheadAttention's out_proj, whose weight the attention reads without calling it"
    if isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups == 1):
        return None
    return f"is an nn.{type(layer).__name__}"


def gptq_issue_message(key: str, why: str) -> str:
    """The sentence naming layer ``key`` GPTQ cannot round (``why``: :func:`gptq_issue`'s)."""
    return (f"init='gptq' rounds the weights of nn.Linear and ungrouped nn.Conv2d layers from the inputs their"
            f" forward receives, and {key!r} {why}; quantize it in a second QuantizationAwareTraining callback"
            " without `init`")
