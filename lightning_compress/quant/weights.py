"""The FAKE_QUANT stage of the weight-transform stack, and what export reads from it."""

from __future__ import annotations

import math
from typing import Dict, Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_compress.core.targeting import RECURRENT_TYPES, Target, layer_weights, select_layers, weight_param
from lightning_compress.core.transforms import (
    Stage,
    get_weight_transform,
    install_weight_transform,
    raw_weight,
    weight_before,
)
from lightning_compress.core.validate import check_module
from lightning_compress.quant.fake_quant import (
    QuantizedWeight,
    as_matrix,
    check_divisible,
    choose_qparams,
    choose_qparams_mse,
    fake_quantize,
    group_width,
    fake_quantize_learned,
    quantize_codes,
)
from lightning_compress.quant.spec import QuantSpec


WEIGHT_RANGES = ("minmax", "mse")


class WeightFakeQuantizer:
    """Fake-quantizes the weight entering the FAKE_QUANT stage (the masked, merged weight).

    Disabled until the QAT callback's ``start_step``. Ranges (``weight_range``):

    - ``"minmax"``: each group's min/max, recomputed every step (torchao's QAT grid);
    - ``"mse"``: each group's min/max times a clipping ratio chosen on the first forward
      after enabling, the one of 1.0 .. 0.5 with the least squared quantization error
      (:func:`choose_qparams_mse`), then kept: the range follows the weights at that ratio.

    With ``learned=True`` the scales are trained with LSQ (Esser et al. 2020) as
    ``scale = exp(log_scale)``, so one relative learning rate suits every layer and bit
    width, starting from the ``weight_range`` grid. Whatever is chosen on the first
    forward after enabling happens after every callback's batch-start hook, so the result
    does not depend on the order callbacks are listed in.
    """

    def __init__(self, spec: QuantSpec, learned: bool = False, weight_range: str = "minmax",
                 ewgs_delta: float = 0.0) -> None:
        self.spec = spec
        self.ewgs_delta = ewgs_delta  # the backward: the plain STE (0) or EWGS (see ewgs_gradient)
        self.enabled = False
        self.learned = learned
        self.weight_range = weight_range
        self.log_scale: nn.Parameter | None = None
        self.zero_point: Tensor | None = None
        self.clip: Tensor | None = None  # per-group ratios ("mse", fixed ranges), once chosen
        # (scale, zero point) per group, fixed by a calibrated start (GPTQ); None: the
        # range rule above.
        self.grid: tuple[Tensor, Tensor] | None = None
        self.initialized = False

    def create_parameters(self, weight: Tensor) -> nn.Parameter:
        """Allocate the learned log-scales for ``weight``'s shape.

        Only the shape is read: the values are set on first use from the weight entering
        the stage, which other stages (a LoRA adapter on an NF4 base, a mask) may change
        after this, and the raw parameter may be an NF4 tensor with no float view.
        """
        rows, columns = weight.shape[0], math.prod(weight.shape[1:])
        groups = rows * columns // group_width((rows, columns), self.spec)
        self.log_scale = nn.Parameter(torch.zeros(groups, device=weight.device))
        self.zero_point = torch.zeros(groups, dtype=torch.int32, device=weight.device)
        return self.log_scale

    def qparams(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """The scales and zero points the forward uses for ``weight`` now (no side effects);
        before the first enabled forward, those that forward would choose."""
        matrix = as_matrix(weight.detach().float())
        # The state may sit on another device than the weight: a model moved back to the CPU
        # after a GPU fit, or state restored on the CPU for a model on a GPU.
        if self.learned:
            if self.initialized:
                # exp where the forward computes it (on the weight's device, see follow_device):
                # CUDA's exp and the CPU's differ in the last bit.
                return self.log_scale.detach().to(matrix.device).exp(), self.zero_point.to(matrix.device)
            scale, zero_point = self.range_grid(matrix)
            # The forward computes with exp(log(scale)), which differs from `scale` in its
            # last bit for most values.
            return scale.log().exp(), zero_point
        if self.grid is not None:
            return self.grid[0].to(matrix.device), self.grid[1].to(matrix.device)
        clip = None if self.clip is None else self.clip.to(matrix.device)
        if clip is None and self.weight_range == "mse":
            clip = choose_qparams_mse(matrix, self.spec)[2]
        return choose_qparams(matrix, self.spec, clip=clip)

    def __call__(self, weight: Tensor) -> Tensor:
        if not self.enabled:
            return weight
        matrix = as_matrix(weight)
        compute = matrix if matrix.dtype == torch.float32 else matrix.float()
        self.follow_device(weight.device)
        # What the backward keeps is the weight in its own dtype where it recomputes the codes
        # (learned ranges, EWGS), not the float32 copy; only a bool mask otherwise.
        if self.learned:
            if not self.initialized:
                self._initialize(compute)
            out = fake_quantize_learned(matrix, self.log_scale.exp(), self.zero_point, self.spec,
                                        ewgs_delta=self.ewgs_delta)
        else:
            if self.grid is not None:
                scale, zero_point = self.grid
            else:
                if self.weight_range == "mse" and self.clip is None:
                    self.clip = choose_qparams_mse(compute, self.spec)[2]
                scale, zero_point = choose_qparams(compute, self.spec, clip=self.clip)
            out = fake_quantize(matrix if self.ewgs_delta else compute, scale, zero_point, self.spec,
                                ewgs_delta=self.ewgs_delta)
        return out.to(weight.dtype).view(weight.shape)

    @torch.no_grad()
    def start_from(self, scale: Tensor, zero_point: Tensor) -> None:
        """Compute with this grid (one scale and zero point per group) from now on: a
        calibrated start (GPTQ) rounded the weights on it. Learned scales start from it."""
        zero_point = zero_point.to(torch.int32)
        if self.learned:
            self.log_scale.copy_(scale.log().to(self.log_scale.device))
            self.zero_point = zero_point.to(self.log_scale.device)
            self.initialized = True
        else:
            self.grid = (scale.float().clone(), zero_point.clone())

    def start_state(self) -> tuple:
        """What the first enabled forward sets (see :meth:`restore_start_state`)."""
        scale = None if self.log_scale is None else self.log_scale.detach().clone()
        return self.initialized, self.zero_point, scale, self.clip

    def restore_start_state(self, state: tuple) -> None:
        """Undo a forward that ran enabled for a measurement only (the export's parity
        check), so ``start_step`` still chooses the ranges from the weights of then."""
        self.initialized, self.zero_point, scale, self.clip = state
        if scale is not None:
            with torch.no_grad():
                self.log_scale.copy_(scale)

    def table_fields(self) -> Dict[str, object]:
        """This stage's columns of the per-layer table (none while it is disabled)."""
        if not self.enabled:
            return {}
        return {"weight_bits": self.spec.bits, "granularity": self.spec.granularity_label}

    def range_grid(self, matrix: Tensor) -> tuple[Tensor, Tensor]:
        """Scales and zero points of ``matrix`` (or a slice of its columns) by this
        quantizer's ``weight_range`` rule: min/max, or the mse clipping search."""
        if self.weight_range == "mse":
            return choose_qparams_mse(matrix, self.spec)[:2]
        return choose_qparams(matrix, self.spec)

    def follow_device(self, device: torch.device) -> None:
        """Move the quantizer's state to ``device`` (the weight's)."""
        # State restored on the CPU for a model that runs on a GPU. Learned scales keep
        # their Parameter object (new storage), so optimizers keep their reference.
        if self.log_scale is not None and self.log_scale.device != device:
            self.log_scale.data = self.log_scale.data.to(device)
            self.zero_point = self.zero_point.to(device)
        if self.clip is not None and self.clip.device != device:
            self.clip = self.clip.to(device)
        if self.grid is not None and self.grid[0].device != device:
            self.grid = (self.grid[0].to(device), self.grid[1].to(device))

    @torch.no_grad()
    def _initialize(self, matrix: Tensor) -> None:
        scale, zero_point = self.range_grid(matrix)
        self.log_scale.copy_(scale.log())
        self.zero_point = zero_point.to(self.log_scale.device)
        self.initialized = True


def quantized_weights(model: nn.Module) -> Dict[str, QuantizedWeight]:
    """For every layer under ``model`` with fake-quantized weights: the exact integer codes,
    scales and zero points the fake quantization uses now.

    Keyed by weight key (the layer's name; ``<layer>.<parameter>`` for each weight of a
    recurrent layer, see :mod:`~lightning_compress.core.targeting`).
    ``result[key].dequantize()`` equals the effective weight the layer computes with,
    bit for bit (in the weight's dtype); the export packs exactly these codes (of
    ``in_proj_weight`` for an ``nn.MultiheadAttention``). Layers
    whose fake quantization has not started yet are included with the grid they would use
    now. Reading them changes nothing.
    """
    check_module("model", model)
    out = {}
    for key, layer, param, quantizer in _fake_quantized(model):
        weight = weight_before(layer, Stage.FAKE_QUANT, param).detach()
        matrix = as_matrix(weight.float())
        scale, zero_point = quantizer.qparams(weight)
        codes = quantize_codes(matrix, scale, zero_point, quantizer.spec)
        grid_shape = (1, 1) if quantizer.spec.granularity == "tensor" else (matrix.shape[0], -1)
        out[key] = QuantizedWeight(
            codes=codes,
            scale=scale.detach().reshape(grid_shape).clone(),
            zero_point=zero_point.reshape(grid_shape).clone(),
            spec=quantizer.spec,
            shape=tuple(weight.shape),
            dtype=weight.dtype,
        )
    return out


def _fake_quantized(model: nn.Module):
    """``(weight key, layer, parameter, quantizer)`` of every fake-quantized weight."""
    for name, layer in model.named_modules():
        for key, param in layer_weights(name, layer).items():
            quantizer = get_weight_transform(layer, Stage.FAKE_QUANT, param)
            if isinstance(quantizer, WeightFakeQuantizer):
                yield key, layer, param, quantizer


QUANTIZABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.MultiheadAttention, *RECURRENT_TYPES)
DEFAULT_TARGET_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, *RECURRENT_TYPES)


def attach_weight_quantizers(
    layers: Mapping[str, nn.Module],
    specs: Mapping[str, QuantSpec],
    learned: bool = False,
    *,
    weight_range: str = "minmax",
    ewgs_delta: float = 0.0,
    owner: str = "round_to_nearest",
    active_owners: set = frozenset(),
) -> Dict[str, WeightFakeQuantizer]:
    """Put a (disabled) :class:`WeightFakeQuantizer` at the FAKE_QUANT stage of each layer.

    Every layer is checked before any is changed, so a failure leaves the model as it was.

    Raises:
        ValueError: a layer's input size is not divisible by its spec's group size, or
            another active callback already fake-quantizes one of the layers.
    """
    for name, layer in layers.items():
        check_divisible(name, raw_weight(layer, weight_param(name, layer)), specs[name])
        existing = get_weight_transform(layer, Stage.FAKE_QUANT, weight_param(name, layer))
        if existing is not None and getattr(existing, "owner", None) in active_owners:
            raise ValueError(
                f"layer {name!r} is already fake-quantized by another QuantizationAwareTraining"
                " callback in this Trainer; give them disjoint `targets`/`exclude`"
            )
    quantizers = {}
    for name, layer in layers.items():
        quantizer = WeightFakeQuantizer(specs[name], learned=learned, weight_range=weight_range, ewgs_delta=ewgs_delta)
        if learned:
            quantizer.create_parameters(raw_weight(layer, weight_param(name, layer)))
        install_weight_transform(layer, Stage.FAKE_QUANT, quantizer, owner=owner, active_owners=active_owners,
                                 param=weight_param(name, layer))
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
