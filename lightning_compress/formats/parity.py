"""The parity check: does the packed model compute what the fake-quant model computes?

Three measurements, on the files as written (read back from disk):

1. weights: every dequantized packed weight equals the fake-quantized training weight,
   bit for bit, and every other tensor equals the model's;
2. outputs on the exact path (``"dequantize"``): relative error ``||a - b|| / ||a||``
   against the fake-quant model (float rounding only, so at most ``1e-5`` by default);
3. outputs on the fast path (the fbgemm int8 GEMM with dynamic int8 activations, where
   a layer runs it): SQNR ``20 log10(||a|| / ||a - b||)`` in dB (at least 35 by default).

With ``backend="auto"`` the check also chooses the kernels (see :func:`choose_kernels`):
every layer that may run the int8 GEMM is measured alone on it, those within the SQNR
threshold are tried together in the whole model, and the ones the model cannot afford
run exact. The choice is recorded (``ParityReport.kernels``, ``parity.kernels`` in the
export's metadata) and ``load_packed(backend="auto")`` runs it: a kernel choice never
makes a correct export fail.

Per-layer figures (each layer fed the input the fake-quant layer saw) name the worst
layers when the check fails.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_compress.core.attention import fast_path_disabled
from lightning_compress.core.targeting import module_name
from lightning_compress.core.transforms import Stage, all_transforms, get_weight_transform, weight_slots
from lightning_compress.formats.blocks import dequantizes_to
from lightning_compress.formats.loader import set_submodule
from lightning_compress.formats.packed import PackedLayer, PackedModel
from lightning_compress.formats.runtime import build_packed_unit, int8_gemm_candidate, planned_kernel


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
    kernels: Dict[str, str] | None = None  # measured choice {layer: kernel}; None: not measured
    fallbacks: Dict[str, str] = field(default_factory=dict)  # {layer: why it runs exact}

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
        if self.fallbacks:
            shown = "; ".join(f"{name} ({why})" for name, why in list(self.fallbacks.items())[:5])
            parts.append(f"{len(self.fallbacks)} layer(s) run exact instead of the int8 GEMM: {shown}")
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
            "kernels": self.kernels,
            "fallbacks": self.fallbacks,
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
        built = _Replacements(model, packed, backend)
        report = ParityReport(
            weights_exact=not mismatches,
            weight_mismatches=mismatches,
            relative_error=None,
            sqnr_db=None,
            fast_layers=[],
            max_relative_error=max_relative_error,
            min_sqnr_db=min_sqnr_db,
        )
        if not inputs:
            report.fast_layers = _fast_layers(built)
            return report
        # The fake-quant model runs before any packed module is built: its largest layer's
        # fake quantization and the packed modules are not in memory together.
        reference, layer_io = _run_recording(model, built.units, inputs)
        report.fast_layers = fast = _fast_layers(built)
        report.relative_error = relative_error(reference, _outputs(model, built.swapped("dequantize"), inputs))
        choice: Dict[str, str] = {}
        if backend == "auto":
            choice, report.fallbacks = choose_kernels(model, built, inputs, reference, layer_io, min_sqnr_db)
            report.kernels = choice
            report.fast_layers = fast = _fast_layers(built, choice)
        if fast:
            report.sqnr_db = sqnr_db(reference, _outputs(model, built.swapped(backend, choice), inputs))
        report.layers = _per_layer(built, layer_io, choice)
    return report


CHOICE_MARGIN_DB = 1.0
"""How far above ``min_sqnr_db`` the kernel choice keeps a layer alone and the model: the
choice is measured on the export's inputs only, and new inputs land near it (a tiny
LLaMA chosen at exactly 35 dB measured 34.9 to 35.3 dB on 40 fresh batches)."""


def choose_kernels(model: nn.Module, built: "_Replacements", inputs: Sequence[Any], reference: Tensor,
                   layer_io: Mapping[str, List[tuple]], min_sqnr_db: float):
    """The kernel of every layer that may run the int8 GEMM (:func:`int8_gemm_candidate`)
    and ran on ``inputs``: ``"fbgemm"`` where it stays within ``min_sqnr_db`` plus
    :data:`CHOICE_MARGIN_DB`, alone and in the whole model, else ``"dequantize"``.
    Returns ``({layer: kernel}, {layer: why it runs exact})``.

    Alone: the layer's int8-GEMM output against the fake-quant layer's, on the inputs it
    saw. Together: the most accurate ``k`` of those that pass alone, with the largest ``k``
    whose model output is within the threshold (searched by bisection, as the error grows
    with every layer added; the ``k`` kept is always one measured within it). Layers that
    did not run are left out (unmeasured: the loader's default rule); layers whose inputs
    were not float32 on the CPU (a bfloat16 model) run exact: the int8 GEMM never ran on
    them, so nothing measured it."""
    needed = min_sqnr_db + CHOICE_MARGIN_DB
    candidates = [name for name, keys in built.units.items() if layer_io.get(name) and len(keys) == 1
                  and isinstance(built.originals[name], nn.Linear) and int8_gemm_candidate(built.grid(keys[0]))]
    choice = {name: "dequantize" for name in candidates}
    fallbacks, alone = {}, {}
    for name in candidates:
        module = built.get(name, "auto", "fbgemm")
        if module.kernel != "fbgemm":  # the kernel is unavailable here (warned)
            fallbacks[name] = "int8 GEMM unavailable"
            continue
        unfit = [x for x in _first_inputs(layer_io[name]) if not module.quantizes_itself(x)]
        if unfit:
            fallbacks[name] = (f"its inputs are {unfit[0].dtype} on {unfit[0].device.type}; the int8 GEMM takes"
                               " float32 CPU inputs")
            continue
        alone[name] = _layer_figures(module, layer_io[name])[1]
        if alone[name] < needed:
            fallbacks[name] = f"alone {alone[name]:.1f} dB"
    ranked = sorted((name for name in alone if name not in fallbacks), key=lambda name: -alone[name])

    def model_sqnr(count: int) -> float:
        trial = {**choice, **{name: "fbgemm" for name in ranked[:count]}}
        return sqnr_db(reference, _outputs(model, built.swapped("auto", trial), inputs))

    # low: a count measured within the threshold (0 is: no candidate on the int8 GEMM).
    low, high = 0, len(ranked)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if model_sqnr(middle) >= needed else (low, middle - 1)
    for name in ranked[low:]:
        fallbacks[name] = f"alone {alone[name]:.1f} dB; model output under {needed:g} dB with it"
    choice.update({name: "fbgemm" for name in ranked[:low]})
    return choice, fallbacks


def _first_inputs(pairs: Sequence[tuple]) -> List[Tensor]:
    """A Linear layer's recorded input tensors (positional, or ``input=``)."""
    found = [args[0] if args else kwargs.get("input") for (args, kwargs), _ in pairs]
    return [x for x in found if isinstance(x, Tensor)]


def _weight_mismatches(model: nn.Module, packed: PackedModel) -> List[str]:
    """Keys whose packed value differs from the model's; one layer read (and its effective
    weight computed) at a time."""
    bad = []
    for key, layer in packed.layers.items():
        trained = getattr(model.get_submodule(module_name(key, layer.param)), layer.param).detach()
        if not dequantizes_to(layer.weight, trained):
            bad.append(key)
        del layer, trained
    state = model.state_dict()
    for key, tensor in packed.tensors.items():
        current = _effective(model, key, state)
        if current is None or not torch.equal(tensor, current.detach().cpu()):
            bad.append(key)
    packed.check_complete()
    return bad


def _effective(model: nn.Module, key: str, state: Mapping[str, Tensor]) -> Tensor | None:
    owner, _, leaf = key.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if leaf in weight_slots(module):  # compare the effective weight
        return getattr(module, leaf)
    return state.get(key)


def _fast_layers(built: "_Replacements", choice: Optional[Mapping[str, str]] = None) -> List[str]:
    return [name for name in built.units if built.get(name, chosen=(choice or {}).get(name)).kernel == "fbgemm"]


class _Replacements:
    """The packed module of each layer of ``model``, built once per kernel (the check
    builds each layer several times: alone, in the model, per choice tried, and building
    the int8 GEMM prepacks its weight), from its weights read from ``packed`` when first
    asked for: only the packed modules are held, never the decoded codes of all layers."""

    def __init__(self, model: nn.Module, packed: PackedModel, backend: str) -> None:
        self.packed = packed
        self.units: Dict[str, List[str]] = {}  # layer -> its weight keys
        for key, grid in packed.grids.items():
            self.units.setdefault(module_name(key, grid.param), []).append(key)
        self.originals = {name: model.get_submodule(name) for name in self.units}
        self.backend = backend
        self._built: Dict[tuple, nn.Module] = {}

    def grid(self, key: str) -> PackedLayer:
        """The layer ``key`` as the metadata describes it (no tensor read)."""
        return self.packed.grids[key]

    def get(self, name: str, backend: Optional[str] = None, chosen: Optional[str] = None) -> nn.Module:
        backend = backend or self.backend
        original = self.originals[name]
        keys = self.units[name]
        # One module per kernel it runs: "auto" without a choice builds what "dequantize" builds
        # for every layer that would not try the int8 GEMM.
        key = (name, planned_kernel([self.grid(k) for k in keys], original, backend, chosen))
        if key not in self._built:
            # The device of the layer's own tensors: reading its weight would run its fake quantizer.
            device = next(itertools.chain(original.parameters(), original.buffers()), torch.empty(0)).device
            weights = [self.packed.layer(k) for k in keys]
            self._built[key] = build_packed_unit(weights, original, backend, chosen).to(device)
        return self._built[key]

    def swapped(self, backend: str, choice: Optional[Mapping[str, str]] = None) -> Dict[str, nn.Module]:
        """``{layer: its packed module}`` of every layer, for :func:`_swapped`."""
        return {name: self.get(name, backend, (choice or {}).get(name)) for name in self.units}


def _outputs(model: nn.Module, replacements: Mapping[str, nn.Module], inputs: Sequence[Any]) -> Tensor:
    with _swapped(model, replacements):
        return torch.cat([flatten_outputs(call_model(model, x)) for x in inputs])


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


def _per_layer(built: _Replacements, layer_io: Mapping[str, List[tuple]], choice: Mapping[str, str]):
    rows = []
    for name, pairs in layer_io.items():
        if not pairs:
            continue
        module = built.get(name, chosen=choice.get(name))
        error, sqnr = _layer_figures(module, pairs)
        rows.append({"layer": name, "kernel": module.kernel, "relative_error": error, "sqnr_db": sqnr})
    rows.sort(key=lambda row: -row["relative_error"])
    return rows


def _layer_figures(module: nn.Module, pairs: Sequence[tuple]):
    """(relative error, SQNR dB) of ``module`` against the fake-quant layer's recorded outputs."""
    ref = torch.cat([out for _, out in pairs])
    got = torch.cat([flatten_outputs(module(*args, **kwargs)) for (args, kwargs), _ in pairs])
    return relative_error(ref, got), sqnr_db(ref, got)


@contextlib.contextmanager
def _swapped(model: nn.Module, replacements: Mapping[str, nn.Module]):
    originals = {}
    try:
        # Parents first (an attention layer before its out_proj), put back in reverse.
        for name in sorted(replacements):
            originals[name] = model.get_submodule(name)
            set_submodule(model, name, replacements[name])
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
