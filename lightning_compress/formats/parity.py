"""The parity check: does the packed model compute what the fake-quant model computes?

Three measurements, on the files as written (read back from disk):

1. weights: every dequantized packed weight equals the fake-quantized training weight,
   bit for bit, and every other tensor equals the model's;
2. outputs on the exact path (``"dequantize"``): relative error ``||a - b|| / ||a||``
   against the fake-quant model (float rounding only, so at most ``1e-5`` by default);
3. outputs on the fast path (the int8 GEMM of :mod:`~lightning_compress.formats.int8_gemm`,
   where a layer runs it: exact up to float rounding on layers trained with int8 dynamic
   activations, 8-bit per-token activations on weight-only ones): SQNR ``20 log10(||a|| / ||a - b||)`` in dB (at least 35 by default).

With ``backend="auto"`` the check also chooses the kernels (see :func:`choose_kernels`):
every layer that may run the int8 GEMM is measured alone on it, those within the SQNR
threshold are tried together in the whole model, and the ones the model cannot afford
run exact. The choice is recorded (``ParityReport.kernels``, ``parity.kernels`` in the
export's metadata) and ``load_packed(backend="auto")`` runs it: a kernel choice never
makes a correct export fail.

Per-layer figures (each layer fed the input the fake-quant layer saw, as the fake-quant
model runs: running sums only, whatever the number of batches) name the worst layers when
the check fails.
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
from lightning_compress.core.memory import ReleasePacer, release_freed_memory
from lightning_compress.core.targeting import module_name
from lightning_compress.core.transforms import Stage, all_transforms, get_weight_transform, weight_slots
from lightning_compress.formats.loader import replace_module
from lightning_compress.formats.outputs import OutputError, call_model, flatten_outputs, relative_error, sqnr_db
from lightning_compress.formats.packed import PackedLayer, PackedModel
from lightning_compress.formats.kernel_choice import calls_its_forward, int8_gemm_candidate, planned_kernel
from lightning_compress.formats.runtime import build_packed_unit
from lightning_compress.formats.weight_check import weight_mismatches


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
        release_freed_memory()  # what the caller freed (the packing), before this check's own
        mismatches = weight_mismatches(model, packed)
        release_freed_memory()
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
        candidates = _int8_gemm_candidates(built) if backend == "auto" else set()
        reference, measured = _run_measuring(model, built, candidates, inputs)
        release_freed_memory()  # each phase's freed blocks, before the next makes its own
        report.fast_layers = fast = _fast_layers(built)
        report.relative_error = _compared(model, built.swapped("dequantize"), inputs, reference).relative_error
        release_freed_memory()
        choice: Dict[str, str] = {}
        if backend == "auto":
            choice, report.fallbacks = choose_kernels(model, built, inputs, reference, measured, min_sqnr_db)
            report.kernels = choice
            report.fast_layers = fast = _fast_layers(built, choice)
        if fast:
            report.sqnr_db = _compared(model, built.swapped(backend, choice), inputs, reference).sqnr_db
        report.layers = _per_layer(built, measured, choice)
    return report


CHOICE_MARGIN_DB = 1.0
"""How far above ``min_sqnr_db`` the kernel choice keeps a layer alone and the model: the
choice is measured on the export's inputs only, and new inputs land near it (a tiny
LLaMA chosen at exactly 35 dB measured 34.9 to 35.3 dB on 40 fresh batches)."""


def choose_kernels(model: nn.Module, built: "_Replacements", inputs: Sequence[Any], reference: Sequence[Tensor],
                   measured: Mapping[str, "_Measured"], min_sqnr_db: float):
    """The kernel of every layer that may run the int8 GEMM (:func:`int8_gemm_candidate`)
    and ran on ``inputs``: ``"fbgemm"`` where it stays within ``min_sqnr_db`` plus
    :data:`CHOICE_MARGIN_DB`, alone and in the whole model, else ``"dequantize"``.
    Returns ``({layer: kernel}, {layer: why it runs exact})``.

    Alone: the layer's int8-GEMM output against the fake-quant layer's, on the inputs it
    saw (``measured`` while the fake-quant model ran). Together: the most accurate ``k`` of
    those that pass alone, with the largest ``k`` whose model output is within the
    threshold (searched by bisection, as the error grows with every layer added; the ``k``
    kept is always one measured within it). Layers that did not run are left out
    (unmeasured: the loader's default rule); layers whose inputs were not float32 on the
    CPU (a bfloat16 model) run exact: the int8 GEMM never ran on them, so nothing measured
    it."""
    needed = min_sqnr_db + CHOICE_MARGIN_DB
    candidates = [name for name, layer in measured.items() if "fbgemm" in layer.kernels]
    choice = {name: "dequantize" for name in candidates}
    fallbacks, alone = {}, {}
    for name in candidates:
        layer = measured[name]
        if layer.kernels["fbgemm"] is None:  # the kernel is unavailable here (warned)
            fallbacks[name] = "int8 GEMM unavailable"
        elif layer.unfit is not None:
            fallbacks[name] = f"its inputs are {layer.unfit}; the int8 GEMM takes float32 CPU inputs"
        else:
            alone[name] = layer.kernels["fbgemm"].sqnr_db
            if alone[name] < needed:
                fallbacks[name] = f"alone {alone[name]:.1f} dB"
    ranked = sorted((name for name in alone if name not in fallbacks), key=lambda name: -alone[name])

    def model_sqnr(count: int) -> float:
        trial = {**choice, **{name: "fbgemm" for name in ranked[:count]}}
        return _compared(model, built.swapped("auto", trial), inputs, reference).sqnr_db

    # low: a count measured within the threshold (0 is: no candidate on the int8 GEMM).
    low, high = 0, len(ranked)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if model_sqnr(middle) >= needed else (low, middle - 1)
    for name in ranked[low:]:
        fallbacks[name] = f"alone {alone[name]:.1f} dB; model output under {needed:g} dB with it"
    choice.update({name: "fbgemm" for name in ranked[:low]})
    return choice, fallbacks


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

    def drop(self, name: str) -> None:
        """Forget ``name``'s built modules (built again when next asked for)."""
        for key in [key for key in self._built if key[0] == name]:
            del self._built[key]

    def swapped(self, backend: str, choice: Optional[Mapping[str, str]] = None) -> Dict[str, nn.Module]:
        """``{layer: its packed module}`` of every layer, for :func:`_swapped`."""
        return {name: self.get(name, backend, (choice or {}).get(name)) for name in self.units}


def _compared(model: nn.Module, replacements: Mapping[str, nn.Module], inputs: Sequence[Any],
              reference: Sequence[Tensor]) -> OutputError:
    """``model`` with ``replacements`` swapped in, run on ``inputs`` and compared with the
    fake-quant model's output on each batch (``reference``, from :func:`_run_measuring`). A
    batch whose output holds another number of values (an output whose size depends on its
    values, such as ``y[y > t]``) is an infinite error: the replacements change what the
    model computes."""
    error = OutputError()
    with _swapped(model, replacements):
        for x, expected in zip(inputs, reference):
            got = flatten_outputs(call_model(model, x))
            if got.numel() != expected.numel():
                error.add_unequal()
            else:
                error.add(expected, got)
    return error


def _int8_gemm_candidates(built: "_Replacements") -> set:
    """Layers the kernel choice measures on the int8 GEMM: single-weight Linear layers
    called as modules (:func:`calls_its_forward`) on an int8 grid it runs
    (:func:`int8_gemm_candidate`)."""
    return {name for name, keys in built.units.items() if len(keys) == 1
            and calls_its_forward(built.grid(keys[0]), built.originals[name]) and int8_gemm_candidate(built.grid(keys[0]))}


@dataclass
class _Measured:
    """One layer's packed outputs against the fake-quant layer's on the inputs it saw:
    ``kernels`` maps a kernel choice (``None``: the backend's own) to its figures (``None``:
    that kernel is unavailable here); ``unfit`` describes an input the int8 GEMM does not
    take (not float32 on the CPU), if one came."""

    kernels: Dict[Optional[str], Optional[OutputError]]
    unfit: Optional[str] = None


def _run_measuring(model: nn.Module, built: "_Replacements", candidates: set, inputs: Iterable[Any]):
    """Run the fake-quant ``model`` on ``inputs``; each layer's packed module is fed the
    input the layer received as it comes (QAT's activation stage runs inside the layer, as
    in a packed layer), and its output compared there: nothing is held per layer but
    running sums, whatever the number and size of the batches. A candidate of the int8
    GEMM is measured on it and on the exact path (the choice needs both).

    Returns the model's outputs (one flat tensor per batch) and ``{layer: _Measured}`` for
    the layers that ran, in the order of ``built.units``."""
    # A recurrent unit's exact path is built before the hooks are in place: it starts as a
    # deep copy of its layer, which would copy them. The others are built when their layer
    # runs and dropped after it, so that only one layer's packed modules are held at a time
    # (an int4 LLM's codes are a tenth of its float weights, a third of the export's margin).
    exact = {name: ("dequantize" if name in candidates else None) for name in built.units}
    prebuilt = {name for name in built.units if isinstance(built.originals[name], nn.RNNBase)}
    for name in prebuilt:
        built.get(name, chosen=exact[name])
    measured: Dict[str, _Measured] = {}
    failed: List[str] = []  # the packed layer whose comparison raised, if one did
    pending: Dict[str, List[tuple]] = {name: [] for name in built.units}
    running_packed = []  # non-empty while a packed unit runs (an attention unit runs its own, hooked, out_proj)
    pacer = ReleasePacer()
    handles = []

    def compare(name: str, args, kwargs, output) -> None:
        kernels = (exact[name], "fbgemm") if name in candidates else (None,)
        layer = measured.setdefault(name, _Measured({kernel: OutputError() for kernel in kernels}))
        reference = flatten_outputs(output)
        # The fake-quant layer's own temporaries (its fake-quantized weight) are freed by
        # now: handed back before the packed module makes its own (see core.memory).
        float_bytes = sum(built.grid(key).float32_bytes for key in built.units[name])
        pacer.done(float_bytes)
        running_packed.append(name)
        try:
            for kernel in kernels:
                module = built.get(name, chosen=kernel)
                if kernel == "fbgemm":
                    if module.kernel != "fbgemm":
                        layer.kernels[kernel] = None
                        continue
                    x = args[0] if args else kwargs.get("input")
                    if isinstance(x, Tensor) and not module.quantizes_itself(x):
                        layer.unfit = layer.unfit or f"{x.dtype} on {x.device.type}"
                        continue
                if layer.kernels[kernel] is not None:
                    layer.kernels[kernel].add(reference, flatten_outputs(module(*args, **kwargs)))
        finally:
            running_packed.pop()
        if name not in prebuilt and not running_packed:
            built.drop(name)
        pacer.done(float_bytes)  # and the packed modules' codes and dequantized weights

    def record(name: str, args, kwargs) -> None:
        if not running_packed:
            pending[name].append((args, kwargs))

    def measure(name: str, output) -> None:
        if not running_packed:
            try:
                compare(name, *pending[name].pop(), output)
            except Exception:
                failed.append(name)  # a packed layer failed, not the model on its inputs
                raise

    for name in built.units:
        module = model.get_submodule(name)
        # The inputs as the layer receives them, before any user pre-hook changes them.
        handles.append(module.register_forward_pre_hook(
            lambda _, args, kwargs, name=name: record(name, args, kwargs), prepend=True, with_kwargs=True))
        handles.append(module.register_forward_hook(lambda _, __, output, name=name: measure(name, output)))
    try:
        outputs = [flatten_outputs(call_model(model, x, index, packed_failed=failed)) for index, x in enumerate(inputs)]
    finally:
        for handle in handles:
            handle.remove()
    return outputs, {name: measured[name] for name in built.units if name in measured}


def _per_layer(built: "_Replacements", measured: Mapping[str, _Measured], choice: Mapping[str, str]):
    rows = []
    for name, layer in measured.items():
        figures = layer.kernels[choice.get(name)]
        kernel = built.get(name, chosen=choice.get(name)).kernel
        rows.append({"layer": name, "kernel": kernel, "relative_error": figures.relative_error,
                     "sqnr_db": figures.sqnr_db})
    rows.sort(key=lambda row: -row["relative_error"])
    return rows


@contextlib.contextmanager
def _swapped(model: nn.Module, replacements: Mapping[str, nn.Module]):
    originals = {}
    try:
        # Parents first (an attention layer before its out_proj), put back in reverse.
        for name in sorted(replacements):
            originals[name] = model.get_submodule(name)
            replace_module(model, name, replacements[name])
        yield
    finally:
        for name, original in reversed(list(originals.items())):
            replace_module(model, name, original)


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


__all__ = ["CHOICE_MARGIN_DB", "OutputError", "ParityReport", "call_model", "check_parity", "choose_kernels",
           "eval_mode", "flatten_outputs", "preserved_ranges", "quantization_enabled", "relative_error", "sqnr_db"]
