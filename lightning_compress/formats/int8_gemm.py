"""The int8 GEMM of packed Linear layers: integer codes in, exact integer products.

Activations are quantized per token with the 8-bit asymmetric grid training uses for
``activations="int8_dynamic"`` (:class:`~lightning_compress.quant.activations.DynamicTokenQuantizer`:
same ranges, same rounding), so a layer trained that way gets exactly the integer codes
its fake-quant layer computed with. The codes, shifted to ``uint8``, go through oneDNN's
u8 x s8 GEMM (``torch.ops.onednn.qlinear_pointwise``, the op PyTorch's x86 int8
inference lowers to; VNNI/AMX where the CPU has them) with an input scale of 1 and one
input zero point ``p`` (the batch's median token's), which it takes out in int32:
``G = sum_k (x - p) * w``. The rest is taken out with per-token and per-channel sums:

    sum_k (x - zx)(w - zw) = G - zw * sum_k (x - p) - (zx - p) * (sum_k w - K * zw)

``G`` is exact in int32 and, with ``x - p`` centred, of about the result's size; ``zx - p``
and ``sum_k (x - p)`` are small exact integers. So the rounding is float32's on terms of
about the result's size (measured here: 129 to 138 dB SQNR against float64, as
close as the fake-quant model's own float32 GEMM). Taking every token's zero point out
after the GEMM instead cancelled large terms in float32 (47 to 55 dB on tokens with
outliers of both signs). What is left: a token whose zero point is far from the median
``p`` keeps ``(zx - p) * sum_k w`` inside ``G``, and weights whose rows sum far from zero
make that term large, so float32 rounds it coarser than the result (measured on K=4096
layers, worst token of a batch mixing outlier, all-positive and Gaussian tokens: 110 to
117 dB with zero-mean weights, 79 dB with ``randn + 1``, 65 dB with all-positive
weights; alone, or in batches of like tokens, 125 to 146 dB). Asymmetric weights' ``zw``
term cancels the same way when codes sit near their zero point. So a layer trained with
int8 dynamic activations matches the fake-quant model to between float rounding and
65 dB, far above the parity check's 35 dB; on a weight-only layer the per-token 8-bit
rounding of the activations is the approximation that matters (what the check measures).

One token (batch 1, a decoder's step) takes another path: at batch 1 every tensor
operation between two GEMMs costs several times its own duration (the GEMM's weights
evict the interpreter's and ATen's working set from cache: 7 to 25 us an operation here,
against 1 to 3 us in a tight loop), and the batched path's dozen made a call no faster
than float32's. The token's scale and zero point are computed as Python numbers (the
same float32 arithmetic, :func:`~lightning_compress.quant.activations.single_token_qparams`)
and handed to fbgemm's quantize-and-multiply (``quantized::linear_with_input_q_dq_qweight_dq_output_fp32``,
1.5x oneDNN's GEMM for one token here), which adds the bias too. fbgemm adds the zero
point before it rounds, so a value on the midpoint between two codes would take the
other one than training's ``round(x * (1 / s)) + z``: 2 of 230,400 Gaussian values, but
43% of a token of integers in -5..5 (38 dB from the fake-quant model). A layer trained
with int8 dynamic activations therefore hands fbgemm the token already on training's grid
(:func:`~lightning_compress.quant.activations.single_token_on_grid`, three in-place
operations), whose codes come back exactly; a weight-only layer, which has no trained
codes, hands it the token.
fbgemm's packed weight is another copy of the int8 weight, made at the first token.
Asymmetric weights, tokens of a range past about 1e32, and CPUs where a probe finds
fbgemm saturating or rounding otherwise run the batched path.

Measured on this 2-core AVX-512/AMX CPU against float32 ``F.linear`` on 768x3072 and
3072x768 layers: oneDNN's GEMM alone 2.3x to 2.7x at batch 1 and 8x to 10x at batch 128;
fbgemm's one-token call (its quantization included) 3.9x at batch 1; a whole batched
call 3x at batch 128. The kernels must not
saturate: CPUs without VNNI multiply u8 x s8 pairs into int16 with saturation
(``vpmaddubsw``), which would corrupt 8-bit codes. :func:`int8_gemm_available` runs a
probe that saturates such a CPU once per process, and layers fall back to the exact
dequantize path where it fails (:func:`one_token_gemm_available` checks fbgemm alike).
"""

from __future__ import annotations

import copy
import functools
import threading
import warnings
from typing import Optional

import torch
from torch import Tensor

from lightning_compress.quant.activations import (single_token_codes, single_token_on_grid, single_token_qparams,
                                                   token_codes)

# A token whose scale is past this (values beyond ~1e32) runs the batched path: fbgemm's
# float32 requantization of such products loses about 1% (measured at 1.6e38).
_LARGEST_SCALE = 2.0**100
# fbgemm multiplies the sums by token scale x weight scale in float32: below the smallest
# normal number that product loses bits (3.6e-5 relative error at |x| ~ 1e-37), so a token
# whose scale would take it there runs the batched path (which applies them one by one).
_SMALLEST_PRODUCT = float(torch.finfo(torch.float32).smallest_normal)
# fbgemm's weight is packed with PyTorch's quantized engine set to it (global state):
# one thread at a time, so that concurrent first tokens put back what the user had.
_ENGINE_SWITCH = threading.Lock()


def _float32_default(function):
    """``function`` run with float32 as torch's default dtype, whatever its caller set
    (Lightning's ``"bf16-true"`` sets bfloat16 around every step, and the export's checks
    run a bfloat16 model that way): its probes and tensors are float32 kernels' inputs, and
    a probe that failed for a caller's default would stay failed (it is checked once)."""
    @functools.wraps(function)
    def with_float32_default(*args, **kwargs):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_default_dtype(previous)

    return with_float32_default


@functools.lru_cache(maxsize=None)
@_float32_default
def int8_gemm_available() -> Optional[str]:
    """``None`` when the int8 GEMM runs exactly here, else why it does not (checked once)."""
    generator = torch.Generator().manual_seed(0)
    try:
        codes = torch.tensor([[127] * 64, [-128] * 64, [127, -128] * 32], dtype=torch.int8)
        inputs = torch.tensor([[255] * 64, [255, 0] * 32], dtype=torch.uint8)
        got = [_gemm(inputs, _prepack(codes), torch.ones(3), torch.zeros(3, dtype=torch.long), zero)
               for zero in (0, 100)]
        # And a layer-sized shape, for which oneDNN may pick another kernel.
        big_codes = torch.randint(-128, 128, (48, 512), generator=generator, dtype=torch.int8)
        big_inputs = torch.randint(0, 256, (40, 512), generator=generator, dtype=torch.uint8)
        big = _gemm(big_inputs, _prepack(big_codes), torch.ones(48), torch.zeros(48, dtype=torch.long), 0)
    except (AttributeError, RuntimeError, NotImplementedError, TypeError) as err:  # an op of another signature
        return f"{type(err).__name__}: {err}"
    # Pairs 255 * 127 + 255 * 127 and 255 * -128 + 255 * -128 overflow int16: a saturating
    # CPU gets other sums. The input zero point must be taken out in integers.
    for zero, result in zip((0, 100), got):
        if not torch.equal(result.double(), (inputs.double() - zero) @ codes.double().T):
            return "the CPU's u8 x s8 products saturate (no VNNI)" if zero == 0 else "input zero points are ignored"
    # Sums below 2**24: exact in float32 as well.
    if not torch.equal(big.double(), big_inputs.double() @ big_codes.double().T):
        return "the CPU's u8 x s8 products saturate (no VNNI)"
    return None


@functools.lru_cache(maxsize=None)
@_float32_default
def one_token_gemm_available() -> Optional[str]:
    """``None`` when fbgemm's one-token kernel rounds its input as training does (but for
    values at a code midpoint) and does not saturate here, else why not (checked once)."""
    generator = torch.Generator().manual_seed(1)
    try:
        # An identity weight returns the input's codes times the scale; a width that is
        # not a multiple of the vector length.
        width, scale, zero = 263, 0.03709999844431877, 117  # a float32 number
        x = torch.empty(1, width).uniform_(-zero * scale, (255 - zero) * scale, generator=generator)
        identity = _one_token_gemm(x, scale, zero, _one_token_prepack(torch.eye(width, dtype=torch.int8),
                                                                      torch.ones(width)))
        # Products 255 * 127 in adjacent pairs overflow int16 where the CPU saturates them.
        codes = torch.tensor([[127] * 64, [-128] * 64], dtype=torch.int8)
        full = _one_token_gemm(torch.full((1, 64), 255.0), 1.0, 0, _one_token_prepack(codes, torch.ones(2)))
    except (AttributeError, RuntimeError, NotImplementedError, TypeError) as err:  # no fbgemm, or another signature
        return f"{type(err).__name__}: {err}"
    got = torch.round(identity.double() / scale) + zero
    trained = single_token_codes(x, scale, zero).double()
    steps = x.double() / scale
    at_midpoint = (steps - steps.floor() - 0.5).abs() < 1e-3
    if (got - trained).abs().max() > 1 or bool(((got != trained) & ~at_midpoint).any()):
        return "fbgemm's input rounding is not training's"
    if not torch.equal(full, torch.tensor([[255.0 * 127 * 64, -255.0 * 128 * 64]])):
        return "the CPU's u8 x s8 products saturate (no VNNI)"
    return None


def _one_token_prepack(codes: Tensor, scale: Tensor, bias: Optional[Tensor] = None):
    """fbgemm's packed weight (symmetric int8, one float scale per channel)."""
    with warnings.catch_warnings():
        # Quantized tensors are deprecated as a user API; fbgemm's packing still takes one.
        warnings.simplefilter("ignore", UserWarning)
        weight = torch._make_per_channel_quantized_tensor(codes, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
        with _ENGINE_SWITCH:
            previous = torch.backends.quantized.engine
            try:
                torch.backends.quantized.engine = "fbgemm"  # which packing quantized.linear_prepack makes
                return torch.ops.quantized.linear_prepack(weight, bias)
            finally:
                torch.backends.quantized.engine = previous


def _one_token_gemm(x: Tensor, scale: float, zero: int, packed) -> Tensor:
    """fbgemm rounds ``x`` to uint8 codes with ``scale`` and ``zero`` (adding the zero
    point before it rounds: a value within float32 rounding of a code midpoint may take
    the other neighbour than training's ``round(x * (1 / scale)) + zero``), multiplies them
    with the int8 weight in int32, and scales the sums to float32 with the packed bias."""
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x, scale, zero, packed)


def _prepack(codes: Tensor) -> Tensor:
    return torch.ops.onednn.qlinear_prepack(codes, None)


def _gemm(inputs: Tensor, prepacked: Tensor, channel_scale: Tensor, zeros: Tensor, input_zero: int) -> Tensor:
    """``channel_scale[n] * sum_k (inputs[t, k] - input_zero) * codes[n, k]`` in float32
    (int32 accumulation, the zero point taken out in integers); ``zeros``: the weight's
    zero points, one int64 zero per channel."""
    return torch.ops.onednn.qlinear_pointwise(inputs, 1.0, input_zero, prepacked, channel_scale, zeros, None, 1.0, 0,
                                              torch.float32, "none", [], "")


class Int8Gemm:
    """One int8 weight ``(codes - zero_point) * scale`` (per channel or per tensor),
    prepared for the int8 GEMM; calling it on float32 activations ``[tokens, in]`` returns
    ``[tokens, out]``.

    The prepared weight is a copy of ``codes`` in oneDNN's layout (as much memory again
    as the int8 codes), and fbgemm's another, made at the first single token; copies and
    pickles of the module prepare them again from ``codes``.
    """

    @_float32_default
    def __init__(self, codes: Tensor, scale: Tensor, zero_point: Tensor, trained_codes: bool = True) -> None:
        self._arguments = (codes, scale, zero_point, trained_codes)  # what copies and pickles are made from
        self.trained_codes = trained_codes  # trained with int8 dynamic activations: keep their codes
        out_features, self.in_features = codes.shape
        self.scale = scale.float().reshape(-1).expand(out_features).contiguous()
        zero = zero_point.float().reshape(-1).expand(out_features)
        code_sums = codes.sum(dim=1, dtype=torch.int64).double()
        # Per output channel: scale * zw, and scale * (sum_k w - K * zw); exact in float64, then float32.
        self.zero_term = (self.scale.double() * zero.double()).float()
        self.input_zero_term = (self.scale.double() * (code_sums - self.in_features * zero.double())).float()
        self.weight_has_zero = bool(zero.any())
        self._smallest_one_token_scale = _SMALLEST_PRODUCT / max(float(self.scale.min()), _SMALLEST_PRODUCT)
        self.prepacked = _prepack(codes.contiguous())
        self.zeros = torch.zeros(out_features, dtype=torch.long)  # weight zero points are taken out below
        # fbgemm's packed weight, packed at the first token, and the bias packed in it.
        self._one_token_weight, self._one_token_bias, self._one_token_version = None, None, None

    def __deepcopy__(self, memo: dict) -> Optional["Int8Gemm"]:
        # oneDNN's prepared weight has no storage to copy; the memo maps `codes` to the copy
        # the module's own buffer got, so the new prepared weight matches the copied module.
        return _prepared_again(*copy.deepcopy(self._arguments, memo))

    def __reduce__(self):
        return _prepared_again, self._arguments

    def __call__(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """``F.linear`` of ``x`` (float32 ``[..., in]``) and this weight, plus ``bias``."""
        if x.numel() == self.in_features:  # one token (a decoder's step): fbgemm, where it takes it
            out = self._one_token(x if x.dim() > 1 else x.view(1, -1), bias)
            if out is not None:
                return out if x.dim() > 1 else out.view(-1)
        return self._tokens(x.reshape(-1, self.in_features), bias).view(*x.shape[:-1], self.scale.numel())

    @torch.compiler.disable  # the prepared weights are not tensors Inductor can hold: run them eagerly
    def eager(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """``self(x, bias)`` for code that ``torch.compile`` traces (a graph break);
        eager callers call the object itself (the wrapper costs ~5 us a call at batch 1)."""
        return self(x, bias)

    def _tokens(self, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        if x.shape[0] == 0:
            return x.new_zeros(0, self.scale.numel())
        codes, shift, scale = token_codes(x)
        # The GEMM takes one input zero point out in integers; the other tokens' differences
        # from it are small integers times a per-channel sum. One token: none left at all.
        # (Taking every token's out in float32 afterwards lost up to 80 dB to cancellation
        # on tokens with outliers of both signs: measured 55 dB against float64.)
        single = shift.shape[0] == 1
        middle = shift.view(-1)[0] if single else shift.view(-1).nanmedian()
        # A token of NaN (or of values whose range overflows) has a NaN zero point and scale:
        # its row comes out NaN, as the fake-quant model's does, and the others are unaffected.
        zero = int(middle) if bool(torch.isfinite(middle)) else 0
        out = _gemm(codes, self.prepacked, self.scale, self.zeros, zero)
        if not single:
            out.addcmul_(shift - zero, self.input_zero_term, value=-1.0)
        if self.weight_has_zero:
            rows = codes.sum(dim=1, keepdim=True, dtype=torch.float32).sub_(self.in_features * zero)
            out.addcmul_(rows, self.zero_term, value=-1.0)
        # In place: at batch 1 every allocation and launch counts against a GEMM of ~90 us.
        return out.mul_(scale) if bias is None else out.mul_(scale).add_(bias)


    def _one_token(self, x: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
        """One token on fbgemm, its scale and zero point and the bias handed to the kernel
        (at batch 1 every tensor operation between GEMMs costs several times its own
        duration); ``None`` where the batched path takes it: asymmetric weights, fbgemm not
        exact here, a token that is not finite or whose scale is past ``_LARGEST_SCALE`` or so
        small that its product with a weight scale is not a normal float32 number."""
        if self.weight_has_zero or one_token_gemm_available() is not None:
            return None
        qparams = single_token_qparams(x)
        if qparams is None or not self._smallest_one_token_scale <= qparams[0] <= _LARGEST_SCALE:
            return None
        scale, zero = qparams
        # fbgemm adds the zero point before it rounds, so a value on a code midpoint takes the
        # other neighbour than training's rounding (integer-valued inputs in -5..5 put 43% of
        # their values there). A layer trained with int8 dynamic activations hands it the
        # token on training's grid, whose codes come back exactly (three in-place operations,
        # 7 us on 3,072 values). A weight-only layer has no codes to keep.
        on_grid = single_token_on_grid(x, scale, zero) if self.trained_codes else x
        out = _one_token_gemm(on_grid, scale, zero, self._one_token_packed(bias))
        return out if self._one_token_bias is bias else out.add_(bias)

    def _one_token_packed(self, bias: Optional[Tensor]):
        """fbgemm's packed weight (its GEMM is 1.5x oneDNN's for one token here), with
        ``bias`` in it, packed at the first token and again when the bias changes."""
        # Added apart: an inference tensor has no version counter to see in-place changes,
        # and a bias that asks for a gradient must get one.
        packed_bias = None if bias is None or bias.is_inference() or (
            bias.requires_grad and torch.is_grad_enabled()) else bias
        # `.data` replaced (as Module.half() does) keeps the object and its version: the address tells.
        version = None if packed_bias is None else (packed_bias._version, packed_bias.data_ptr())
        if (self._one_token_weight is None or packed_bias is not self._one_token_bias
                or version != self._one_token_version):
            self._one_token_weight = _one_token_prepack(
                self._arguments[0].contiguous(), self.scale, None if packed_bias is None else packed_bias.detach().float())
            self._one_token_bias, self._one_token_version = packed_bias, version
        return self._one_token_weight


def _prepared_again(codes: Tensor, scale: Tensor, zero_point: Tensor, trained_codes: bool = True) -> Optional[Int8Gemm]:
    """A copy's or an unpickled model's int8 GEMM: probed again (the machine may be another
    one), ``None`` with a warning where it does not run exactly."""
    return prepare_int8_gemm(codes, scale, zero_point, strict=False, trained_codes=trained_codes)


def prepare_int8_gemm(codes: Tensor, scale: Tensor, zero_point: Tensor, strict: bool,
                      trained_codes: bool = True) -> Optional[Int8Gemm]:
    """The int8 GEMM of one weight, or ``None`` (with a warning; an error when ``strict``)
    where it does not run exactly on this machine. ``trained_codes``: the layer was trained
    with int8 dynamic activations, whose codes one token keeps too."""
    reason = int8_gemm_available()
    if reason is None:
        try:
            return Int8Gemm(codes, scale, zero_point, trained_codes)
        except (RuntimeError, NotImplementedError, TypeError) as err:
            reason = f"{type(err).__name__}: {err}"
    if strict:
        raise RuntimeError(f"the int8 GEMM kernel is not available ({reason}); use backend='auto'")
    warnings.warn(f"int8 GEMM kernel unavailable ({reason}); int8 layers run on the dequantize path")
    return None


__all__ = ["Int8Gemm", "int8_gemm_available", "one_token_gemm_available", "prepare_int8_gemm"]
