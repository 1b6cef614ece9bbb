"""The rules between callbacks: settings of two methods that cannot hold on one layer.

Each rule reads the callbacks through their public API only (``section``, ``config``,
``selected_layers``, ``layer_specs``), so this module imports no callback, and yields every
:class:`Conflict` it finds (one per pair of settings and reason, naming all the layers it
concerns), never only the first: :mod:`~lightning_compress.callbacks.compatibility` reports
them all at once, or leaves the layers out of a callback with ``on_incompatible="skip"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Sequence, Set, Tuple

from torch import nn

from lightning_compress.formats.compressed_tensors import incompatibility, is_transformers_model
from lightning_compress.formats.onnx import onnx_op
from lightning_compress.quant.spec import QuantSpec

# With no model (a recipe), a callback with default targets selects "every layer of the
# default types": `EVERY_LAYER` stands for them, so two default-target callbacks share it.
EVERY_LAYER = "*"
_SHOWN = 6  # layer names written out in one sentence before "and N more"


@dataclass(frozen=True)
class Setting:
    """One argument of one callback: ``section`` is its recipe section (``"qat"``)."""

    section: str
    argument: str
    value: Any


@dataclass(frozen=True)
class Conflict:
    """Settings that cannot hold together. ``layers``: the layers it concerns (none: the
    stack as a whole); ``callbacks``: those that may leave these layers out instead
    (``on_incompatible="skip"``), the first that allows it giving way."""

    settings: Tuple[Setting, ...]
    problem: str  # why, naming the layers when there are some
    fix: str
    layers: Tuple[str, ...] = ()
    callbacks: Tuple[Any, ...] = field(default=(), compare=False, repr=False)

    def for_callbacks(self, classes: Mapping[str, str]) -> str:
        """The message for callbacks; ``classes`` maps a section to its callback's class name."""
        named = " and ".join(f"{classes[s.section]}({s.argument}={s.value!r})" for s in self.settings)
        return f"{named} {self._verb()}: {self.problem}. {self.fix}"

    def for_recipe(self) -> str:
        keys = " and ".join(f"{s.section}.{s.argument}={s.value!r}" for s in self.settings)
        return f"recipe {'keys' if len(self.settings) > 1 else 'key'} {keys} {self._verb()}: {self.problem}. {self.fix}"

    def _verb(self) -> str:
        # One setting conflicts with the model itself (an LSTM with proj_size and 'onnx').
        return "cannot be used together" if len(self.settings) > 1 else "cannot be used with this model"


def conflicts(stack: "Stack") -> Iterator[Conflict]:
    """Every conflict among the stack's callbacks, rule by rule."""
    for rule in RULES:
        yield from rule(stack)


# ---------------------------------------------------------------------- the stack
class Stack:
    """The compression callbacks of a Trainer (or a recipe) and the layers each touches:
    those its targets select, less those :meth:`leave_out` has taken away."""

    def __init__(self, callbacks: Sequence[Any], model: nn.Module | None) -> None:
        self.callbacks = list(callbacks)
        self.model = model
        self._targeted: Dict[int, Dict[str, nn.Module] | None] = {}
        self._left_out: Dict[int, Set[str]] = {}

    def __getitem__(self, section: str) -> List[Any]:
        return of_section(self.callbacks, section)

    def targeted(self, callback: Any) -> Dict[str, nn.Module | None] | None:
        """``{name: layer}`` the callback's targets select; ``None`` when unknown (its own
        setup reports bad targets, and a recipe has no model)."""
        if id(callback) not in self._targeted:
            self._targeted[id(callback)] = callback.selected_layers(self.model, targeted=True)
        return self._targeted[id(callback)]

    def layers(self, callback: Any) -> Dict[str, nn.Module | None] | None:
        """The layers the callback compresses: :meth:`targeted` less those left out."""
        found, out = self.targeted(callback), self._left_out.get(id(callback))
        if found is None or not out:
            return found
        return {name: layer for name, layer in found.items() if name not in out}

    def leave_out(self, callback: Any, name: str) -> None:
        self._left_out.setdefault(id(callback), set()).add(name)

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


def layer_list(names: Sequence[str]) -> str:
    """``'a'``, ``'a' and 'b'``, ``'a', 'b', ... and 9 more``."""
    quoted = [repr(n) for n in names[:_SHOWN]]
    rest = len(names) - len(quoted)
    if rest:
        return f"{', '.join(quoted)} and {rest} more"
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"


def _layers(names: Sequence[str]) -> str:
    return f"layer{'s' if len(names) > 1 else ''} {layer_list(names)}"


def _where(names: Sequence[str], every: str = "on every layer both target") -> str:
    return every if list(names) == [EVERY_LAYER] else f"on {_layers(names)}"


def _grouped(items: Sequence[Tuple[Any, str]]) -> Dict[Any, List[str]]:
    """``[(key, layer)]`` -> ``{key: [layers]}``, keys in first-seen order."""
    groups: Dict[Any, List[str]] = {}
    for key, name in items:
        groups.setdefault(key, []).append(name)
    return groups


# ---------------------------------------------------------------------- the rules
def _two_quantizers_on_one_layer(stack: Stack) -> Iterator[Conflict]:
    """Two QAT callbacks on one layer: a layer has one grid, so one would train it (say at
    int8) and the other export it (at int4). (Two callbacks of another kind on one layer
    are refused by the transform stack, which holds one stage of each kind.)"""
    callbacks = stack["qat"]
    for i, first in enumerate(callbacks):
        for second in callbacks[i + 1:]:
            specs = {id(first): stack.qat_specs(first), id(second): stack.qat_specs(second)}
            shared = [n for n in stack.shared(first, second) if n in specs[id(first)] and n in specs[id(second)]]
            if not shared:
                continue
            # Named in an order of their own (wider grid first), not the list's.
            pair = sorted((first, second), key=lambda qat: (-specs[id(qat)][shared[0]][0].bits, str(qat.config.targets)))
            by_specs = _grouped([(tuple(specs[id(qat)][n][0].describe() for qat in pair), n) for n in shared])
            for (wide, narrow), names in by_specs.items():
                yield Conflict(
                    tuple(Setting("qat", "targets", targets_of(qat)) for qat in pair),
                    f"both quantize {_layers(names)} ({wide} and {narrow}); a layer has one grid, so it would be"
                    " trained on one and exported on the other",
                    "Give the callbacks disjoint `targets`/`exclude`, or use one QuantizationAwareTraining with"
                    " `overrides` for mixed precision",
                    tuple(names), (pair[1], pair[0]),
                )


def _nm_sparsity_and_quantization_groups(stack: Stack) -> Iterator[Conflict]:
    """N:M pruning keeps N of every M consecutive inputs; a quantization group must hold
    whole blocks, or one block's kept weights get different scales."""
    for pruning in stack["pruning"]:
        pattern = pruning.config.sparsity_pattern
        if pattern.kind != "n:m":
            continue
        for qat in stack["qat"]:
            specs = stack.qat_specs(qat)
            found = []
            for name in stack.shared(pruning, qat):
                spec, setting = specs.get(name, (None, None))
                if spec is None or spec.granularity != "group" or spec.group_size % pattern.m == 0:
                    continue
                if setting.argument == "weights":
                    setting = Setting("qat", "group_size", spec.group_size)
                found.append(((setting, spec.group_size), name))
            for (setting, group_size), names in _grouped(found).items():
                multiples = [g for g in (32, 64, 128) if g % pattern.m == 0] or [8 * pattern.m, 16 * pattern.m]
                yield Conflict(
                    (Setting("pruning", "pattern", str(pattern)), setting),
                    f"{_where(names)}, quantization groups of {group_size} inputs split the {pattern.m}-input"
                    f" blocks of {pattern} sparsity, so the kept weights of one block get different scales, which"
                    " N:M sparse kernels (one scale per block) cannot run",
                    f"Use a QuantizationAwareTraining group_size that is a multiple of {pattern.m} (e.g."
                    f" {', '.join(map(str, multiples))}) or granularity='channel', or prune with another pattern",
                    tuple(names), (pruning, qat),
                )


def _adapter_dropout_under_other_stages(stack: Stack) -> Iterator[Conflict]:
    """Dropout acts on the adapter's input, which exists only while the adapter runs as a
    separate branch; pruning or QAT on the same weight make the layer compute with the
    merged weight, where the dropout cannot act."""
    for lora in stack["lora"]:
        dropout = lora.config.lora_dropout
        if dropout <= 0:
            continue
        for section in ("pruning", "qat"):
            for other in stack[section]:
                names = stack.shared(lora, other)
                if not names:
                    continue
                if names == [EVERY_LAYER]:
                    what = ("every Linear weight LoRA adapts (both use their default targets), so those adapters"
                            " are merged into the weights")
                elif len(names) == 1:
                    what = f"the weight of {names[0]!r}, so its adapter is merged into that weight"
                else:
                    what = f"the weights of {layer_list(names)}, so their adapters are merged into those weights"
                yield Conflict(
                    (Setting("lora", "lora_dropout", dropout), Setting(section, "targets", targets_of(other))),
                    f"`lora_dropout`={dropout} acts on the adapter's input, but {type(other).__name__} also"
                    f" transforms {what}",
                    "Set lora_dropout=0, or keep the adapted layers out of the other callback's targets (`exclude`)",
                    tuple(names), (other, lora),
                )


_EVERY_QUANTIZED = "on every layer QAT quantizes"
_ONNX_GRIDS = "(int4: per channel, per tensor or groups of a power of two >= 16; int8: per channel or per tensor)"


def _export_formats_and_quantization(stack: Stack) -> Iterator[Conflict]:
    """What the export was asked to write must hold what QAT trains: compressed-tensors
    stores Linear/Embedding layers (asymmetric weights at 4 or 8 bits only, the widths vLLM
    reads zero points at; int8 activations are written as trained); the ONNX export writes
    int4 and int8 Linear layers on onnxruntime's grids only. Otherwise fit fails at its
    end, after the training."""
    for export in stack["export"]:
        compressed_tensors = export.config.compressed_tensors is True
        onnx = "onnx" in export.config.formats
        if not (compressed_tensors or onnx):
            continue
        exported = _exported_modules(stack, export)
        if onnx and stack.model is not None:
            yield from _onnx_unexportable(stack, export)
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
                compressed_tensors = False  # its layers are moot; the ONNX grids still count
        for qat in stack["qat"]:
            layers = stack.layers(qat) or {}
            found = []
            for name, (spec, setting) in stack.qat_specs(qat).items():
                module = layers.get(name)
                if exported is not None and id(module) not in exported:
                    continue
                kind = "Linear" if module is None else type(module).__name__
                if compressed_tensors:
                    found.extend((key, name) for key in _compressed_tensors_problems(qat, kind, spec, setting))
                if onnx and (module is None or isinstance(module, nn.Linear)) and spec.bits in (4, 8):
                    try:
                        onnx_op(name, spec)
                    except ValueError:
                        if setting.argument == "weights" and spec.granularity == "group":
                            setting = Setting("qat", "group_size", spec.group_size)
                        found.append((("onnx", setting, spec.describe()), name))
            for key, names in _grouped(found).items():
                yield _export_conflict(key, names, qat, export)


def _onnx_unexportable(stack: Stack, export: Any) -> Iterator[Conflict]:
    """Layers of the exported model PyTorch's ONNX exporter refuses whatever their
    compression (an ``nn.LSTM`` with ``proj_size``): said with the other problems, not by
    the dry export on the next run."""
    target = _export_target(stack, export)
    if target is None:
        return
    projected = tuple(name for name, module in target.named_modules()
                      if isinstance(module, nn.LSTM) and getattr(module, "proj_size", 0) > 0)
    if projected:
        yield Conflict(
            (Setting("export", "formats", list(export.config.formats)),),
            f"the exported model holds the LSTM {_layers(list(projected))} with proj_size > 0, which PyTorch's"
            " ONNX exporter cannot export (\"LSTMs with projections\")",
            "Drop 'onnx' from CompressedExport(formats=...) (the packed safetensors export holds the model), or build"
            " the LSTM without proj_size",
            projected,
        )


def _compressed_tensors_problems(qat: Any, kind: str, spec: QuantSpec, setting: Setting) -> List[tuple]:
    """Keys (grouped into one conflict each) of what compressed-tensors cannot store."""
    keys = []
    reason = incompatibility(kind, spec)
    if reason is not None:
        if not spec.symmetric and kind in ("Linear", "Embedding"):
            setting = Setting("qat", "symmetric", False) if setting.argument == "weights" else setting
            keys.append(("ct_grid", setting, spec.describe(), reason))
        else:
            keys.append(("ct_layer", Setting("qat", "targets", targets_of(qat)), spec.describe(), reason))
    return keys


def _export_conflict(key: tuple, names: List[str], qat: Any, export: Any) -> Conflict:
    where, layers = _where(names, _EVERY_QUANTIZED), tuple(names)
    ct = Setting("export", "compressed_tensors", True)
    if key[0] == "onnx":
        _, setting, described = key
        return Conflict(
            (Setting("export", "formats", list(export.config.formats)), setting),
            f"{where}, QAT trains {described}, which the ONNX export cannot write {_ONNX_GRIDS}",
            "Choose such a grid for it (e.g. group_size=32 for int4, granularity='channel' for int8), or drop"
            " 'onnx' from CompressedExport(formats=...)",
            layers, (qat,),
        )
    _, setting, described, reason = key
    if key[0] == "ct_grid":
        fix = ("Quantize it symmetrically (symmetric=True), use 4 or 8 bits, or export with compressed_tensors=False"
               " (our loader reads asymmetric zero points of any width)")
    else:
        fix = (f"Keep {'it' if len(names) == 1 else 'them'} out of QuantizationAwareTraining (exclude={names!r}), or"
               " export with compressed_tensors=False")
    return Conflict((ct, setting), f"{where}, QAT trains {described}, which compressed-tensors cannot store: {reason}",
                    fix, layers, (qat,))


def _export_target(stack: Stack, export: Any) -> nn.Module | None:
    """The module the export writes (``None``: no model, or a bad ``module`` that the
    export's own setup reports)."""
    if stack.model is None or export.config.module is None:
        return stack.model
    try:
        return stack.model.get_submodule(export.config.module)
    except AttributeError:
        return None


def _exported_modules(stack: Stack, export: Any) -> set | None:
    """``id``s of the modules the export writes; ``None``: all (or unknown)."""
    target = _export_target(stack, export)
    return None if target is None else {id(m) for m in target.modules()}


def targets_of(callback: Any) -> Any:
    """The callback's ``targets`` (``target_modules`` for LoRA) as plain values."""
    config = callback.config
    targets = config.target_modules if callback.section == "lora" else config.targets
    if targets is None:
        return None
    return [t if isinstance(t, str) else t.__name__ for t in targets]


def of_section(callbacks: Sequence[Any], section: str) -> List[Any]:
    return [cb for cb in callbacks if getattr(cb, "section", None) == section]


RULES = (
    _two_quantizers_on_one_layer,
    _nm_sparsity_and_quantization_groups,
    _adapter_dropout_under_other_stages,
    _export_formats_and_quantization,
)

__all__ = ["EVERY_LAYER", "Conflict", "Setting", "Stack", "RULES", "conflicts", "layer_list", "of_section", "targets_of"]
