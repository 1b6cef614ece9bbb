"""A calibrated starting point for QAT: GPTQ or AWQ, and SmoothQuant smoothing.

QAT trains from wherever its first fake-quantized step finds the weights. Starting from
a good post-training point closes more of the gap (ModelOpt and NNCF recommend it), so
:class:`CalibratedStart` records, during the training batches just before
``start_step``, what these methods need from the layers' inputs, and at ``start_step``
changes the model so that its first fake-quantized forward *is* that post-training model:

- ``smoothing=alpha`` (SmoothQuant): per-input-channel scales that move activation
  outliers into the weights, folded into the preceding norm or layer (see
  :mod:`~lightning_compress.quant.mappings`);
- ``init="awq"``: per-input-channel scales searched on the recorded inputs for the
  least output error of the quantized balance layers, folded the same way;
- ``init="gptq"``: each Linear's (or Conv2d's) weight replaced by GPTQ's error-compensated rounding
  from the recorded inputs' Hessian, and its quantizer's grid fixed at GPTQ's scales
  (learned ranges start from them).

Nothing here imports Lightning: the QAT callback says when to record and when to start.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.core.distributed import all_reduce_max, all_reduce_sum_, broadcast_from_rank_zero, world_size
from lightning_compress.core.recompute import counts_as_training_forward
from lightning_compress.core.targeting import tied_parameter_names
from lightning_compress.core.transforms import Stage, get_weight_transform, raw_weight, weight_before
from lightning_compress.quant.fake_quant import as_matrix
from lightning_compress.quant.fold_check import FoldCheck
from lightning_compress.quant.gptq import accumulate_hessian, conv_columns, gptq_issue, gptq_issue_message, gptq_quantize
from lightning_compress.quant.mappings import ScaleMapping, covering_mappings, describe_setting
from lightning_compress.quant.spec import QuantSpec
from lightning_compress.quant.smoothing import (
    awq_scales,
    divide_output_rows_,
    scale_input_columns_,
    smoothquant_scales,
)
from lightning_compress.quant.weights import WeightFakeQuantizer

# Input rows kept per mapping for AWQ's search: its loss is a sum over them, and the
# first rows of every calibration batch are as good a sample as any.
AWQ_ROWS = 1024
# Input rows kept per mapping to check that its smooth module divides as folded.
_PROBE_ROWS = 8


_FIELDS = ("hessians", "rows", "absmax", "probes", "folds")


class CalibrationStatistics:
    """What the recorded forwards saw, per layer (GPTQ's Hessians) or per mapping (AWQ's
    input rows, SmoothQuant's per-channel maxima), and how many batches: plain tensors,
    checkpointed with the QAT callback so a run resumed inside the window continues."""

    def __init__(self) -> None:
        self.batches = 0
        self.hessians: Dict[str, Tensor] = {}
        self.rows: Dict[str, Tensor] = {}
        self.absmax: Dict[str, Tensor] = {}
        self.probes: Dict[str, Tensor] = {}
        self.folds: Dict[str, Tensor] = {}  # per mapping, what shows whether its fold keeps the loss (fold_check)

    def state_dict(self) -> Dict[str, object]:
        # Copies: the accumulators keep growing in place after a checkpoint is taken.
        return {"batches": self.batches, **{field: {k: v.clone() for k, v in getattr(self, field).items()}
                                            for field in _FIELDS}}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.batches = int(state["batches"])
        for field in _FIELDS:  # (a checkpoint from before `folds` was measured has none)
            setattr(self, field, {str(k): v.clone() for k, v in state.get(field, {}).items()})

    def to(self, device: torch.device) -> None:
        """Every statistic on ``device``: those restored from a checkpoint are on the CPU, and
        a resume after the last calibration batch records none that would move them."""
        for field in _FIELDS:
            setattr(self, field, {k: v.to(device) for k, v in getattr(self, field).items()})


def _on(kept: Optional[Tensor], new: Tensor) -> Optional[Tensor]:
    """``kept`` on ``new``'s device: statistics restored from a checkpoint are on the CPU,
    the inputs of a model trained on a GPU are not."""
    return None if kept is None else kept.to(new.device)


class CalibratedStart:
    """Records the calibration inputs of ``layers`` and sets up the calibrated start.

    Args:
        model: the model the layers belong to.
        layers: ``{weight key: layer}`` quantized by the QAT callback.
        quantizers: ``{weight key: WeightFakeQuantizer}`` of those layers.
        init: ``None``, ``"gptq"`` or ``"awq"``.
        smoothing: SmoothQuant's ``alpha``, or ``None``.
        mappings: where AWQ/SmoothQuant fold, from :func:`plan_calibrated_start`.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, nn.Module],
        quantizers: Mapping[str, WeightFakeQuantizer],
        *,
        init: str | None,
        smoothing: float | None,
        mappings: Sequence[ScaleMapping] = (),
    ) -> None:
        self.model = model
        self.layers = dict(layers)
        self.quantizers = dict(quantizers)
        self.init = init
        self.smoothing = smoothing
        self.statistics = CalibrationStatistics()
        self.mappings: List[ScaleMapping] = list(mappings)
        self._handles: list = []
        self._fold_check = FoldCheck(model, {m.smooth: m.balance for m in self.mappings}, lambda: self.statistics.folds)

    # ------------------------------------------------------------------ recording
    def start_recording(self) -> None:
        """Record the inputs of every forward (not a recompute inside the backward) until
        :meth:`stop_recording`: the caller records training batches only, and counts them
        (``statistics.batches``)."""
        if self._handles:
            return
        modules = dict(self.model.named_modules())
        if self.init == "gptq":
            for key, layer in self.layers.items():
                self._hook(layer, self._hessian_recorder(key))
        for mapping in self.mappings:
            self._hook(modules[mapping.balance[0]], self._mapping_recorder(mapping.smooth))
            self._hook(modules[mapping.smooth], self._probe_recorder(mapping.smooth))
        self._fold_check.attach()

    def stop_recording(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._fold_check.detach()

    def _hook(self, module: nn.Module, record: Callable[[Tensor], None]) -> None:
        def hook(module: nn.Module, args: tuple) -> None:
            # Not `module.training`: Lightning leaves submodules in the mode they were built
            # in (a transformers model loads in eval mode). Not grad mode either: reentrant
            # activation checkpointing runs the forward under no_grad, then again inside the
            # backward, which must not count twice. `self._handles`: a forward already under
            # way when recording stopped still calls the hooks it collected.
            if self._handles and args and isinstance(args[0], Tensor) and counts_as_training_forward():
                record(args[0].detach())

        self._handles.append(module.register_forward_pre_hook(hook))

    def _hessian_recorder(self, key: str) -> Callable[[Tensor], None]:
        hessians = self.statistics.hessians
        layer = self.layers[key]

        def record(inputs: Tensor) -> None:
            rows = conv_columns(inputs, layer) if isinstance(layer, nn.Conv2d) else inputs
            hessians[key] = accumulate_hessian(_on(hessians.get(key), rows), rows.float())

        return record

    def _mapping_recorder(self, smooth: str) -> Callable[[Tensor], None]:
        statistics = self.statistics

        def record(inputs: Tensor) -> None:
            rows = inputs.float().reshape(-1, inputs.shape[-1])
            if self.smoothing is not None:
                peak = rows.abs().amax(dim=0)
                old = _on(statistics.absmax.get(smooth), peak)
                statistics.absmax[smooth] = peak if old is None else torch.maximum(old, peak)
            if self.init == "awq":
                kept = _on(statistics.rows.get(smooth), rows)
                room = AWQ_ROWS - (0 if kept is None else kept.shape[0])
                if room > 0:
                    new = rows[:room].clone()
                    statistics.rows[smooth] = new if kept is None else torch.cat([kept, new])

        return record

    def _probe_recorder(self, smooth: str) -> Callable[[Tensor], None]:
        probes = self.statistics.probes

        def record(inputs: Tensor) -> None:
            if smooth not in probes:
                probes[smooth] = inputs.float().reshape(-1, inputs.shape[-1])[:_PROBE_ROWS].clone()

        return record

    # ------------------------------------------------------------------ the start
    @torch.no_grad()
    def apply(self) -> None:
        """Fold the smoothing/AWQ scales and run GPTQ, identically on every rank (the
        statistics are summed or maxed over ranks; rank 0's results are broadcast). On
        any failure every tensor it changed is put back: the model stays as trained.

        Raises:
            ValueError: naming a layer that saw no input while recording (its forward is
                not called as a module: e.g. an attention layer's fused output
                projection), a smooth module whose output did not scale as folded, or a
                mapping whose fold would change the loss (:mod:`fold_check`).
        """
        self.stop_recording()
        self._check_everything_recorded()
        layer = next(iter(self.layers.values()), None)  # (its parameters: Linear, attention, recurrent)
        if layer is not None:
            self.statistics.to(next(layer.parameters()).device)
        changed: List[tuple] = []  # (tensor, its value before), to put back on failure
        try:
            self._fold_all(changed)
            if self.init == "gptq":
                for key in self.layers:
                    self._gptq(key, changed)
        except BaseException:
            for tensor, before in reversed(changed):
                tensor.copy_(before)
            raise

    def _fold_all(self, changed: List[tuple]) -> None:
        self._fold_check.verify(self.statistics.folds, describe_setting(self.init, self.smoothing))
        modules = dict(self.model.named_modules())
        for mapping in self.mappings:
            scales = self._mapping_scales(mapping, modules)
            (scales,) = broadcast_from_rank_zero([scales])
            _fold(mapping, scales, modules, self.statistics.probes.get(mapping.smooth), changed)
            if self.init == "gptq":  # the layers' inputs are now X / s
                for name in mapping.balance:
                    if name in self.statistics.hessians:
                        self.statistics.hessians[name] /= scales[:, None] * scales[None, :]

    def _check_everything_recorded(self) -> None:
        """Every GPTQ layer has a Hessian and every mapping its activation statistics
        (recorded on the inputs of its first balance layer) on every rank: else name what
        saw no input. Decided over the ranks together, so that a layer silent on one rank
        only stops every rank with this message (rather than one rank raising while the
        others wait for it in the statistics' all-reduce)."""
        stats, setting, batches = self.statistics, describe_setting(self.init, self.smoothing), self.statistics.batches
        layers = list(self.layers) if self.init == "gptq" else []
        recorded = stats.rows if self.init == "awq" else stats.absmax
        missing = _missing_on_any_rank([key not in stats.hessians for key in layers]
                                       + [m.smooth not in recorded for m in self.mappings])
        where = f"in the {batches} calibration batch(es)"
        if world_size() > 1:
            where += f" on at least one of the {world_size()} processes"
        silent = [key for key, gone in zip(layers, missing) if gone]
        if silent:
            raise ValueError(
                f"{setting}: {silent} received no input {where}: their forward is not called as a module. Exclude"
                " them (`exclude`) or quantize them in a second QuantizationAwareTraining callback without `init`"
            )
        silent_mappings = [m for m, gone in zip(self.mappings, missing[len(layers):]) if gone]
        if silent_mappings:
            balance = [name for m in silent_mappings for name in m.balance]
            raise ValueError(
                f"{setting}: {[m.balance[0] for m in silent_mappings]} received no input {where}: their forward is"
                f" not called as a module, so the scales of the mappings they belong to cannot be chosen. Exclude"
                f" {balance} (`exclude`), or fix `mappings`"
            )

    def _mapping_scales(self, mapping: ScaleMapping, modules: Mapping[str, nn.Module]) -> Tensor:
        quantized = [name for name in mapping.balance if name in self.quantizers]
        if self.init == "awq":
            weights = [as_matrix(weight_before(modules[n], Stage.FAKE_QUANT).detach().float()) for n in quantized]
            quantizer = self.quantizers[quantized[0]]
            result = awq_scales(self.statistics.rows[mapping.smooth], weights, quantizer.spec,
                                choose=quantizer.range_grid)
            return result.scales
        weights = [weight_before(modules[n], Stage.FAKE_QUANT).detach().float() for n in mapping.balance]
        weight_absmax = torch.stack([as_matrix(w).abs().amax(dim=0) for w in weights]).amax(dim=0)
        activation_absmax = all_reduce_max(self.statistics.absmax[mapping.smooth])
        return smoothquant_scales(activation_absmax, weight_absmax, self.smoothing)

    def _gptq(self, key: str, changed: List[tuple]) -> None:
        layer, quantizer = self.layers[key], self.quantizers[key]
        hessian = self.statistics.hessians[key].clone()
        all_reduce_sum_([hessian])
        weight = weight_before(layer, Stage.FAKE_QUANT).detach()
        mask = get_weight_transform(layer, Stage.MASK)
        keep = None if mask is None or mask.keep is None else as_matrix(mask.keep)
        choose = quantizer.range_grid
        if quantizer.learned:  # the forward computes with exp(log(scale))
            base = choose
            choose = lambda columns: _through_log(*base(columns))  # noqa: E731
        quantized, scale, zero_point = gptq_quantize(as_matrix(weight.float()), hessian, quantizer.spec, choose,
                                                     keep=keep)
        quantized, scale = broadcast_from_rank_zero([quantized, scale])
        (zero_point,) = broadcast_from_rank_zero([zero_point])
        raw = raw_weight(layer)
        new = quantized.view(raw.shape).to(raw.dtype)
        changed.append((raw, raw.detach().clone()))
        raw.copy_(new if keep is None else torch.where(keep.view(raw.shape), new, raw))
        quantizer.start_from(scale, zero_point)


def _through_log(scale: Tensor, zero_point: Tensor) -> tuple:
    """Scales ``s`` with ``exp(log(s)) == s``: learned ranges compute with
    ``exp(log_scale)``, so only such scales give the forward GPTQ's exact weights."""
    for _ in range(4):  # a fixed point is one or two round trips away
        again = scale.log().exp()
        if torch.equal(again, scale):
            break
        scale = again
    return scale, zero_point


def _missing_on_any_rank(missing: List[bool]) -> List[bool]:
    """``missing`` or-ed over the ranks (one all-reduce)."""
    flags = all_reduce_max(torch.tensor(missing, dtype=torch.int32)) if missing else torch.zeros(0)
    return [bool(flag) for flag in flags.tolist()]


def _fold(mapping: ScaleMapping, scales: Tensor, modules: Mapping[str, nn.Module], probe: Tensor | None,
          changed: List[tuple]) -> None:
    """Divide ``mapping.smooth``'s output channels by ``scales`` and scale the balance
    layers' input columns by them, appending what changed to ``changed``; checked on
    recorded inputs of the smooth module, in float (any fake quantization bypassed)."""
    smooth = modules[mapping.smooth]
    smooth_weight = raw_weight(smooth) if isinstance(smooth, nn.Linear) else smooth.weight
    smooth_bias = getattr(smooth, "bias", None)
    tensors = [smooth_weight, *([] if smooth_bias is None else [smooth_bias])]
    tensors += [raw_weight(modules[name]) for name in mapping.balance]
    changed.extend((tensor, tensor.detach().clone()) for tensor in tensors)
    before = None if probe is None else _float_output(smooth, probe.to(smooth_weight))
    divide_output_rows_(smooth_weight, smooth_bias, scales)
    for name in mapping.balance:
        scale_input_columns_(raw_weight(modules[name]), scales)
    if before is not None:
        after = _float_output(smooth, probe.to(smooth_weight))
        # Relative to each channel's whole output: the folded weights are rounded to their
        # dtype (in bf16 that moves outputs near zero by more than any elementwise
        # tolerance), and a norm that does not scale with its weight (x * (1 + w)) is off
        # by far more.
        expected = before / scales
        tolerance = max(1e-4, 8 * torch.finfo(smooth_weight.dtype).eps)
        # Per output channel: the scales span orders of magnitude, and an error confined
        # to channels of small output would vanish in the whole output's norm.
        error = (after - expected).reshape(-1, expected.shape[-1]).norm(dim=0)
        size = expected.reshape(-1, expected.shape[-1]).norm(dim=0)
        if (error > tolerance * size + 1e-6 * size.max()).any():
            raise ValueError(
                f"{mapping.smooth!r} ({type(smooth).__name__}) did not divide its output by the folded scales, so"
                f" folding them would change the model; exclude {list(mapping.balance)} from `targets` or drop"
                " init='awq'/`smoothing`"
            )


def _float_output(module: nn.Module, inputs: Tensor) -> Tensor:
    """``module(inputs)`` in float32, a Linear computed from the weight entering its
    fake quantization (another QAT callback's quantizer may be on); outside autocast
    (the start runs inside the training forward, under bf16-mixed in bf16)."""
    with torch.autocast(inputs.device.type, enabled=False):
        if isinstance(module, nn.Linear):
            bias = None if module.bias is None else module.bias.float()
            return F.linear(inputs.float(), weight_before(module, Stage.FAKE_QUANT).float(), bias)
        return module(inputs).float()


def plan_calibrated_start(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    specs: Mapping[str, QuantSpec],
    *,
    init: str | None,
    smoothing: float | None,
    rules: Mapping[str, Sequence[str]] | None = None,
) -> List[ScaleMapping]:
    """Check, before anything is attached, that ``init``/``smoothing`` can apply to the
    quantized ``layers`` (on grids ``specs``) of ``model``; return the mappings AWQ or
    SmoothQuant fold through (``rules``: the user's ``mappings``, else the built-in ones).

    Raises:
        ValueError: naming the layers: one GPTQ cannot take (not an ``nn.Linear`` or
            ungrouped ``nn.Conv2d``), a quantized layer no mapping covers, a mapping whose
            quantized layers are on different grids (AWQ), a norm whose output does not
            scale with its weight (Gemma's ``x * (1 + weight)``), or a weight the start
            would rewrite that another module shares (tied embeddings).
    """
    setting = describe_setting(init, smoothing)
    written = {}
    if init == "gptq":
        fused = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
        issues = [gptq_issue_message(key, why) for key, layer in layers.items() if (why := gptq_issue(layer, fused))]
        if issues:
            raise ValueError("; ".join(issues[:4]) + (f"; and {len(issues) - 4} more" if len(issues) > 4 else ""))
        written.update({key: raw_weight(layer) for key, layer in layers.items()})
    mappings: List[ScaleMapping] = []
    if init == "awq" or smoothing is not None:
        mappings = covering_mappings(model, layers, specs, setting, init, rules)
        modules = dict(model.named_modules())
        for mapping in mappings:
            smooth = modules[mapping.smooth]
            if not isinstance(smooth, nn.Linear):
                _check_norm_divides(mapping.smooth, smooth, setting)
            written[mapping.smooth] = raw_weight(smooth)
            written.update({name: raw_weight(modules[name]) for name in mapping.balance})
    _check_untied(model, written, setting)
    return mappings


def _check_norm_divides(name: str, norm: nn.Module, setting: str) -> None:
    """A norm's output must scale with its weight (and bias): ``y(2w, 2b) == 2 y(w, b)``."""
    weight, bias = norm.weight, getattr(norm, "bias", None)
    probe = torch.randn(4, weight.numel(), generator=torch.Generator().manual_seed(0)).to(weight)
    with torch.no_grad():
        before = norm(probe).float()
        for tensor in (weight, bias):
            if tensor is not None:
                tensor.mul_(2)  # exact, as is the division that undoes it
        after = norm(probe).float()
        for tensor in (weight, bias):
            if tensor is not None:
                tensor.div_(2)
    if not torch.allclose(after, 2 * before, rtol=1e-4, atol=1e-6):
        raise ValueError(
            f"{setting} folds its scales into {name!r} ({type(norm).__name__}) by dividing its weight, but its output"
            " does not scale with its weight (e.g. it computes x * (1 + weight)), so folding would change the model;"
            " exclude the layers that read it, or give `mappings` that leave it out"
        )


def _check_untied(model: nn.Module, written: Mapping[str, Tensor], setting: str) -> None:
    """The start rewrites these weights in place: one another module shares (a head tied
    to the input embedding) would change there too."""
    tied = tied_parameter_names(model)
    for key, weight in written.items():
        names = tied.get(id(weight))
        if names:
            raise ValueError(
                f"{setting} rewrites the weight of {key!r} in place, but it is tied: {names} are one tensor, so the"
                f" other module would change too; exclude {key!r} (e.g. exclude=[{key.rpartition('.')[2]!r}]) or untie"
                " the weights"
            )


__all__ = ["AWQ_ROWS", "CalibratedStart", "CalibrationStatistics", "describe_setting", "plan_calibrated_start"]
