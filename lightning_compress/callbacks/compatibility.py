"""Settings of different callbacks that cannot work together, refused before training.

Each callback checks its own arguments when it is built. What fails only in combination
(one callback's setting that another cannot honour on the same layer) is checked here, in
one place, from two entry points. The rules read the callbacks through their public
API only (``section``, ``config``, ``selected_layers``, ``layer_specs``), so this module
imports no callback:

- :func:`prepare_stack`, first thing in every compression callback's ``setup``: the first
  callback to set up checks the whole stack against the model, before any callback has
  changed it and before the first step, whatever the order of the list;
- :func:`check_recipe`, from the recipe loader: the combinations visible without the
  model, named by their recipe keys.

Every refusal names both settings, the layer where there is one, why, and what to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Sequence, Tuple

from torch import nn

from lightning_compress.formats.compressed_tensors import incompatibility, is_transformers_model
from lightning_compress.formats.onnx import onnx_op
from lightning_compress.quant.spec import QuantSpec

# With no model (a recipe), a callback with default targets selects "every layer of the
# default types": `EVERY_LAYER` stands for them, so two default-target callbacks share it.
EVERY_LAYER = "*"
_CHECKED_ATTR = "_lc_checked_stack"


class IncompatibleSettings(ValueError):
    """Two callbacks' settings that cannot train or export a correct model together."""


@dataclass(frozen=True)
class Setting:
    """One argument of one callback: ``section`` is its recipe section (``"qat"``)."""

    section: str
    argument: str
    value: Any


@dataclass(frozen=True)
class Conflict:
    settings: Tuple[Setting, ...]
    problem: str  # why, naming the layer when there is one
    fix: str

    def for_callbacks(self, classes: Mapping[str, str]) -> str:
        """The message for callbacks; ``classes`` maps a section to its callback's class name."""
        named = " and ".join(f"{classes[s.section]}({s.argument}={s.value!r})" for s in self.settings)
        return f"{named} cannot be used together: {self.problem}. {self.fix}"

    def for_recipe(self) -> str:
        keys = " and ".join(f"{s.section}.{s.argument}={s.value!r}" for s in self.settings)
        return f"recipe keys {keys} cannot be used together: {self.problem}. {self.fix}"


# ---------------------------------------------------------------------- entry points
def prepare_stack(trainer: Any, pl_module: nn.Module, stage: str) -> None:
    """Run by every compression callback at the start of its ``setup``.

    Before fit, the first call checks every combination of the Trainer's callbacks on
    ``pl_module`` (later calls of the same fit find it checked), then lets callbacks that
    need the model as the user built it (``KnowledgeDistillation(teacher="self")``) take
    it through their ``before_compression_setup(trainer, pl_module)``, before any callback
    has changed it.

    Raises:
        IncompatibleSettings: for the first conflict found.
    """
    if stage != "fit":
        return
    callbacks = list(trainer.callbacks)
    key = (id(pl_module), tuple(id(cb) for cb in callbacks))
    if trainer.__dict__.get(_CHECKED_ATTR) != key:
        for conflict in conflicts(callbacks, pl_module):
            raise IncompatibleSettings(conflict.for_callbacks(_class_names(callbacks)))
        trainer.__dict__[_CHECKED_ATTR] = key
    for callback in callbacks:
        before = getattr(callback, "before_compression_setup", None)
        if callable(before):
            before(trainer, pl_module)


def check_recipe(callbacks: Sequence[Any], error: Callable[[str], Exception] = IncompatibleSettings) -> None:
    """Refuse the combinations a recipe's callbacks (built from it) show without a model.

    Only combinations that hold on every model are refused here (both callbacks on their
    default targets, settings that apply to every layer); the rest is checked when the
    callbacks set up on the model.

    Raises:
        ``error(message)`` naming the recipe keys.
    """
    for conflict in conflicts(callbacks, None):
        raise error(conflict.for_recipe())


def check_quantization_trains(trainer: Any, qat: Any, start: int, total: float) -> None:
    """From QAT's ``on_train_start`` (where ``start_step`` resolves, before the first
    step): refuse an export of grids no training step used.

    Raises:
        IncompatibleSettings: when QAT's ``start_step`` resolves to the end of the run or
            later while a CompressedExport will pack the quantized codes.
    """
    exports = _of_section(trainer.callbacks, "export")
    if exports and start >= total and trainer.global_step < total:
        bits = sorted({spec.bits for spec in qat.layer_specs.values()})
        conflict = Conflict(
            (Setting("qat", "start_step", qat.config.start_step), Setting("export", "dirpath", str(exports[0].config.dirpath))),
            f"start_step resolves to step {start} but this run has {int(total)} optimizer steps, so no step trains"
            f" with int{'/'.join(map(str, bits))} fake quantization and the export would pack weights that never saw"
            " that grid (round-to-nearest of the float weights)",
            "Set QuantizationAwareTraining(start_step=...) before the end of the run (e.g. 0.5 = halfway), or train"
            " for more steps",
        )
        raise IncompatibleSettings(conflict.for_callbacks(_class_names(trainer.callbacks)))


def conflicts(callbacks: Sequence[Any], model: nn.Module | None) -> Iterator[Conflict]:
    """Every conflict among ``callbacks``: on ``model``'s layers, or (``None``) those that
    hold for any model."""
    stack = _Stack(callbacks, model)
    for rule in RULES:
        yield from rule(stack)


# ---------------------------------------------------------------------- the stack
class _Stack:
    """The compression callbacks of a Trainer (or a recipe) and the layers each touches."""

    def __init__(self, callbacks: Sequence[Any], model: nn.Module | None) -> None:
        self.callbacks = list(callbacks)
        self.model = model
        self._layers: Dict[int, Dict[str, nn.Module] | None] = {}

    def __getitem__(self, section: str) -> List[Any]:
        return _of_section(self.callbacks, section)

    def layers(self, callback: Any) -> Dict[str, nn.Module | None] | None:
        """``{name: layer}`` the callback compresses; ``None`` when unknown (its own
        setup reports bad targets, and a recipe has no model)."""
        if id(callback) not in self._layers:
            self._layers[id(callback)] = callback.selected_layers(self.model)
        return self._layers[id(callback)]

    def shared(self, a: Any, b: Any) -> List[str]:
        """Names of the layers both callbacks transform (none when unknown)."""
        first, second = self.layers(a), self.layers(b)
        if first is None or second is None:
            return []
        return [name for name in first if name in second]

    def qat_specs(self, qat: Any) -> Dict[str, Tuple[QuantSpec, Setting]]:
        """``{layer: (spec, the setting that chose it)}`` for a QAT callback's layers."""
        layers = self.layers(qat)
        if layers is None:
            return {}
        config = qat.config
        main = Setting("qat", "weights", f"int{config.spec.bits}")
        if self.model is None:  # only the main spec is known to reach every default layer
            return {} if config.layer_overrides else {EVERY_LAYER: (config.spec, main)}
        specs = {}
        for name in layers:
            spec, pattern = config.spec_for(name)
            specs[name] = (spec, main if pattern is None else Setting("qat", f"overrides[{pattern!r}]", spec.describe()))
        return specs


def _where(name: str, every: str = "on every layer both target") -> str:
    return every if name == EVERY_LAYER else f"on layer {name!r}"


# ---------------------------------------------------------------------- the rules
def _two_quantizers_on_one_layer(stack: _Stack) -> Iterator[Conflict]:
    """Two QAT callbacks on one layer: a layer has one grid, so one would train it (say at
    int8) and the other export it (at int4). (Two callbacks of another kind on one layer
    are refused by the transform stack, which holds one stage of each kind.)"""
    callbacks = stack["qat"]
    for i, first in enumerate(callbacks):
        for second in callbacks[i + 1:]:
            for name in stack.shared(first, second)[:1]:
                # Named in an order of their own (wider grid first), not the list's.
                pair = sorted((first, second), key=lambda qat: (-stack.qat_specs(qat)[name][0].bits, str(qat.config.targets)))
                specs = [stack.qat_specs(qat)[name][0] for qat in pair]
                yield Conflict(
                    tuple(Setting("qat", "targets", _targets_of(qat)) for qat in pair),
                    f"both quantize layer {name!r} ({specs[0].describe()} and {specs[1].describe()}); a layer has one"
                    " grid, so it would be trained on one and exported on the other",
                    "Give the callbacks disjoint `targets`/`exclude`, or use one QuantizationAwareTraining with"
                    " `overrides` for mixed precision",
                )


def _nm_sparsity_and_quantization_groups(stack: _Stack) -> Iterator[Conflict]:
    """N:M pruning keeps N of every M consecutive inputs; a quantization group must hold
    whole blocks, or one block's kept weights get different scales."""
    for pruning in stack["pruning"]:
        pattern = pruning.config.sparsity_pattern
        if pattern.kind != "n:m":
            continue
        for qat in stack["qat"]:
            specs = stack.qat_specs(qat)
            for name in stack.shared(pruning, qat):
                spec, setting = specs.get(name, (None, None))
                if spec is None or spec.granularity != "group" or spec.group_size % pattern.m == 0:
                    continue
                if setting.argument == "weights":
                    setting = Setting("qat", "group_size", spec.group_size)
                multiples = [g for g in (32, 64, 128) if g % pattern.m == 0] or [8 * pattern.m, 16 * pattern.m]
                yield Conflict(
                    (Setting("pruning", "pattern", str(pattern)), setting),
                    f"{_where(name)}, quantization groups of {spec.group_size} inputs split the {pattern.m}-input"
                    f" blocks of {pattern} sparsity, so the kept weights of one block get different scales, which"
                    " N:M sparse kernels (one scale per block) cannot run",
                    f"Use a QuantizationAwareTraining group_size that is a multiple of {pattern.m} (e.g."
                    f" {', '.join(map(str, multiples))}) or granularity='channel', or prune with another pattern",
                )
                break


def _adapter_dropout_under_other_stages(stack: _Stack) -> Iterator[Conflict]:
    """Dropout acts on the adapter's input, which exists only while the adapter runs as a
    separate branch; pruning or QAT on the same weight make the layer compute with the
    merged weight, where the dropout cannot act."""
    for lora in stack["lora"]:
        dropout = lora.config.lora_dropout
        if dropout <= 0:
            continue
        for section in ("pruning", "qat"):
            for other in stack[section]:
                for name in stack.shared(lora, other)[:1]:
                    what = (
                        f"the weight of {name!r}, so its adapter is merged into that weight" if name != EVERY_LAYER
                        else "every Linear weight LoRA adapts (both use their default targets), so those adapters"
                        " are merged into the weights"
                    )
                    yield Conflict(
                        (Setting("lora", "lora_dropout", dropout), Setting(section, "targets", _targets_of(other))),
                        f"`lora_dropout`={dropout} acts on the adapter's input, but {type(other).__name__} also"
                        f" transforms {what}",
                        "Set lora_dropout=0, or keep the adapted layers out of the other callback's targets (`exclude`)",
                    )


def _export_formats_and_quantization(stack: _Stack) -> Iterator[Conflict]:
    """What the export was asked to write must hold what QAT trains: compressed-tensors
    (transformers) loads symmetric or 8-bit weights of Linear/Embedding layers and no
    activation quantization; the ONNX export writes int4 and int8 Linear layers on
    onnxruntime's grids only. Otherwise fit fails at its end, after the training."""
    for export in stack["export"]:
        compressed_tensors = export.config.compressed_tensors is True
        onnx = "onnx" in export.config.formats
        if not (compressed_tensors or onnx):
            continue
        exported = _exported_modules(stack, export)
        if compressed_tensors and stack.model is not None:
            target = _export_target(stack, export)
            if target is not None and not is_transformers_model(target):
                yield Conflict(
                    (Setting("export", "compressed_tensors", True), Setting("export", "module", export.config.module)),
                    f"compressed_tensors=True writes a transformers config.json, but {type(target).__name__} is not"
                    " a transformers model",
                    "Set CompressedExport(module=...) to the attribute that holds it (e.g. module='model'), or pass"
                    " compressed_tensors=False",
                )
                return
        for qat in stack["qat"]:
            layers = stack.layers(qat) or {}
            for name, (spec, setting) in stack.qat_specs(qat).items():
                module = layers.get(name)
                if exported is not None and id(module) not in exported:
                    continue
                kind = "Linear" if module is None else type(module).__name__
                if compressed_tensors:
                    reason = incompatibility(kind, spec)
                    if reason is not None:
                        if not spec.symmetric and kind in ("Linear", "Embedding"):
                            setting = Setting("qat", "symmetric", False) if setting.argument == "weights" else setting
                            fix = ("Quantize it symmetrically (symmetric=True), use 8 bits, or export with"
                                   " compressed_tensors=False (our loader reads asymmetric zero points)")
                        else:
                            setting = Setting("qat", "targets", _targets_of(qat))
                            fix = (f"Keep {name!r} out of QuantizationAwareTraining (exclude=[{name!r}]), or export"
                                   " with compressed_tensors=False")
                        yield Conflict(
                            (Setting("export", "compressed_tensors", True), setting),
                            f"{_where(name, _EVERY_QUANTIZED)}, QAT trains {spec.describe()}, which compressed-tensors"
                            f" cannot store: {reason}",
                            fix,
                        )
                        return
                    activations = qat.config.activations
                    if activations is not None and kind != "Embedding":  # token ids are not quantized
                        yield Conflict(
                            (Setting("export", "compressed_tensors", True), Setting("qat", "activations", activations)),
                            f"{_where(name, _EVERY_QUANTIZED)}, QAT trains {activations} activations, but the"
                            " compressed-tensors config.json describes weights only, so transformers would run the"
                            " layer with float activations instead",
                            "Drop `activations` (weight-only QAT), or export with compressed_tensors=False and load"
                            " with lightning_compress.load_packed",
                        )
                        return
                if onnx and (module is None or isinstance(module, nn.Linear)) and spec.bits in (4, 8):
                    try:
                        onnx_op(name, spec)
                    except ValueError:
                        if setting.argument == "weights" and spec.granularity == "group":
                            setting = Setting("qat", "group_size", spec.group_size)
                        yield Conflict(
                            (Setting("export", "formats", list(export.config.formats)), setting),
                            f"{_where(name, _EVERY_QUANTIZED)}, QAT trains {spec.describe()}, which the ONNX export"
                            " cannot write"
                            " (int4: per channel, per tensor or groups of a power of two >= 16; int8: per channel"
                            " or per tensor)",
                            "Choose such a grid for it (e.g. group_size=32 for int4, granularity='channel' for int8),"
                            " or drop 'onnx' from CompressedExport(formats=...)",
                        )
                        return


_EVERY_QUANTIZED = "on every layer QAT quantizes"


def _export_target(stack: _Stack, export: Any) -> nn.Module | None:
    """The module the export writes (``None``: no model, or a bad ``module`` that the
    export's own setup reports)."""
    if stack.model is None or export.config.module is None:
        return stack.model
    try:
        return stack.model.get_submodule(export.config.module)
    except AttributeError:
        return None


def _exported_modules(stack: _Stack, export: Any) -> set | None:
    """``id``s of the modules the export writes; ``None``: all (or unknown)."""
    target = _export_target(stack, export)
    return None if target is None else {id(m) for m in target.modules()}


def _targets_of(callback: Any) -> Any:
    config = callback.config
    targets = config.target_modules if callback.section == "lora" else config.targets
    if targets is None:
        return None
    return [t if isinstance(t, str) else t.__name__ for t in targets]


def _of_section(callbacks: Sequence[Any], section: str) -> List[Any]:
    return [cb for cb in callbacks if getattr(cb, "section", None) == section]


def _class_names(callbacks: Sequence[Any]) -> Dict[str, str]:
    return {cb.section: type(cb).__name__ for cb in callbacks if getattr(cb, "section", None)}


RULES = (
    _two_quantizers_on_one_layer,
    _nm_sparsity_and_quantization_groups,
    _adapter_dropout_under_other_stages,
    _export_formats_and_quantization,
)

__all__ = [
    "IncompatibleSettings",
    "Conflict",
    "Setting",
    "prepare_stack",
    "check_recipe",
    "check_quantization_trains",
    "conflicts",
]
