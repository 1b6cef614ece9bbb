"""QAT settings, validated once: the arguments of :class:`lightning_compress.QuantizationAwareTraining`."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from typing import Any, ClassVar, Dict, List, Mapping, Sequence, Tuple

from torch import nn

from lightning_compress.core.incompatible import LayerIssue, check_on_incompatible, compressed_weight
from lightning_compress.core.schedule import StepLike, validate_step
from lightning_compress.core.targeting import Target, name_matches, validate_name, validate_targets
from lightning_compress.core.validate import (
    ArgumentError, check_bool, check_choice, check_int, check_number, check_positive, dtype_spelled,
)
from lightning_compress.quant.activations import ACTIVATION_MODES, OBSERVERS
from lightning_compress.quant.fake_quant import check_divisible
from lightning_compress.quant.gptq import gptq_issue, gptq_issue_message
from lightning_compress.quant.mappings import describe_setting, uncovered_layers
from lightning_compress.quant.spec import GRANULARITIES, QuantSpec, parse_bits, spec_from_options
from lightning_compress.quant.weights import DEFAULT_TARGET_TYPES, QUANTIZABLE_TYPES, WEIGHT_RANGES

# Calibrated starting points (see lightning_compress.quant.calibrated_start).
INITS = ("gptq", "awq")
CALIBRATION_BATCHES = 16  # the default count of batches they record


@dataclass(frozen=True)
class QATConfig:
    """The grid QAT trains and when. See :class:`lightning_compress.QuantizationAwareTraining`
    for the meaning of each field; every field is checked when the config is built.

    ``spec`` (the main grid) and ``layer_overrides`` (``{glob: QuantSpec}``) are derived
    from the fields.

    Raises:
        ArgumentError: naming the bad field.
    """

    weights: str | int = "int8"
    _: KW_ONLY
    granularity: str | None = None
    group_size: int | None = None
    symmetric: bool = True
    scale_dtype: str = "float32"
    weight_range: str = "minmax"
    learn_ranges: bool = False
    range_lr: float = 1e-3
    ewgs_delta: float = 0.0
    activations: str | None = None
    observer: str = "minmax"
    calibration_steps: int = 100
    init: str | None = None
    smoothing: float | None = None
    calibration_batches: int = CALIBRATION_BATCHES
    mappings: Dict[str, List[str]] | None = None
    start_step: StepLike = 0
    freeze_bn_step: StepLike | None = None
    overrides: Dict[str, Dict[str, Any]] | None = None
    targets: Sequence[Target] | None = None
    exclude: Sequence[Target] | None = None
    on_incompatible: str = "error"
    name: str | None = None
    spec: QuantSpec = field(init=False, repr=False, compare=False)
    layer_overrides: Dict[str, QuantSpec] = field(init=False, repr=False, compare=False)
    supported_types: ClassVar[Tuple[type, ...]] = QUANTIZABLE_TYPES  # what `targets` may name
    default_types: ClassVar[Tuple[type, ...]] = DEFAULT_TARGET_TYPES  # what no `targets` means

    def spec_for(self, name: str) -> Tuple[QuantSpec, str | None]:
        """The grid of layer ``name``: the first ``overrides`` glob that matches it (a whole
        name or its last parts), else the main spec; and that glob (``None``: the main spec)."""
        for pattern, spec in self.layer_overrides.items():
            if name_matches(name, pattern):
                return spec, pattern
        return self.spec, None

    def layer_issue(self, key: str, layer: nn.Module) -> LayerIssue | None:
        """Why this grid cannot quantize the selected layer ``key``, or ``None``: a
        ``group_size`` (of the main grid or of an override) that does not divide its
        inputs, or ``init="gptq"`` on a layer GPTQ cannot round (not an ``nn.Linear`` or
        ungrouped ``nn.Conv2d``)."""
        if self.init == "gptq" and (why := gptq_issue(layer)) is not None:
            return LayerIssue("init", "gptq", gptq_issue_message(key, why))
        spec, pattern = self.spec_for(key)
        try:
            check_divisible(key, compressed_weight(key, layer), spec)
        except ValueError as err:
            if pattern is None:
                return LayerIssue("group_size", spec.group_size, str(err))
            return LayerIssue(f"overrides[{pattern!r}]", spec.describe(), str(err))
        return None

    def model_issues(self, model: nn.Module, layers: Mapping[str, nn.Module]) -> Dict[str, LayerIssue]:
        """``{name: why}`` for the selected ``layers`` of ``model`` that ``init="awq"`` or
        ``smoothing`` has nowhere to fold scales for: no mapping covers them."""
        if self.init != "awq" and self.smoothing is None:
            return {}
        setting = describe_setting(self.init, self.smoothing)
        argument, value = ("init", self.init) if self.init == "awq" else ("smoothing", self.smoothing)
        return {name: LayerIssue(argument, value, why) for name, why in uncovered_layers(model, layers, setting,
                                                                                         self.mappings).items()}

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale_dtype", dtype_spelled(self.scale_dtype))  # torch.float16 as "float16"
        bits = parse_bits("weights", self.weights)
        granularity = self.granularity
        if granularity is None:
            granularity = "group" if self.group_size is not None else "channel"
        check_choice("granularity", granularity, GRANULARITIES)
        try:
            spec = QuantSpec(bits, granularity, self.group_size, self.symmetric, self.scale_dtype)
        except ArgumentError as err:  # QuantSpec names `bits`; the argument here is `weights`
            raise ArgumentError("weights" if err.argument == "bits" else err.argument, str(err)) from None
        check_choice("weight_range", self.weight_range, WEIGHT_RANGES)
        check_bool("learn_ranges", self.learn_ranges)
        if self.learn_ranges and self.scale_dtype != "float32":
            raise ArgumentError(
                "scale_dtype",
                f"`learn_ranges=True` trains float32 scales, which `scale_dtype`={self.scale_dtype!r} would"
                " round at export; use scale_dtype='float32' with learned ranges",
            )
        check_positive("range_lr", self.range_lr)
        # Below 2 the factor 1 +- delta/2 stays positive: no gradient is turned around.
        check_number("ewgs_delta", self.ewgs_delta, low=0.0, high=2.0, high_open=True,
                     what="a number in [0, 2) (0: the plain straight-through estimator; per code step, 0.1 to 0.3"
                          " on the benchmarks' char LM)")
        object.__setattr__(self, "ewgs_delta", float(self.ewgs_delta))
        check_choice("activations", self.activations, ACTIVATION_MODES, allow_none=True)
        check_choice("observer", self.observer, OBSERVERS)
        check_int("calibration_steps", self.calibration_steps)
        validate_step("start_step", self.start_step)
        self._check_calibrated_start()
        self._check_mappings()
        if self.freeze_bn_step is not None:
            validate_step("freeze_bn_step", self.freeze_bn_step)
        object.__setattr__(self, "range_lr", float(self.range_lr))
        object.__setattr__(self, "spec", spec)
        object.__setattr__(self, "layer_overrides", _parse_overrides(self.overrides, spec))
        if self.overrides is not None:  # a copy: the caller's dict may change later
            object.__setattr__(self, "overrides", {k: dict(v) for k, v in self.overrides.items()})
        object.__setattr__(self, "targets", validate_targets("targets", self.targets, QUANTIZABLE_TYPES))
        object.__setattr__(self, "exclude", validate_targets("exclude", self.exclude, QUANTIZABLE_TYPES))
        check_on_incompatible(self.on_incompatible)
        object.__setattr__(self, "name", validate_name(self.name))

    def _check_calibrated_start(self) -> None:
        check_choice("init", self.init, INITS, allow_none=True)
        # Another count without a calibrated start would do nothing. (The default stays in
        # the config of every callback: `dataclasses.replace` of one rebuilds it as given.)
        if self.calibration_batches != CALIBRATION_BATCHES and self.init is None and self.smoothing is None:
            raise ArgumentError("calibration_batches", "`calibration_batches` sets how many batches init='gptq'/'awq' or"
                                " `smoothing` record before `start_step`; set one of them, or drop `calibration_batches`")
        check_int("calibration_batches", self.calibration_batches, minimum=1)
        if self.smoothing is None:
            return
        if isinstance(self.smoothing, bool) or not isinstance(self.smoothing, (int, float)) or not 0 <= self.smoothing <= 1:
            raise ArgumentError("smoothing", f"`smoothing` is SmoothQuant's alpha, a number in [0, 1] (e.g. 0.5), got {self.smoothing!r}")
        if self.init == "awq":
            raise ArgumentError(
                "smoothing", "`smoothing` and init='awq' both fold per-channel scales into the same layers; choose one"
            )
        if self.activations is None:
            raise ArgumentError(
                "smoothing",
                "`smoothing` moves activation outliers into the weights so int8 activations quantize better; it needs"
                " activations='int8_dynamic' or 'int8_static' (for weight-only quantization use init='awq')",
            )
        object.__setattr__(self, "smoothing", float(self.smoothing))

    def _check_mappings(self) -> None:
        if self.mappings is None:
            return
        if self.init != "awq" and self.smoothing is None:
            raise ArgumentError("mappings", "`mappings` tell init='awq' and `smoothing` where to fold their scales; set one of them, or drop `mappings`")
        fix = "e.g. {'norm1': ['qkv'], 'norm2': ['up']}: a norm or Linear, and the Linear layers beside it that read its output"
        if not isinstance(self.mappings, Mapping) or not self.mappings:
            raise ArgumentError("mappings", f"`mappings` must map module names to lists of layer names, {fix}; got {self.mappings!r}")
        plain = {}
        for smooth, balance in self.mappings.items():
            if not isinstance(smooth, str) or not smooth:
                raise ArgumentError("mappings", f"`mappings` keys must be module names (non-empty strings), {fix}; got the"
                                                f" key {smooth!r}")
            if isinstance(balance, str) or not isinstance(balance, Sequence) \
                    or not balance or not all(isinstance(b, str) and b for b in balance):
                raise ArgumentError("mappings", f"`mappings[{smooth!r}]` must be a non-empty list of layer names, {fix}; got {balance!r}")
            plain[smooth] = list(balance)
        object.__setattr__(self, "mappings", plain)


def _parse_overrides(overrides: Any, base: QuantSpec) -> Dict[str, QuantSpec]:
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise ArgumentError(
            "overrides", "`overrides` must map name globs to option dicts, e.g. {'head': {'bits': 8}}"
        )
    specs = {}
    for pattern, options in overrides.items():
        if not isinstance(pattern, str) or not pattern:
            raise ArgumentError("overrides", f"`overrides` keys must be layer name globs such as 'head', got {pattern!r}")
        if not isinstance(options, Mapping):
            raise ArgumentError("overrides", f"`overrides[{pattern!r}]` must be a dict of options, got {options!r}")
        try:
            specs[pattern] = spec_from_options(f"overrides[{pattern!r}]", options, base)
        except ArgumentError as err:
            raise ArgumentError("overrides", str(err)) from None
    return specs


__all__ = ["QATConfig"]
