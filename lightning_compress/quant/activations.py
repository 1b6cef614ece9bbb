"""Activation fake quantization: int8 dynamic per-token, or static per-tensor with an observer.

Applied to a layer's input: the QAT callback installs a quantizer as the layer's
``INPUT_QUANT`` stage of the transform stack (``core.transforms``), which calls it as
``quantizer(x, layer)`` before the layer computes. A
"token" is one input vector of the layer's GEMM: the last dimension for Linear, the
channel vector at each position for Conv.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from lightning_compress.core.attention import out_proj_owner
from lightning_compress.core.distributed import all_reduce_max
from lightning_compress.core.recompute import counts_as_training_forward
from lightning_compress.core.targeting import module_name, weight_param
from lightning_compress.core.transforms import Stage, get_input_transform
from lightning_compress.quant.fake_quant import choose_qparams, fake_quantize
from lightning_compress.quant.spec import QuantSpec

ACTIVATION_MODES = ("int8_dynamic", "int8_static")
EVAL_MODE_NOTE = ("a layer with static int8 activations ran in eval mode in a training step (the model, or the layer, was"
                  " put in eval mode: model.eval() before fit?): its input range is not observed, and an export refuses"
                  " a range never observed; keep the model in train mode while it trains")
OBSERVERS = ("minmax", "moving_average")
# torchao's per-token activation grid: int8, asymmetric, one scale per token.
PER_TOKEN = QuantSpec(bits=8, granularity="channel", symmetric=False)
_PER_TENSOR = QuantSpec(bits=8, granularity="tensor", symmetric=False)


def _tokens_last(x: Tensor, channels_first: bool) -> Tensor:
    # Positive dims: the ONNX exporter writes -1 into a Transpose `perm`, which onnxruntime refuses.
    return x.movedim(1, x.dim() - 1) if channels_first else x


class DynamicTokenQuantizer:
    """int8 asymmetric per-token fake quantization, ranges computed on every call."""

    def __init__(self, channels_first: bool = False) -> None:
        self.channels_first = channels_first
        self.enabled = False

    def __call__(self, x: Tensor, layer: Any = None) -> Tensor:
        if not self.enabled:
            return x
        tokens = _tokens_last(x, self.channels_first)
        matrix = tokens.reshape(-1, tokens.shape[-1])
        scale, zero_point = choose_qparams(matrix, PER_TOKEN)
        out = fake_quantize(matrix.float(), scale, zero_point, PER_TOKEN).to(x.dtype)
        out = out.view(tokens.shape)
        return out.movedim(out.dim() - 1, 1) if self.channels_first else out

    def table_fields(self) -> Dict[str, Any]:
        """This quantizer's column of the per-layer table (none while it is disabled)."""
        return {"activation_bits": PER_TOKEN.bits} if self.enabled else {}


def token_codes(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Training's per-token int8 rounding of float32 ``x`` ``[tokens, in]`` as ``uint8``
    codes ``q - qmin``, with ``zero_point - qmin`` and the scale per token (``[tokens, 1]``).

    Bit for bit what :func:`~lightning_compress.quant.fake_quant.choose_qparams` and
    :func:`~lightning_compress.quant.fake_quant.fake_quantize` compute for
    :data:`PER_TOKEN`, as :class:`DynamicTokenQuantizer` does (a test compares them), in a
    third of their operations, for the int8 GEMM of packed layers
    (:mod:`lightning_compress.formats.int8_gemm`): at batch 1 each small operation costs
    as much as a fifth of that GEMM on a 768x3072 layer. Training keeps the shared
    functions, which also carry the straight-through gradient.
    """
    levels = float(PER_TOKEN.qmax - PER_TOKEN.qmin)
    low, high = torch.aminmax(x, dim=1, keepdim=True)
    low.clamp_(max=0.0)
    # (A Python divisor: this runs on the CPU only, where it divides as training's tensor
    # divisor does; see fake_quant._divisor for CUDA.)
    scale = high.clamp_(min=0.0).sub_(low).div_(levels).clamp_(min=torch.finfo(torch.float32).smallest_normal)
    # zero_point - qmin = clamp(-round(low / scale), 0, levels): integers, exact in float32.
    shift = low.div_(scale).round_().neg_().clamp_(0.0, levels)
    # clamp(round(x / s), qmin - z, qmax - z) + (z - qmin) == clamp(round(x / s) + z - qmin, 0, levels).
    codes = x.mul(scale.reciprocal()).round_().add_(shift).clamp_(0.0, levels).to(torch.uint8)
    return codes, shift, scale


_LEVELS = np.float32(PER_TOKEN.qmax - PER_TOKEN.qmin)
_SMALLEST_SCALE = np.float32(torch.finfo(torch.float32).smallest_normal)
_ZERO = np.float32(0.0)
_OVERFLOWS = 2.0**128 - 2.0**103  # the smallest real number float32 rounds to infinity


def single_token_qparams(x: Tensor) -> Optional[Tuple[float, int]]:
    """:func:`token_codes`' scale and ``zero_point - qmin`` of ``x`` holding one token (any
    shape), as Python numbers; ``None`` when the token is not finite.

    The same float32 arithmetic on scalars: numpy's float32 rounds each operation as
    torch's float32 kernels do (a test compares them bit for bit). Kernels then take the
    scale and zero point as arguments: at batch 1 each tensor operation between two GEMMs
    costs several times its own duration (measured here: 7 to 25 us per operation before a
    90 us GEMM, whose weights evict the interpreter's and ATen's working set from cache).
    """
    low, high = torch.aminmax(x)
    low, high = min(np.float32(low.item()), _ZERO), max(np.float32(high.item()), _ZERO)
    # NaN fails the comparison; float32's `high - low` overflows from this span (float64 is exact here).
    if not float(high) - float(low) < _OVERFLOWS:
        return None
    scale = max((high - low) / _LEVELS, _SMALLEST_SCALE)
    return float(scale), int(min(max(-np.rint(low / scale), _ZERO), _LEVELS))


def _token_steps(x: Tensor, scale: float) -> Tensor:
    """``round(x * (1 / scale))`` in float32, as training rounds (ties to even)."""
    return x.mul(float(np.float32(1.0) / np.float32(scale))).round_()


def single_token_codes(x: Tensor, scale: float, shift: int) -> Tensor:
    """:func:`token_codes`' codes of one token with its :func:`single_token_qparams`."""
    return _token_steps(x, scale).add_(float(shift)).clamp_(0.0, float(_LEVELS)).to(torch.uint8)


def single_token_on_grid(x: Tensor, scale: float, shift: int) -> Tensor:
    """Values ``k * scale`` whose codes are training's: ``k = round(x * (1 / scale))``
    (ties to even, as training rounds), not yet clamped to the codes' range. A kernel that
    rounds them again (adding the zero point first, as fbgemm does) lands on ``k + shift``,
    a few thousandths of a step from any midpoint, and clamps as training does: it gets
    training's codes, bit for bit (a test reads them back through an identity weight).

    Three in-place ATen operations: half the time of ``fake_quantize_per_tensor_affine``
    (measured 7 us against 14 us on 3,072 values), which also writes a mask."""
    return _token_steps(x, scale).mul_(scale)


class StaticRangeObserver:
    """int8 asymmetric per-tensor fake quantization with an observed, then frozen, range.

    While ``calibrating``, in training mode and ``in_training_batch`` (which the QAT
    callback sets around each training batch) it tracks the input range (``"minmax"``:
    running min/max; ``"moving_average"``: exponential average of batch min/max with
    ``momentum``); not in a recompute inside the backward, nor in an export's check. Under
    DDP each batch's range is reduced over ranks before the update, so every rank holds
    the same range. Validation, test and predict never update it.
    """

    def __init__(self, kind: str = "minmax", momentum: float = 0.01) -> None:
        self.kind = kind
        self.momentum = momentum
        self.enabled = False
        self.calibrating = True
        # Whether the forwards now are a training batch's: the QAT callback clears it between
        # batches, so a forward outside one (validation in train mode, a forward after fit)
        # does not move the range. None for an observer used without a Trainer: the layer's
        # mode alone decides.
        self.in_training_batch: bool | None = None
        self.low: Tensor | None = None
        self.high: Tensor | None = None

    def observe(self, x: Tensor) -> None:
        low, high = torch.aminmax(x.detach().float())
        # One collective: the max of (-low, high) over ranks gives the min and the max.
        negated_low, high = all_reduce_max(torch.stack([-low, high]))
        low = -negated_low
        if self.low is None:
            self.low, self.high = low, high
        elif self.kind == "minmax":
            self.low, self.high = torch.minimum(self.low, low), torch.maximum(self.high, high)
        else:
            self.low = self.low + self.momentum * (low - self.low)
            self.high = self.high + self.momentum * (high - self.high)

    def qparams(self) -> tuple[Tensor, Tensor]:
        return choose_qparams(torch.stack([self.low, self.high]).view(1, 2), _PER_TENSOR)

    def __call__(self, x: Tensor, layer: Any = None, *, training: bool | None = None) -> Tensor:
        """Fake-quantize ``x``; observe it first while calibrating and ``training`` (by
        default: ``layer.training``, the layer whose input stage this is)."""
        if not self.enabled:
            return x
        if training is None:
            training = layer is not None and layer.training
        # Not inside the backward: activation checkpointing's recompute of this forward
        # must neither count the batch twice nor see another range than the forward did.
        # Grad mode is no test of a training forward: reentrant checkpointing runs the
        # forward itself under no_grad.
        if self.calibrating and self.in_training_batch is not False and counts_as_training_forward():
            if training:
                self.observe(x)
            elif self.in_training_batch:  # a Trainer's training step, the layer in eval mode (model.eval() before fit)
                warnings.warn(EVAL_MODE_NOTE, UserWarning, stacklevel=2)
        if self.low is None:
            return x
        if self.low.device != x.device:  # restored from a checkpoint on CPU
            self.low, self.high = self.low.to(x.device), self.high.to(x.device)
        scale, zero_point = self.qparams()
        flat = x.float().reshape(1, -1)
        return fake_quantize(flat, scale, zero_point, _PER_TENSOR).view(x.shape).to(x.dtype)

    def state_dict(self) -> Dict[str, Any]:
        return {
            "low": None if self.low is None else self.low.cpu(),
            "high": None if self.high is None else self.high.cpu(),
            "calibrating": self.calibrating,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.low, self.high, self.calibrating = state["low"], state["high"], state["calibrating"]

    def table_fields(self) -> Dict[str, Any]:
        """This quantizer's column of the per-layer table (none while it is disabled)."""
        return {"activation_bits": _PER_TENSOR.bits} if self.enabled else {}


def input_quantizer_of(layer) -> "DynamicTokenQuantizer | StaticRangeObserver | None":
    """The activation quantizer at ``layer``'s ``INPUT_QUANT`` stage, if any."""
    return get_input_transform(layer, Stage.INPUT_QUANT)


def check_output_projections(model: nn.Module, layers: Mapping[str, nn.Module], activations: str) -> None:
    """An attention layer's ``out_proj`` gets its input quantized only where the attention
    layer calls it, which a quantized attention layer does (see ``core.attention``).

    Raises:
        ValueError: naming the layer, its attention layer and the fix.
    """
    quantized = {module_name(key, weight_param(key, layer)) for key, layer in layers.items()}
    for name in layers:
        owner = out_proj_owner(model, name)
        if owner is not None and owner not in quantized:
            raise ValueError(
                f"`activations`={activations!r} on {name!r}: nn.MultiheadAttention {owner!r} computes its output"
                " projection inside its own forward, which quantizes that input only when this callback quantizes"
                f" the attention layer too; add {owner!r} (or nn.MultiheadAttention) to `targets` (and take it out"
                f" of `exclude`), or exclude {name!r}"
            )
