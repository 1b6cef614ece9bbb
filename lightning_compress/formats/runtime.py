"""Modules that compute from packed weights, and the choice of the kernel that runs them.

Two kernels, and a cache:

- ``"dequantize"`` (any layer, any device): the layer keeps its codes packed (int4 stays
  4 bits a weight in memory) and dequantizes them inside each forward into a temporary
  freed right after (a Linear larger than a row block, such as a vocabulary head, a block
  of rows at a time). It computes what the fake-quant model computes (same dequantized
  weight, same activation fake quantization).
- ``"fbgemm"`` (int8 Linear, per-channel or per-tensor, CPU; the name of PyTorch's x86
  int8 engine, kept for existing exports): the int8 GEMM of
  :mod:`lightning_compress.formats.int8_gemm`: activations rounded per token on training's
  int8 dynamic grid, multiplied as integers (oneDNN or fbgemm, VNNI/AMX); on a 768x3072
  MLP 1.6x to 2.2x float32 at batch 1 and 2.0x to 2.5x at batch 128 here. A layer trained with
  int8 dynamic activations matches the fake-quant model to float rounding (its codes); a
  weight-only layer's activations are rounded to 8 bits.
  ``backend="auto"`` runs it where the export measured that it stays within the parity
  thresholds (see :mod:`lightning_compress.formats.parity`): each candidate layer alone,
  then the whole model; a layer that misses them runs ``"dequantize"`` and the export
  says why. Without a measurement (an export without inputs) ``"auto"`` runs it only on
  layers trained with dynamic int8 activations. Where the kernel is missing or would
  saturate (a CPU without VNNI), the layer falls back to ``"dequantize"`` with a warning,
  and :func:`kernel_report` says which path each layer runs.
- ``"cached"``: ``"dequantize"`` with the float weight computed once and kept
  (``load_packed(cache_dequantized=True)``): float speed and float memory, exact.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.core.attention import attention_forward, attention_inputs
from lightning_compress.core.targeting import SEPARATE_PROJECTIONS, module_name
from lightning_compress.core.transforms import detach_all
from lightning_compress.formats.blocks import BLOCK_ELEMENTS, WordsWeight, linear_in_row_blocks, pack_rows, row_blocks
from lightning_compress.formats.int8_gemm import Int8Gemm, prepare_int8_gemm
from lightning_compress.formats.kernel_choice import calls_its_forward, int8_gemm_grid, runs_int8_gemm
from lightning_compress.formats.packed import PackedLayer
from lightning_compress.quant.activations import DynamicTokenQuantizer
from lightning_compress.quant.fake_quant import fake_quantize, group_width
from lightning_compress.quant.packing import unpack_biased, unpack_codes
from lightning_compress.quant.spec import QuantSpec

BACKENDS = ("auto", "dequantize", "fbgemm")
MEASURED_KERNELS = ("fbgemm", "dequantize")
"""Kernels an export's parity check may choose for a layer (``parity.kernels`` in its metadata)."""
_PER_TENSOR_ACT = QuantSpec(bits=8, granularity="tensor", symmetric=False)


class PackedWeight(nn.Module):
    """A quantized weight held packed (buffers ``codes``, ``scale``, ``zero_point``);
    :meth:`dequantize` rebuilds the float weight on demand."""

    def __init__(self, layer: PackedLayer) -> None:
        super().__init__()
        q = layer.weight
        self.spec, self.shape, self.dtype = q.spec, q.shape, q.dtype
        self.cols = math.prod(q.shape) // q.shape[0]
        # Sub-8-bit codes stay packed in memory (a file's words as read, without a copy:
        # load_packed reads each layer afresh); 8-bit codes are already one byte each.
        if isinstance(q, WordsWeight) and q.words is not None:
            self.register_buffer("codes", q.words)
        else:
            codes = q.codes.reshape(q.shape[0], -1)
            self.register_buffer("codes", codes.clone() if q.spec.bits == 8 else pack_rows(codes, q.spec.bits))
        self.register_buffer("scale", q.scale.float().reshape(-1, 1).clone())
        self.register_buffer("zero_point", q.zero_point.reshape(-1, 1).float().clone())
        self.keep_float = False  # see keep_dequantized()
        self._float: Optional[Tensor] = None
        # New codes or scales (load_state_dict) make the kept float weight stale.
        self.register_load_state_dict_post_hook(_forget_kept_float)

    def _apply(self, fn, recurse: bool = True):
        # .half() / .to(dtype): the weight it rebuilds takes the new dtype, as a float
        # layer's parameter would (an Embedding's lookups and attention's in_proj_weight
        # are returned in it; they kept float32 after the model's .half()).
        super()._apply(fn, recurse)
        converted = fn(torch.empty(0, dtype=self.dtype))
        if converted.is_floating_point():
            self.dtype = converted.dtype
        return self

    def int_codes(self) -> Tensor:
        """int8 codes ``[out, in * kernel]``."""
        if self.spec.bits == 8:
            return self.codes
        return unpack_codes(self.codes, self.spec.bits, self.cols)

    def dequantize(self, rows: Optional[Tensor] = None, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The weight (or only ``rows`` of it, for Embedding) in ``dtype``."""
        if self.keep_float:
            weight = self._kept(dtype or self.dtype)
            return weight if rows is None else weight[rows]
        return self._dequantize(rows, dtype)

    def matrix_rows(self, rows: slice, dtype: torch.dtype) -> Tensor:  # of a 2-D weight, in `dtype`
        return self._dequantize_rows(rows, None).reshape(-1, self.cols).to(dtype)

    def _kept(self, dtype: torch.dtype) -> Tensor:
        # Recomputed when the module moved or another dtype is asked for: one float copy kept.
        kept = self._float
        if kept is None or kept.dtype != dtype or kept.device != self.codes.device:
            kept = self._float = self._dequantize(None, dtype)
        return kept

    def _dequantize(self, rows: Optional[Tensor], dtype: Optional[torch.dtype]) -> Tensor:
        if rows is not None:  # an Embedding's lookups: a few rows
            weight = self._dequantize_rows(rows, None)
            return weight.reshape(rows.numel(), *self.shape[1:]).to(dtype or self.dtype)
        # A row block at a time into one float32 tensor: one block's unpacked codes are the only temporary
        # (a whole int4 32000x768 head's are 24 MB of uint8; 3-bit codes unpack via an int64 per bit).
        weight = torch.empty(self._matrix_shape(), dtype=torch.float32, device=self.codes.device)
        for block in row_blocks(*self._matrix_shape()):
            self._dequantize_rows(block, weight[block])
        return weight.reshape(self.shape).to(dtype or self.dtype)

    def _dequantize_rows(self, rows, out: Optional[Tensor]) -> Tensor:
        """Rows ``rows`` (an index tensor or a slice) dequantized in float32, into ``out`` if given."""
        codes, zero_offset = self._codes(rows)
        per_tensor = self.spec.granularity == "tensor"
        groups = 1 if per_tensor else self.cols // group_width(self._matrix_shape(), self.spec)
        grouped = codes.reshape(codes.shape[0], groups, self.cols // groups)
        scale, zero = (self.scale.view(-1, 1, 1), self.zero_point.view(-1, 1, 1)) if per_tensor else (
            self.scale.view(self.shape[0], groups, 1)[rows], self.zero_point.view(self.shape[0], groups, 1)[rows])
        # One copy to float32, then in place (whatever dtype .to()/.half() left the scale and zero
        # point buffers in): a mixed-dtype `torch.sub` would add a second float copy of the codes.
        weight = grouped.to(torch.float32, copy=True) if out is None else out.view(grouped.shape).copy_(grouped)
        return weight.sub_(zero.float() + zero_offset).mul_(scale.float())

    def _codes(self, rows) -> tuple:
        """The integer codes of ``rows``, and what to add to ``zero_point`` before subtracting it."""
        selected = self.codes[rows]
        if self.spec.bits == 8:
            return selected, 0
        biased = unpack_biased(selected, self.spec.bits, self.cols)
        if biased is None:
            return unpack_codes(selected, self.spec.bits, self.cols), 0
        # Stored codes are q + 2**(bits-1); subtracting zero + 2**(bits-1) (exact integers) gives q - zero.
        return biased, 1 << (self.spec.bits - 1)

    def _matrix_shape(self) -> tuple:
        return (self.shape[0], self.cols)


def _forget_kept_float(module: PackedWeight, _incompatible) -> None:
    module._float = None  # a function, not a lambda: a loaded model pickles whole


class _InputQuantizer(nn.Module):
    """The activation fake quantization the layer was trained with (exact path only)."""

    def __init__(self, layer: PackedLayer, channels_first: bool) -> None:
        super().__init__()
        self.mode = layer.activations
        self.dynamic = DynamicTokenQuantizer(channels_first=channels_first)
        self.dynamic.enabled = True
        if layer.input_qparams is not None:
            self.register_buffer("input_scale", layer.input_qparams[0].reshape(1).float())
            self.register_buffer("input_zero_point", layer.input_qparams[1].reshape(1).to(torch.int32))

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "int8_dynamic":
            return self.dynamic(x)
        flat = x.float().reshape(1, -1)
        return fake_quantize(flat, self.input_scale, self.input_zero_point, _PER_TENSOR_ACT).view(x.shape).to(x.dtype)


class _PackedModule(nn.Module):
    """Shared parts of the packed layers: the weight, the optional input quantizer, and
    ``weight`` as a (dequantizing) property for parents that read it.

    The input quantizer runs in a forward pre-hook, as the fake-quant layer's input stage
    does: a parent that would skip the layer's forward (PyTorch's fused attention paths)
    then computes the same way for both (see :mod:`lightning_compress.core.attention`)."""

    kernel = "dequantize"

    def _setup(self, layer: PackedLayer, bias: Optional[Tensor], channels_first: bool) -> None:
        self.packed = PackedWeight(layer)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.input_quantizer = None if layer.activations is None else _InputQuantizer(layer, channels_first)
        if self.input_quantizer is not None:
            self.register_forward_pre_hook(_quantize_layer_input)

    @property
    def weight(self) -> Tensor:
        return self.packed.dequantize()

    def quantizes_itself(self, x: Tensor) -> bool:
        """Whether the kernel that runs on ``x`` quantizes it itself (the int8 GEMM)."""
        return False


def _called_as_module(module: nn.Module, args: tuple) -> None:
    return None


def _quantize_layer_input(module: _PackedModule, args: tuple):
    if not args or module.quantizes_itself(args[0]):
        return None
    return (module.input_quantizer(args[0]), *args[1:])


class PackedLinear(_PackedModule):
    """``nn.Linear`` computing from packed codes (see the module docstring for kernels)."""

    def __init__(self, layer: PackedLayer, bias: Optional[Tensor], backend: str = "auto",
                 chosen: Optional[str] = None) -> None:
        super().__init__()
        self._setup(layer, bias, channels_first=False)
        self.in_features, self.out_features = layer.weight.shape[1], layer.weight.shape[0]
        runs = int8_gemm_grid(layer) and runs_int8_gemm(layer, backend, chosen)
        self._fbgemm = _fbgemm_prepack(self, strict=backend == "fbgemm") if runs else None
        if self._fbgemm is not None:
            self.kernel = "fbgemm"
            if self.input_quantizer is None:  # (one holds a hook already)
                # PyTorch's fused encoder path (and its nested tensors for padded batches)
                # reads `linear.weight` and skips the module unless a module in the layer has
                # hooks: this one opts out, so the kernel the export measured runs.
                self.register_forward_pre_hook(_called_as_module)
            # The prepacked weight is a copy: new codes (load_state_dict) are packed again.
            self.register_load_state_dict_post_hook(_prepack_again)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if self._fbgemm is None and self.kernel == "fbgemm":  # unpickled where it does not run (warned)
            self.kernel = "dequantize"

    def _apply(self, fn, recurse: bool = True):
        # .half().float() and .to() replace the buffers (the scale rounded on the way): the
        # prepared copy follows them, or the two paths would compute with different scales.
        super()._apply(fn, recurse)
        packed = self.packed
        if self._fbgemm is not None and packed.codes.is_cpu and any(
                a is not b for a, b in zip(self._fbgemm._arguments, (packed.codes, packed.scale, packed.zero_point))):
            self._fbgemm = _fbgemm_prepack(self, strict=False)
            self.kernel = "fbgemm" if self._fbgemm is not None else "dequantize"
        return self

    def quantizes_itself(self, x: Tensor) -> bool:
        # float32 CPU inputs only; not when a gradient is asked for (the int8 GEMM has no
        # backward: a silently wrong input gradient), nor while torch.jit traces (its graphs
        # cannot hold the prepared weight); another width gets F.linear's error. Cheapest
        # checks first (twice a layer at batch 1); the tracer warned of the shape comparison.
        return (self._fbgemm is not None and x.dtype is torch.float32 and x.is_cpu
                and not (x.requires_grad and torch.is_grad_enabled()) and not torch.jit.is_tracing()
                and x.shape[-1] == self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        if self.quantizes_itself(x):
            return self._fbgemm.eager(x, self.bias) if torch.compiler.is_compiling() else self._fbgemm(x, self.bias)
        if self.packed.keep_float or self.out_features * self.in_features <= BLOCK_ELEMENTS:
            return F.linear(x, self.packed.dequantize(dtype=x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        # A large layer (a vocabulary head) a row block at a time: its float weight is never whole.
        return linear_in_row_blocks(x, lambda rows: self.packed.matrix_rows(rows, x.dtype), self.out_features, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.packed.spec.describe()}, kernel={self.kernel}"


class PackedConv(_PackedModule):
    """``nn.Conv1d/2d/3d`` computing from packed codes (dequantize path)."""

    def __init__(self, layer: PackedLayer, original: nn.modules.conv._ConvNd) -> None:
        super().__init__()
        self._setup(layer, original.bias, channels_first=True)
        self._conv = type(original)  # its `_conv_forward` knows padding modes and dims
        for attr in ("stride", "padding", "dilation", "groups", "padding_mode", "_reversed_padding_repeated_twice",
                     "in_channels", "out_channels", "kernel_size"):
            setattr(self, attr, getattr(original, attr))

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self._conv._conv_forward(self, x, self.packed.dequantize(dtype=x.dtype), bias)


class PackedEmbedding(_PackedModule):
    """``nn.Embedding`` that dequantizes only the rows it looks up."""

    def __init__(self, layer: PackedLayer, original: nn.Embedding) -> None:
        super().__init__()
        self._setup(layer, None, channels_first=False)
        self.padding_idx, self.num_embeddings, self.embedding_dim = (
            original.padding_idx, original.num_embeddings, original.embedding_dim)
        if original.max_norm is not None:
            raise ValueError("Embedding layers with `max_norm` renormalize their weight in place; export them in float")

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        return self.packed.dequantize(rows=flat).view(*ids.shape, self.embedding_dim)


class PackedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose ``in_proj_weight`` (or, for an attention layer with
    separate query/key/value weights, each of ``q/k/v_proj_weight``) is packed and
    dequantized once per call. It computes as a compressed attention layer does while it
    trains (:func:`~lightning_compress.core.attention.attention_forward`: ``out_proj`` is
    called as a module when it quantizes its input), and an input quantizer acts on query,
    key and value in a forward pre-hook, as the fake-quant layer's input stage does."""

    kernel = "dequantize"

    def __init__(self, layer: PackedLayer | Sequence[PackedLayer], original: nn.MultiheadAttention) -> None:
        nn.Module.__init__(self)
        layers = [layer] if isinstance(layer, PackedLayer) else list(layer)
        params = sorted(packed.param for packed in layers)
        if params not in (["in_proj_weight"], sorted(SEPARATE_PROJECTIONS)):
            raise ValueError(f"an attention layer's packed weights are in_proj_weight or q/k/v_proj_weight, got {params}")
        for attr in ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout", "batch_first",
                     "head_dim", "add_zero_attn"):
            setattr(self, attr, getattr(original, attr))
        for name in ("in_proj_bias", "bias_k", "bias_v"):
            value = getattr(original, name)
            frozen = None if value is None else nn.Parameter(value.detach().clone(), requires_grad=False)
            self.register_parameter(name, frozen)
        self.out_proj = original.out_proj
        if params == ["in_proj_weight"]:
            for name in SEPARATE_PROJECTIONS:
                self.register_parameter(name, None)
            self.packed = PackedWeight(layers[0])
        else:  # read through __getattr__
            self.packed = None
            self.projections = nn.ModuleDict({packed.param: PackedWeight(packed) for packed in layers})
        first = layers[0]
        self.input_quantizer = None if first.activations is None else _InputQuantizer(first, channels_first=False)
        if self.input_quantizer is not None:
            self.register_forward_pre_hook(_quantize_attention_inputs, with_kwargs=True)
        self.train(original.training)  # its attention dropout acts in training mode only

    @property
    def in_proj_weight(self) -> Optional[Tensor]:
        return None if self.packed is None else self.packed.dequantize()

    def __getattr__(self, name: str):
        if name in SEPARATE_PROJECTIONS and "projections" in self.__dict__["_modules"]:
            return self._modules["projections"][name].dequantize()
        return super().__getattr__(name)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        return attention_forward(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                                 average_attn_weights, is_causal)


def _quantize_attention_inputs(module: PackedMultiheadAttention, args: tuple, kwargs: dict):
    return attention_inputs(args, kwargs, module.input_quantizer)


def _prepack_again(module: "PackedLinear", _incompatible) -> None:
    module._fbgemm = _fbgemm_prepack(module, strict=True)


def _fbgemm_prepack(module: "PackedLinear", strict: bool) -> Optional[Int8Gemm]:
    packed, trained_codes = module.packed, module.input_quantizer is not None  # (int8 dynamic activations)
    return prepare_int8_gemm(packed.codes, packed.scale, packed.zero_point, strict, trained_codes)


def build_packed_module(layer: PackedLayer, original: nn.Module, backend: str, chosen: Optional[str] = None) -> nn.Module:
    """The packed replacement of ``original`` (a Linear, Conv, Embedding or
    MultiheadAttention); ``chosen``: the kernel the export measured for it (``"auto"`` only)."""
    if isinstance(original, nn.MultiheadAttention):
        return PackedMultiheadAttention(layer, original)
    if isinstance(original, nn.Linear):
        return PackedLinear(layer, original.bias, backend if calls_its_forward(layer, original) else "dequantize", chosen)
    if isinstance(original, nn.modules.conv._ConvNd) and not isinstance(original, nn.modules.conv._ConvTransposeNd):
        return PackedConv(layer, original)
    if isinstance(original, nn.Embedding):
        return PackedEmbedding(layer, original)
    raise ValueError(f"cannot run a packed {type(original).__name__}; packed layers are Linear, Conv, Embedding"
                     " and MultiheadAttention")


def packed_units(layers: Mapping[str, PackedLayer]) -> Dict[str, List[PackedLayer]]:
    """``{module name: the packed weights it holds}`` of a packed model's layers (keyed by
    weight key): one for a Linear, Conv, Embedding or attention layer, every weight
    matrix of a recurrent one."""
    units: Dict[str, List[PackedLayer]] = {}
    for key, layer in layers.items():
        units.setdefault(module_name(key, layer.param), []).append(layer)
    return units


def build_packed_unit(weights: Sequence[PackedLayer], original: nn.Module, backend: str,
                      chosen: Optional[str] = None, cache: bool = False) -> nn.Module:
    """The replacement of ``original`` computing from its packed ``weights`` (see
    :func:`packed_units`); ``chosen`` as in :func:`build_packed_module`, ``cache``: see
    :func:`keep_dequantized`."""
    if isinstance(original, nn.RNNBase):
        return dequantized_recurrent(weights, original)
    if isinstance(original, nn.MultiheadAttention):
        module = PackedMultiheadAttention(weights, original)
    elif len(weights) != 1:
        raise ValueError(f"{type(original).__name__} holds one packed weight, the file has {len(weights)}")
    else:
        module = build_packed_module(weights[0], original, backend, chosen)
    return keep_dequantized(module) if cache else module


def keep_dequantized(module: nn.Module) -> nn.Module:
    """Make ``module``'s dequantize-path weights computed once and kept in float (kernel
    ``"cached"``): the speed of a float layer at the memory of one, and the same numbers
    as the dequantize path. Layers on the int8 GEMM keep running it."""
    if module.kernel == "dequantize":
        for part in module.modules():
            if isinstance(part, PackedWeight):
                part.keep_float = True
        module.kernel = "cached"
    return module


def dequantized_recurrent(weights: Sequence[PackedLayer], original: nn.RNNBase) -> nn.RNNBase:
    """A copy of the recurrent layer ``original`` (stages removed) computing with its
    packed weight matrices dequantized: exactly the weights the fake-quant layer computed
    with. Weight-only: PyTorch's recurrent kernels take float weights, so the saving is
    in the file, and the matrices are float in memory (``kernel`` is ``"dequantize"``)."""
    module = copy.deepcopy(original)
    detach_all(module)
    for layer in weights:
        current = module._parameters.get(layer.param)
        if current is None or tuple(current.shape) != tuple(layer.weight.shape):
            raise ValueError(f"{type(original).__name__} has no weight {layer.param!r} of shape"
                             f" {list(layer.weight.shape)}")
        weight = PackedWeight(layer).dequantize().to("cpu" if current.is_meta else current.device)  # meta: CPU
        setattr(module, layer.param, nn.Parameter(weight, requires_grad=False))  # RNNBase refreshes _flat_weights
    module.kernel = "dequantize"
    return module


def kernel_report(model: nn.Module) -> Dict[str, str]:
    """``{layer name: kernel}`` for every packed layer: ``"fbgemm"``, ``"dequantize"`` or ``"cached"``."""
    packed = (_PackedModule, PackedMultiheadAttention)
    return {name: module.kernel for name, module in model.named_modules()
            if isinstance(module, packed) or (isinstance(module, nn.RNNBase) and "kernel" in module.__dict__)}
