"""QuantizationAwareTraining: fake-quantized weights (and activations) while training."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, NamedTuple

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress.callbacks.base import LayerCompressionCallback
from lightning_compress.callbacks.calibration_window import CalibrationWindow
from lightning_compress.callbacks.compatibility import check_quantization_trains
from lightning_compress.core.attention import keep_padded_batches
from lightning_compress.core.side_optimizer import SideOptimizer
from lightning_compress.core.schedule import fractional_steps, resolve_step
from lightning_compress.core.targeting import module_name, name_matches, weight_param
from lightning_compress.core.transforms import (
    INPUT,
    Stage,
    install_weight_transform,
    is_bound,
    raw_weight,
    remove_input_transform,
)
from lightning_compress.quant.activations import DynamicTokenQuantizer, StaticRangeObserver, check_output_projections
from lightning_compress.quant.calibrated_start import CalibratedStart, plan_calibrated_start
from lightning_compress.quant.config import QATConfig
from lightning_compress.quant.quantizer_state import (
    checkpoint_misfit, grid_differences, load_entry, quantizer_entry, take_over)
from lightning_compress.quant.spec import QuantSpec
from lightning_compress.quant.weights import WeightFakeQuantizer, attach_weight_quantizers

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _Attach(NamedTuple):
    """The arguments of ``_attach``, kept while an evaluation waits for a checkpoint."""

    pl_module: Any
    layers: Mapping[str, nn.Module]
    specs: Mapping[str, QuantSpec]
    rivals: set
    plan: Any  # quant.quantizer_state.TakeOver
    mappings: list


class QuantizationAwareTraining(LayerCompressionCallback):
    r"""Train with the rounding the model will meet after export.

    Weights of the targeted layers are fake-quantized in every forward pass from
    ``start_step`` on (quantize, then dequantize, on torchao's grid; the backward is the
    straight-through estimator with clipping), so the network learns weights that survive
    rounding. Fake quantization is the last stage of the weight-transform stack: it sees
    the pruned (and LoRA-merged) weight, and zero is on every grid, so pruned weights stay
    exactly zero. It stays attached after ``fit`` so ``trainer.validate``/``test`` and the
    export see the quantized model; use :func:`lightning_compress.quantized_weights` for the
    integer codes.

    Example::

        trainer = Trainer(callbacks=[QuantizationAwareTraining(weights="int4", group_size=32)])

    Logged with ``pl_module.log`` every step: ``qat/enabled`` (0 before ``start_step``,
    then 1), ``qat/weight_bits`` (the mean weight bits of the quantized layers, weighted
    by their parameter counts; 32 while they still compute in float) and, with
    ``activations``, ``qat/activation_bits`` (8, or 32 before ``start_step``).

    Args:
        weights: ``"int8"``, ``"int4"``, ... (``"int2"`` to ``"int8"``) or bits as an int.
        granularity: ``"channel"`` (one scale per output channel), ``"group"`` (one per
            ``group_size`` inputs) or ``"tensor"``. Defaults to ``"group"`` when
            ``group_size`` is given, else ``"channel"``.
        group_size: inputs per scale for ``granularity="group"``; must divide every
            targeted layer's input size (Conv: ``in_channels * kernel``).
        symmetric: zero point 0 (default), or an integer zero point per scale.
        scale_dtype: ``"float32"`` (default), ``"float16"`` or ``"bfloat16"`` (or the torch dtype): the dtype
            the export stores scales in. Scales are rounded to it while training, so the
            exported model computes exactly what was trained; ``"float16"`` makes int4
            group-128 files about 3% smaller.
        weight_range: how each group's range is set. ``"minmax"`` (default): its
            min/max, every step (torchao's QAT grid). ``"mse"``: its min/max times a
            clipping ratio from 1.0 down to 0.5, chosen at ``start_step`` as the one with
            the least squared quantization error, then kept; it closes more of the PTQ
            gap at 4 bits and below (BENCHMARKS.md).
            With ``learn_ranges``, the grid the learned scales start from.
        learn_ranges: learn the weight scales (LSQ) instead of computing them from the
            weight each step, starting from the ``weight_range`` grid. They train with
            their own Adam optimizer (stepped
            right after yours, checkpointed with this callback), so your optimizer and LR
            schedulers are untouched.
        range_lr: Adam learning rate of the learned ranges. The scales are learned as
            ``log(scale)``, so this is a relative step size, whatever the layer.
        ewgs_delta: ``0`` (default): the weights' backward is the plain straight-through
            estimator; ``delta`` in ``(0, 2)``: EWGS (Lee et al. 2021), each weight's
            gradient times ``1 + delta * sign(g) * (w/s - round(w/s))``: from mse ranges it
            closed 81% of the char LM's int4 PTQ gap at 0.2, against 68% (BENCHMARKS.md).
        activations: ``None`` (weight-only), ``"int8_dynamic"`` (per-token, ranges from
            each input) or ``"int8_static"`` (per-tensor, observed then frozen).
        observer: for ``"int8_static"``: ``"minmax"`` or ``"moving_average"``.
        calibration_steps: optimizer steps after ``start_step`` during which the static
            observers update; they are frozen afterwards.
        init: where fake quantization starts from. ``None`` (default): the weights as
            trained so far, on the ``weight_range`` grid. ``"gptq"``: at ``start_step``
            each Linear weight is replaced by GPTQ's error-compensating rounding
            (Frantar et al. 2022) from its inputs over the ``calibration_batches``
            training batches before ``start_step``, and its grid is fixed at GPTQ's
            scales (learned ranges start from them), so the first fake-quantized forward
            is the GPTQ model; targets must be ``nn.Linear`` layers. ``"awq"``: per-input-
            channel scales searched on those inputs for the least output error of the
            quantized layers (Lin et al. 2024), folded into the norm or layer before them
            (LLaMA-style and BERT-style block mappings, see
            :mod:`~lightning_compress.quant.mappings`); a targeted layer no mapping
            covers is refused at setup, named. Both combine with ``weight_range``
            (``"mse"`` clips each group's range as it is rounded).
        smoothing: SmoothQuant's ``alpha`` in ``[0, 1]`` (0.5 is the paper's default) for
            int8 ``activations``: at ``start_step``, activation outliers are moved into
            the weights with per-channel scales ``max|X|^alpha / max|W|^(1-alpha)``
            from the calibration batches, folded through the same mappings as ``"awq"``.
            Combines with ``init="gptq"``, not with ``"awq"``.
        mappings: where ``"awq"``/``smoothing`` fold their scales, replacing the built-in
            ones: ``{smooth module: [layers reading its output]}``, e.g. ``{"norm1": ["qkv"]}``;
            a norm or a Linear whose output nothing but those layers reads (see README).
        calibration_batches: training batches before ``start_step`` whose layer inputs
            calibrate ``init``/``smoothing``. Where the run does not hold them (``start_step=0``,
            a float checkpoint fine-tuned from its last step), the next are recorded first
            and fake quantization starts that many steps later (with a warning).
        start_step: first fake-quantized step (train in float before it): an int
            optimizer step or a float fraction of the run.
        freeze_bn_step: from this step on BatchNorm layers keep their running statistics
            (eval mode) while training; ``None`` never freezes them.
        overrides: ``{name glob: {option: value}}`` for mixed precision, with options
            ``bits``/``weights``, ``granularity``, ``group_size``, ``symmetric``; e.g.
            ``{"features.0": {"bits": 8}, "classifier": {"bits": 8}}``. The first matching
            glob wins.
        targets: layer types and/or name globs; default every Linear, Conv and
            ``nn.MultiheadAttention`` layer (its ``in_proj_weight``, with ``activations``
            on query, key and value; its ``out_proj`` is a Linear). Embedding layers are
            quantizable when targeted.
        exclude: layer types and/or name globs to keep in float.
        on_incompatible: ``"error"`` (default): targeted layers this grid cannot quantize
            (a ``group_size`` that does not divide them, a layer GPTQ cannot round or no AWQ
            mapping covers, a grid another callback rules out) stop the run, all named in one
            ``IncompatibleSettings``; ``"skip"``: they stay in float, named in one warning
            at setup and counted in the report (``qat/skipped_layers``, the layer table's
            ``skipped`` column). A grouped or depthwise convolution selected by type that
            the grid cannot quantize is left out either way; one a name glob selects stays
            an error.
        name: distinguishes the checkpoint state of several QAT callbacks in one Trainer;
            each needs its own (Lightning refuses two of one class without: "Found more than one stateful callback").
        config: a built :class:`~lightning_compress.quant.config.QATConfig` instead of
            the arguments above.

    Raises:
        ArgumentError: (a ``ValueError``) at construction, naming a bad argument.
        IncompatibleSettings: (a ``ValueError``) at setup, naming every targeted layer a
            ``group_size`` does not divide (with ``on_incompatible="error"``).
        ValueError: at setup, for targets that match no quantizable layer, an ``overrides`` glob
            that matches nothing, or ``activations`` on the ``out_proj`` of an
            ``nn.MultiheadAttention`` this callback does not quantize (the attention layer
            calls it); when resuming, for a checkpoint trained on another grid
            or other layers.
        IncompatibleSettings: before the first step, for a ``start_step`` at or past the
            end of a run that exports (no step would train the exported grid).
    """

    section = "qat"
    config_class = QATConfig
    # (The grid and `weight_range` are checked per layer, with their own messages.)
    resume_settings = ("start_step", "learn_ranges", "activations", "observer", "calibration_steps", "freeze_bn_step",
                       "init", "smoothing", "calibration_batches", "mappings", "ewgs_delta")
    training_settings = {"ewgs_delta": 0.0}  # the backward only; 0.0 before the option existed

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reset()
        self._start = 0
        self._freeze_bn_at: int | None = None

    def _reset(self) -> None:
        self._layers: Dict[str, nn.Module] = {}
        self._weight_quantizers: Dict[str, WeightFakeQuantizer] = {}
        self._input_quantizers: Dict[str, Any] = {}
        self._restored = None
        self._ranges = SideOptimizer(self.range_lr)
        self._calibration: CalibrationWindow | None = None  # with `init`/`smoothing`
        self._refused: Any = None  # what an evaluation would attach, refused unless a checkpoint gives the grid

    @property
    def layer_specs(self) -> Dict[str, QuantSpec]:
        """``{layer name: the grid it is quantized on}`` of the model set up."""
        return {name: quantizer.spec for name, quantizer in self._weight_quantizers.items()}

    # ------------------------------------------------------------------ hooks
    @override
    def install(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Every stage, not only fit: `Trainer(callbacks=[qat]).test(model, ckpt_path=...)`
        # must evaluate the quantized model the checkpoint describes.
        if self._layers and is_bound(pl_module, self.owner_token) and self._owns_layers_of(pl_module):
            return  # a later fit/validate of the same model: everything is in place
        if self._layers:
            self._reset()  # this callback is reused for another model
        layers = self.select(pl_module)
        if self.activations is not None:
            check_output_projections(pl_module, layers, self.activations)
        rivals = self.rivals(trainer)
        specs = self._layer_specs(layers)
        calibrated = self.init is not None or self.smoothing is not None
        # Checked before anything is attached: a refused setting leaves the model as it was.
        mappings = plan_calibrated_start(pl_module, layers, specs, init=self.init, smoothing=self.smoothing,
                                         rules=self.mappings) if calibrated else []
        plan = take_over(layers, specs, rivals, stage=getattr(stage, "value", stage), calibrated=calibrated,
                         learned=self.learn_ranges, weight_range=self.weight_range, activations=self.activations,
                         observer=self.observer)  # quantizers of an earlier Trainer's QAT
        attach = _Attach(pl_module, layers, specs, rivals, plan, mappings)
        if plan.refusal is not None:  # an evaluation: the model stays as it is unless a checkpoint gives the grid
            self._refused = attach  # (attached in load_state_dict; refused at the evaluation's start)
            return
        self._attach(*attach)

    def _attach(self, pl_module: LightningModule, layers: Mapping[str, nn.Module], specs: Mapping[str, QuantSpec],
                rivals: set, plan: Any, mappings: list) -> None:
        calibrated = self.init is not None or self.smoothing is not None
        self._weight_quantizers = attach_weight_quantizers(
            layers, specs, self.learn_ranges, weight_range=self.weight_range, ewgs_delta=self.ewgs_delta,
            owner=self.owner_token, active_owners=rivals,
        )
        self._layers = layers
        seen = set()
        for name, layer in layers.items():
            if id(layer) in seen:  # an attention layer's separate q/k/v weights: one input stage
                continue
            seen.add(id(layer))
            # An input quantizer left by an earlier QAT callback goes with its weights.
            remove_input_transform(layer, Stage.INPUT_QUANT)
            # Ids go into an embedding; a recurrent layer is compressed weight-only.
            if self.activations is not None and not isinstance(layer, (nn.Embedding, nn.RNNBase)):
                self._add_input_quantizer(name, layer, rivals)
        if self.activations is not None:
            keep_padded_batches(pl_module)  # a padded eval batch must reach the quantizers as in training
        for name, entry in plan.entries.items():
            load_entry(self._weight_quantizers[name], self._input_quantizers.get(name), entry)
        if calibrated:
            calibration = CalibratedStart(pl_module, layers, self._weight_quantizers, init=self.init,
                                          smoothing=self.smoothing, mappings=mappings)
            self._calibration = CalibrationWindow(calibration, self.calibration_batches, self._set_enabled)
            self._calibration.applied = bool(plan.entries)  # by the run that trained those quantizers
        self.finish_install(pl_module)

    @override
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        attach = self._refused
        misfit = [] if attach is None else checkpoint_misfit(dict(state_dict.get("layers") or {}),
                                                             attach.specs, self.weight_range)
        try:
            super().load_state_dict(state_dict)  # checked, and kept until the quantizers exist
        except ValueError as err:
            if misfit:
                raise ValueError("; ".join([str(err), *misfit])) from None  # one error naming every difference
            raise
        if misfit:  # the checkpoint does not give the grid either: nothing attached, the model as it was
            self._restored = None
            raise ValueError(f"{'; '.join(misfit)}, so it would be evaluated on a grid it was not trained on;"
                             f" evaluate with the QAT settings of the run that trained it")
        if attach is not None:  # the checkpoint gives the grid the evaluation measures
            self._refused = None
            self._attach(*attach)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        attach, self._refused = self._refused, None
        if attach is not None:  # nothing attached: the model is as it was
            given = f"; the checkpoint given ({trainer.ckpt_path}) holds no QAT state" if trainer.ckpt_path else ""
            raise ValueError(attach.plan.refusal + given)

    on_test_start = on_predict_start = on_validation_start

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.learn_ranges:
            for name, quantizer in self._weight_quantizers.items():
                layer = self._layers[name]
                quantizer.follow_device(raw_weight(layer, weight_param(name, layer)).device)
            self._ranges.track([q.log_scale for q in self._weight_quantizers.values()])
            self._ranges.follow(trainer, "`learn_ranges`")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Not in on_fit_start: there `estimated_stepping_batches` would make Lightning drop
        # a resumable dataloader's saved position (see MagnitudePruning.on_train_start).
        total = trainer.estimated_stepping_batches
        length = self.run_length.resolve(trainer, type(self).__name__,
                                         fractional_steps(self.config, ("start_step", "freeze_bn_step")))
        self._start = resolve_step("start_step", self.start_step, length)
        if self._calibration is not None:
            self._start = self._calibration.start_step(trainer, pl_module, self._start)
        check_quantization_trains(trainer, self, self._start, total)
        if self._calibration is None and self._start >= total > trainer.global_step:  # a calibrated start warns itself
            rank_zero_warn(
                f"QuantizationAwareTraining: `start_step` resolves to step {self._start} but this run has {int(total)}"
                " optimizer steps: no step trains with fake quantization and the model ends in float. Set"
                " `start_step` before the end of the run (e.g. 0.5 = halfway), or train for more steps"
            )
        self._freeze_bn_at = (
            None if self.freeze_bn_step is None else resolve_step("freeze_bn_step", self.freeze_bn_step, length)
        )

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self._calibration is not None:  # later than decided where its window held too few batches
            self._start = self._calibration.on_batch_start(step, self._start)
        enabled = step >= self._start
        self._set_enabled(enabled)
        metrics = {"qat/enabled": float(enabled), "qat/weight_bits": self._weight_bits() if enabled else 32.0}
        if self.activations is not None:
            metrics["qat/activation_bits"] = 8.0 if enabled else 32.0
        self.log_once(pl_module, step, metrics)
        calibrating = step < self._start + self.calibration_steps
        for quantizer in self._input_quantizers.values():
            if isinstance(quantizer, StaticRangeObserver):
                quantizer.calibrating = quantizer.calibrating and calibrating
        self._mark_training_batch(True)
        if self._freeze_bn_at is not None and step >= self._freeze_bn_at:
            for module in pl_module.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()  # Lightning puts the model in train mode every epoch

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._calibration is not None:
            self._calibration.on_batch_end()
        self._mark_training_batch(False)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # No teardown follows: a recording hook or an observing observer left on the model
        # would count every later forward.
        if self._calibration is not None:
            self._calibration.stop()
        self._mark_training_batch(False)
        self._refused = None

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._refused = None  # an evaluation that never started (no batches): nothing was attached
        if stage == "fit":
            self._mark_training_batch(False)
            self._ranges.stop()
            if self._calibration is not None:
                self._calibration.stop()

    def _mark_training_batch(self, active: bool) -> None:
        """Tell the static observers whether the forwards now are a training batch's."""
        for quantizer in self._input_quantizers.values():
            if isinstance(quantizer, StaticRangeObserver):
                quantizer.in_training_batch = active

    # ------------------------------------------------------------------ base-class hooks
    @override
    def method_state(self) -> Dict[str, Any]:
        layers = {name: quantizer_entry(quantizer, self._input_quantizers.get(name))
                  for name, quantizer in self._weight_quantizers.items()}
        state: Dict[str, Any] = {"layers": layers}
        if self._calibration is not None:
            state["calibration"] = self._calibration.state_dict()
        if self.learn_ranges and self._weight_quantizers:
            state["range_optimizer"] = self._ranges.state_dict()
        return state

    # ------------------------------------------------------------------ internals
    def _layer_specs(self, layers: Mapping[str, nn.Module]) -> Dict[str, QuantSpec]:
        specs = {}
        used = set()
        for name in layers:
            specs[name], pattern = self.config.spec_for(name)
            used.add(pattern)
        unused = [p for p in self.layer_overrides if p not in used]
        if unused:
            shadowed = []  # patterns that match, after an earlier one that matches first
            for pattern in unused:
                names = [name for name in layers if name_matches(name, pattern)]
                if names:
                    earlier = self.config.spec_for(names[0])[1]
                    shadowed.append(f"{pattern!r} matches {', '.join(names)}, which an earlier pattern ({earlier!r})"
                                    " matches first: list the more specific pattern first")
            why = f" ({'; '.join(shadowed)})" if shadowed else ""
            raise ValueError(
                f"`overrides` pattern(s) {unused} set no quantized layer's grid{why}; quantized layers:"
                f" {', '.join(layers)}"
            )
        return specs

    def _add_input_quantizer(self, name: str, layer: nn.Module, rivals: set) -> None:
        if self.activations == "int8_dynamic":
            quantizer: Any = DynamicTokenQuantizer(channels_first=isinstance(layer, _CONV))
        else:
            quantizer = StaticRangeObserver(self.observer)
            quantizer.in_training_batch = False  # until the first training batch starts
        install_weight_transform(
            layer, Stage.INPUT_QUANT, quantizer, owner=self.owner_token, active_owners=rivals, param=INPUT
        )
        self._input_quantizers[name] = quantizer

    def _weight_bits(self) -> float:
        """Mean bits of the quantized weights, weighted by each layer's parameter count."""
        counts = {name: raw_weight(layer, weight_param(name, layer)).numel() for name, layer in self._layers.items()}
        bits = sum(counts[name] * q.spec.bits for name, q in self._weight_quantizers.items())
        return bits / sum(counts.values())

    def _set_enabled(self, enabled: bool) -> None:
        for quantizer in self._weight_quantizers.values():
            quantizer.enabled = enabled
        for quantizer in self._input_quantizers.values():
            quantizer.enabled = enabled

    def _owns_layers_of(self, pl_module: LightningModule) -> bool:
        return all(pl_module.get_submodule(module_name(key, weight_param(key, layer))) is layer
                   for key, layer in self._layers.items())

    @override
    def state_differences(self, state: Mapping[str, Any]) -> List[str]:
        return grid_differences(state["layers"], self.layer_specs, self.weight_range)  # other layers: see restore

    @override
    def restore(self, state: Mapping[str, Any]) -> None:
        layers = state["layers"]
        unknown = sorted(set(layers) - set(self._weight_quantizers))
        if unknown:
            raise ValueError(
                f"the checkpoint holds QAT state for layers this callback does not target: {unknown}."
                " Resume with the same `targets` and `exclude`."
            )
        differences = self.state_differences(state)
        if differences:
            raise ValueError(
                f"{'; '.join(differences)}, so it would continue or be exported on a grid it was not trained on;"
                " resume or export with the QAT settings of the run that trained it"
            )
        for name, entry in layers.items():
            load_entry(self._weight_quantizers[name], self._input_quantizers.get(name), entry)
        for name, quantizer in self._input_quantizers.items():  # (a layer the checkpoint has no entry for too)
            quantizer.enabled = self._weight_quantizers[name].enabled
        if "range_optimizer" in state:
            self._ranges.load_state_dict(state["range_optimizer"])
        if self._calibration is not None:
            self._calibration.load_state_dict(state["calibration"])
