"""The FAKE_QUANT stage of the weight-transform stack, and what export reads from it."""

from __future__ import annotations

from typing import Dict, Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_compress.core.targeting import Target, select_layers
from lightning_compress.core.transforms import Stage, add_weight_transform, get_weight_transform, raw_weight, weight_before
from lightning_compress.quant.fake_quant import (
    QuantizedWeight,
    as_matrix,
    check_divisible,
    choose_qparams,
    fake_quantize,
    fake_quantize_learned,
    quantize_codes,
)
from lightning_compress.quant.spec import QuantSpec


class WeightFakeQuantizer:
    """Fake-quantizes the weight entering the FAKE_QUANT stage (the masked, merged weight).

    Disabled until the QAT callback's ``start_step``. With ``learned=True`` the scales are
    a parameter trained with LSQ; they are initialised from the weight on the first
    forward after enabling (after every callback's batch-start hook has run, so the
    initial ranges do not depend on the order callbacks are listed in).
    """

    def __init__(self, spec: QuantSpec, learned: bool = False) -> None:
        self.spec = spec
        self.enabled = False
        self.learned = learned
        self.scale: nn.Parameter | None = None
        self.zero_point: Tensor | None = None
        self.initialized = False

    def create_parameters(self, weight: Tensor) -> nn.Parameter:
        """Allocate the learned scales (before the optimizer is built)."""
        scale, zero_point = choose_qparams(as_matrix(weight), self.spec)
        self.scale = nn.Parameter(scale)
        self.zero_point = zero_point
        return self.scale

    def qparams(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """The scales and zero points the forward uses for ``weight`` now."""
        if self.learned:
            return self.scale.detach(), self.zero_point
        return choose_qparams(as_matrix(weight), self.spec)

    def __call__(self, weight: Tensor) -> Tensor:
        if not self.enabled:
            return weight
        matrix = as_matrix(weight)
        compute = matrix if matrix.dtype == torch.float32 else matrix.float()
        if self.learned:
            if not self.initialized:
                self._initialize(matrix)
            out = fake_quantize_learned(compute, self.scale, self.zero_point, self.spec)
        else:
            scale, zero_point = choose_qparams(compute, self.spec)
            out = fake_quantize(compute, scale, zero_point, self.spec)
        return out.to(weight.dtype).view(weight.shape)

    @torch.no_grad()
    def _initialize(self, matrix: Tensor) -> None:
        scale, zero_point = choose_qparams(matrix, self.spec)
        self.scale.copy_(scale)
        self.zero_point = zero_point.to(self.scale.device)
        self.initialized = True


def quantized_weights(model: nn.Module) -> Dict[str, QuantizedWeight]:
    """For every layer under ``model`` with fake-quantized weights: the exact integer codes,
    scales and zero points the fake quantization uses now.

    ``result[name].dequantize()`` equals the effective weight the layer computes with,
    bit for bit; the export packs exactly these codes. Layers whose fake quantization has
    not started yet (before ``start_step``) are included with the grid they will use.
    """
    out = {}
    for name, layer in model.named_modules():
        quantizer = get_weight_transform(layer, Stage.FAKE_QUANT)
        if not isinstance(quantizer, WeightFakeQuantizer):
            continue
        weight = weight_before(layer, Stage.FAKE_QUANT).detach().float()
        if quantizer.learned and not quantizer.initialized:
            quantizer._initialize(as_matrix(weight))
        scale, zero_point = quantizer.qparams(weight)
        matrix = as_matrix(weight)
        codes = quantize_codes(matrix, scale, zero_point, quantizer.spec)
        grid_shape = (1, 1) if quantizer.spec.granularity == "tensor" else (matrix.shape[0], -1)
        out[name] = QuantizedWeight(
            codes=codes,
            scale=scale.detach().reshape(grid_shape).clone(),
            zero_point=zero_point.reshape(grid_shape).clone(),
            spec=quantizer.spec,
            shape=tuple(weight.shape),
        )
    return out


QUANTIZABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
DEFAULT_TARGET_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def attach_weight_quantizers(
    layers: Mapping[str, nn.Module], specs: Mapping[str, QuantSpec], learned: bool = False
) -> Dict[str, WeightFakeQuantizer]:
    """Put a (disabled) :class:`WeightFakeQuantizer` at the FAKE_QUANT stage of each layer.

    Raises:
        ValueError: a layer's input size is not divisible by its spec's group size.
    """
    for name, layer in layers.items():
        check_divisible(name, raw_weight(layer), specs[name])
    quantizers = {}
    for name, layer in layers.items():
        quantizer = WeightFakeQuantizer(specs[name], learned=learned)
        if learned:
            quantizer.create_parameters(raw_weight(layer).detach())
        add_weight_transform(layer, Stage.FAKE_QUANT, quantizer)
        quantizers[name] = quantizer
    return quantizers


def round_to_nearest(
    model: nn.Module,
    spec: QuantSpec,
    *,
    targets: Sequence[Target] | None = None,
    exclude: Sequence[Target] | None = None,
) -> Dict[str, WeightFakeQuantizer]:
    """Post-training quantization baseline: fake-quantize ``model``'s weights in place,
    without training, on the same grid QAT uses (round to nearest, min/max ranges).

    Returns the attached quantizers; :func:`quantized_weights` reads their codes.
    """
    layers = select_layers(
        model, targets=targets, exclude=exclude, supported=QUANTIZABLE_TYPES, default=DEFAULT_TARGET_TYPES
    )
    quantizers = attach_weight_quantizers(layers, {name: spec for name in layers})
    for quantizer in quantizers.values():
        quantizer.enabled = True
    return quantizers
