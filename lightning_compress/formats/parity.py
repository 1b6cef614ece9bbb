"""The parity check: does the packed model compute what the fake-quant model computes?

Three measurements, on the files as written (read back from disk):

1. weights: every dequantized packed weight equals the fake-quantized training weight,
   bit for bit, and every other tensor equals the model's;
2. outputs on the exact path (``"dequantize"``): relative error ``||a - b|| / ||a||``
   against the fake-quant model (float rounding only, so at most ``1e-5`` by default);
3. outputs on the fast path (the fbgemm int8 GEMM with dynamic int8 activations, when a
   layer runs it): SQNR ``20 log10(||a|| / ||a - b||)`` in dB (at least 35 by default).

Per-layer figures (each layer fed the input the fake-quant layer saw) name the worst
layers when the check fails.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_compress.core.attention import fast_path_disabled
from lightning_compress.core.targeting import module_name
from lightning_compress.core.transforms import Stage, all_transforms, get_weight_transform, weight_slots
from lightning_compress.formats.loader import set_submodule
from lightning_compress.formats.packed import PackedModel
from lightning_compress.formats.runtime import build_packed_unit, packed_units


@dataclass
class ParityReport:
    """Figures of one parity check; ``passed`` says whether they meet the thresholds."""

    weights_exact: bool
    weight_mismatches: List[str]
    relative_error: float | None
    sqnr_db: float | None
    fast_layers: List[str]
    layers: List[Dict[str, Any]] = field(default_factory=list)  # worst first
    max_relative_error: float = 1e-5
    min_sqnr_db: float = 35.0

    @property
    def passed(self) -> bool:
        ok = self.weights_exact
        if self.relative_error is not None:
            ok = ok and self.relative_error <= self.max_relative_error
        if self.sqnr_db is not None:
            ok = ok and self.sqnr_db >= self.min_sqnr_db
        return ok

    def summary(self) -> str:
        parts = ["weights exact" if self.weights_exact else f"weights differ in {self.weight_mismatches[:5]}"]
        if self.relative_error is None:
            parts.append("outputs not checked (no inputs)")
        else:
            parts.append(f"exact-path relative error {self.relative_error:.2e} (max {self.max_relative_error:g})")
        if self.sqnr_db is not None:
            parts.append(f"int8-GEMM SQNR {self.sqnr_db:.1f} dB (min {self.min_sqnr_db:g})")
        worst = [f"{row['layer']} rel {row['relative_error']:.2e} / {row['sqnr_db']:.1f} dB" for row in self.layers[:5]]
        if worst and not self.passed:
            parts.append("worst layers: " + "; ".join(worst))
        return "; ".join(parts)

    def as_dict(self) -> Dict[str, Any]:
        return {
            "passed": self.passed,
            "weights_exact": self.weights_exact,
            "relative_error": self.relative_error,
            "sqnr_db": None if self.sqnr_db is None or math.isinf(self.sqnr_db) else self.sqnr_db,
            "fast_layers": self.fast_layers,
            "max_relative_error": self.max_relative_error,
            "min_sqnr_db": self.min_sqnr_db,
        }


def relative_error(reference: Tensor, other: Tensor) -> float:
    norm = reference.double().norm()
    diff = (reference.double() - other.double()).norm()
    return float(diff / norm) if norm > 0 else float(diff)


def sqnr_db(reference: Tensor, other: Tensor) -> float:
    diff = (reference.double() - other.double()).norm()
    return math.inf if diff == 0 else float(20 * torch.log10(reference.double().norm() / diff))


def flatten_outputs(output: Any) -> Tensor:
    """Every floating-point tensor in a (nested) model output, flattened and joined."""
    found: List[Tensor] = []

    def visit(value: Any) -> None:
        if isinstance(value, Tensor):
            if value.is_floating_point():
                found.append(value.detach().reshape(-1).float().cpu())
        elif isinstance(value, Mapping):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(output)
    if not found:
        raise ValueError("the model's output holds no floating-point tensor to compare")
    return torch.cat(found)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(*inputs)`` for a tuple/list, ``model(**inputs)`` for a dict, else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def check_parity(
    model: nn.Module,
    packed: PackedModel,
    inputs: Sequence[Any],
    *,
    backend: str = "auto",
    max_relative_error: float = 1e-5,
    min_sqnr_db: float = 35.0,
) -> ParityReport:
    """Compare ``packed`` (read back from disk) with the fake-quant ``model`` it came from.

    ``model`` is restored afterwards (its layers, quantizer switches and train/eval mode).
    PyTorch's fused attention path is off while it runs (see
    :func:`~lightning_compress.core.attention.fast_path_disabled`): both models run every
    layer's forward, as the fake-quant model computes while it trains.
    """
    with quantization_enabled(model), eval_mode(model), fast_path_disabled(), torch.no_grad():
        mismatches = _weight_mismatches(model, packed)
        fast = _fast_layers(model, packed, backend)
        report = ParityReport(
            weights_exact=not mismatches,
            weight_mismatches=mismatches,
            relative_error=None,
            sqnr_db=None,
            fast_layers=fast,
            max_relative_error=max_relative_error,
            min_sqnr_db=min_sqnr_db,
        )
        if not inputs:
            return report
        reference, layer_io = _run_recording(model, packed_units(packed.layers), inputs)
        with _swapped(model, packed, "dequantize"):
            exact = torch.cat([flatten_outputs(call_model(model, x)) for x in inputs])
        report.relative_error = relative_error(reference, exact)
        if fast:
            with _swapped(model, packed, backend):
                quick = torch.cat([flatten_outputs(call_model(model, x)) for x in inputs])
            report.sqnr_db = sqnr_db(reference, quick)
        report.layers = _per_layer(model, packed, layer_io, backend)
    return report


def _weight_mismatches(model: nn.Module, packed: PackedModel) -> List[str]:
    bad = []
    for key, layer in packed.layers.items():
        trained = getattr(model.get_submodule(module_name(key, layer.param)), layer.param).detach()
        if not torch.equal(layer.weight.dequantize().to(trained.device), trained):
            bad.append(key)
    state = model.state_dict()
    for key, tensor in packed.tensors.items():
        current = _effective(model, key, state)
        if current is None or not torch.equal(tensor, current.detach().cpu()):
            bad.append(key)
    return bad


def _effective(model: nn.Module, key: str, state: Mapping[str, Tensor]) -> Tensor | None:
    owner, _, leaf = key.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if leaf in weight_slots(module):  # compare the effective weight
        return getattr(module, leaf)
    return state.get(key)


def _fast_layers(model: nn.Module, packed: PackedModel, backend: str) -> List[str]:
    fast = []
    for name, weights in packed_units(packed.layers).items():
        module = build_packed_unit(weights, model.get_submodule(name), backend)
        if module.kernel != "dequantize":
            fast.append(name)
    return fast


def _run_recording(model: nn.Module, layers: Mapping[str, Any], inputs: Iterable[Any]):
    seen_in: Dict[str, List[tuple]] = {name: [] for name in layers}
    seen_out: Dict[str, List[Tensor]] = {name: [] for name in layers}
    handles = []
    for name in layers:
        module = model.get_submodule(name)
        # The inputs as the layer receives them (QAT's activation stage runs inside the layer),
        # as a packed layer gets them; prepended, before any user pre-hook changes them.
        handles.append(module.register_forward_pre_hook(
            lambda _, args, kwargs, name=name: seen_in[name].append((args, kwargs)), prepend=True, with_kwargs=True))
        handles.append(module.register_forward_hook(
            lambda _, args, output, name=name: seen_out[name].append(flatten_outputs(output))))
    try:
        outputs = torch.cat([flatten_outputs(call_model(model, x)) for x in inputs])
    finally:
        for handle in handles:
            handle.remove()
    return outputs, {name: list(zip(seen_in[name], seen_out[name])) for name in layers}


def _per_layer(model: nn.Module, packed: PackedModel, layer_io: Mapping[str, List[tuple]], backend: str):
    units = packed_units(packed.layers)
    rows = []
    for name, pairs in layer_io.items():
        if not pairs:
            continue
        original, weights = model.get_submodule(name), units[name]
        module = build_packed_unit(weights, original, backend).to(getattr(original, weights[0].param).device)
        ref = torch.cat([out for _, out in pairs])
        got = torch.cat([flatten_outputs(module(*args, **kwargs)) for (args, kwargs), _ in pairs])
        rows.append({"layer": name, "kernel": module.kernel,
                     "relative_error": relative_error(ref, got), "sqnr_db": sqnr_db(ref, got)})
    rows.sort(key=lambda row: -row["relative_error"])
    return rows


@contextlib.contextmanager
def _swapped(model: nn.Module, packed: PackedModel, backend: str):
    originals = {}
    try:
        # Parents first (an attention layer before its out_proj), put back in reverse.
        units = packed_units(packed.layers)
        for name in sorted(units):
            original = model.get_submodule(name)
            originals[name] = original
            device = getattr(original, units[name][0].param).device
            set_submodule(model, name, build_packed_unit(units[name], original, backend).to(device))
        yield
    finally:
        for name, original in reversed(list(originals.items())):
            set_submodule(model, name, original)


@contextlib.contextmanager
def quantization_enabled(model: nn.Module):
    """Fake quantization (weights and inputs) on while measuring, restored afterwards.

    A run stopped before QAT's start_step still exports quantized weights; the reference
    is the model that computes with them. Ranges a quantizer chooses on its first enabled
    forward are put back to their start state on exit (choosing them is start_step's job).
    """
    from lightning_compress.quant.activations import input_quantizer_of

    switches = []
    for module in model.modules():
        weights = [get_weight_transform(module, Stage.FAKE_QUANT, slot) for slot in weight_slots(module)]
        for part in (*weights, input_quantizer_of(module)):
            if part is not None and hasattr(part, "enabled"):
                switches.append((part, part.enabled))
                part.enabled = True
    try:
        with preserved_ranges(model):  # ranges this measurement chose are QAT's start_step's to choose
            yield
    finally:
        for part, enabled in switches:
            part.enabled = enabled


@contextlib.contextmanager
def preserved_ranges(model: nn.Module):
    """Put back what the first enabled forward of each weight quantizer chooses (its
    ranges; see ``start_state``): reading an effective weight may choose them, which is
    QAT's ``start_step``'s job, on the weights of then."""
    saved = [(transform, transform.start_state())
             for module in model.modules() for _, _, transform in all_transforms(module)
             if hasattr(transform, "start_state")]
    try:
        yield
    finally:
        for transform, state in saved:
            transform.restore_start_state(state)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model.eval()`` while measuring; every submodule's own train/eval flag is restored
    on exit (not just the root's)."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training
