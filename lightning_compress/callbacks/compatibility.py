"""Settings that cannot train or export a correct model, refused before training, all at once.

Each callback checks its own arguments when it is built. What fails only on a given model
(a layer a method cannot compress with its settings: a group size that does not divide
it, N:M blocks that do not fit it, a grouped convolution LoRA cannot adapt) or only in
combination (one callback's setting that another cannot honour on the same layer, the
rules of :mod:`~lightning_compress.callbacks.conflicts`) is checked here, from two entry
points, reading the callbacks through their public API only (this module imports none of this
package's callbacks):

- :func:`prepare_stack`, first thing in every compression callback's ``setup``: the first
  callback to set up examines the whole stack on the model, before any callback has
  changed it and before the first step, whatever the order of the list. Every problem of
  every callback is named in one :class:`IncompatibleSettings`, with the ``exclude``
  entries (and recipe keys) that fix them; layers a callback may leave out
  (``on_incompatible="skip"``, or a grouped convolution it cannot compress that it selected
  by type, see :mod:`lightning_compress.core.incompatible`) are left out with one warning;
- :func:`check_recipe`, from the recipe loader: the combinations visible without the
  model, named by their recipe keys.

Every refusal names the settings, the layers, why, and what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Sequence, Tuple

from lightning.pytorch.callbacks import StochasticWeightAveraging
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_compress.callbacks.conflicts import (
    EVERY_LAYER,
    Conflict,
    Setting,
    Stack,
    conflicts,
    of_section,
    targets_of,
)
from lightning_compress.callbacks.coverage import tied_weight_issues, warn_about_coverage
from lightning_compress.core.incompatible import (
    LayerIssue,
    describe_layer,
    grouped_convolution,
    limited_by_type,
    named_by,
)

_CHECKED_ATTR = "_lc_checked_stack"
_ORDER = ("lora", "distillation", "pruning", "qat", "export")  # the registry's canonical order
# What a method does to a layer, and how a layer it leaves out stays.
_VERBS = {"qat": ("quantize", "in float"), "pruning": ("prune", "dense"), "lora": ("adapt", "without an adapter")}


class IncompatibleSettings(ValueError):
    """Settings that cannot train or export a correct model: layers a callback cannot
    compress, or two callbacks' settings that cannot hold together."""


class IncompatibleLayersSkipped(UserWarning):
    """Layers left out of a callback before training (named, with why)."""


# ---------------------------------------------------------------------- entry points
def prepare_stack(trainer: Any, pl_module: nn.Module, stage: str) -> None:
    """Run by every compression callback at the start of its ``setup``.

    The first call of a fit examines every callback of the Trainer on ``pl_module`` (later
    calls of the same fit find it examined): it raises one error naming every problem, or
    leaves the layers that may be left out out of their callbacks (one warning). Then it
    lets callbacks that need the model as the user built it (``KnowledgeDistillation
    (teacher="self")``) take it through their ``before_compression_setup(trainer,
    pl_module)``, before any callback has changed it. In other stages (validate, test) the
    same layers are left out, and only the layers callbacks cannot compress are refused.

    Raises:
        IncompatibleSettings: naming every problem found.
    """
    callbacks = list(trainer.callbacks)
    fit = stage == "fit"
    key = (fit, id(pl_module), tuple(id(cb) for cb in callbacks))
    if trainer.__dict__.get(_CHECKED_ATTR) != key:
        verdict = examine(callbacks, pl_module)
        if verdict.refused(with_conflicts=fit):
            raise IncompatibleSettings(verdict.message(with_conflicts=fit))
        verdict.apply()
        if fit:
            warn_about_coverage(callbacks, pl_module)
            check_batch_norm_update(callbacks, pl_module)
        trainer.__dict__[_CHECKED_ATTR] = key
    if not fit:
        return
    for callback in callbacks:
        before = getattr(callback, "before_compression_setup", None)
        if callable(before):
            before(trainer, pl_module)


def check_batch_norm_update(callbacks: Sequence[Any], model: nn.Module) -> None:
    """Refuse QAT's ``freeze_bn_step`` beside Lightning's ``StochasticWeightAveraging`` on
    a model with BatchNorm: SWA resets the running statistics of the averaged model and
    recomputes them in one extra epoch in train mode, which QAT keeps BatchNorm out of, so
    the model (and its export) would end with mean 0 and variance 1 in every channel.

    Raises:
        IncompatibleSettings: naming both callbacks and the fix.
    """
    swa = [i for i, cb in enumerate(callbacks) if isinstance(cb, StochasticWeightAveraging)]
    if not swa or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    for index, callback in enumerate(callbacks):
        if getattr(callback, "section", None) == "qat" and getattr(callback, "freeze_bn_step", None) is not None:
            raise IncompatibleSettings(
                f"QuantizationAwareTraining(freeze_bn_step={callback.freeze_bn_step!r}) (callbacks[{index}]) keeps"
                f" BatchNorm in eval mode, so Lightning's StochasticWeightAveraging (callbacks[{swa[0]}]) cannot"
                " recompute the BatchNorm statistics of the averaged model in its extra epoch: they would stay reset"
                " (mean 0, variance 1). Set freeze_bn_step=None, or use EMAWeightAveraging, which averages the"
                " statistics with the weights")


def settle_layers(callback: Any, model: nn.Module) -> None:
    """Examine one callback alone on ``model`` (one whose layers did not exist when the
    stack was examined: LoRA on layers built in ``configure_model``).

    Raises:
        IncompatibleSettings: naming every layer it cannot compress.
    """
    verdict = examine([callback], model)
    if verdict.refused(with_conflicts=False):
        raise IncompatibleSettings(verdict.message(with_conflicts=False))
    verdict.apply()


def check_recipe(callbacks: Sequence[Any], error: Callable[[str], Exception] = IncompatibleSettings) -> None:
    """Refuse the combinations a recipe's callbacks (built from it) show without a model.

    Only combinations that hold on every model are refused here (both callbacks on their
    default targets, settings that apply to every layer), and not those a callback with
    ``on_incompatible: skip`` resolves by leaving layers out; the rest is checked when the
    callbacks set up on the model.

    Raises:
        ``error(message)`` naming the recipe keys of every such combination.
    """
    found = [c for c in conflicts(Stack(callbacks, None)) if _giver(c) is None]
    if found:
        texts = [c.for_recipe() for c in found]
        raise error(texts[0] if len(texts) == 1 else "\n".join(
            [f"{len(texts)} combinations of this recipe cannot be used together:", *(f"- {t}" for t in texts)]))


def check_quantization_trains(trainer: Any, qat: Any, start: int, total: float) -> None:
    """From QAT's ``on_train_start`` (where ``start_step`` resolves, before the first
    step): refuse an export of grids no training step used.

    Raises:
        IncompatibleSettings: when QAT's ``start_step`` resolves to the end of the run or
            later while a CompressedExport will pack the quantized codes.
    """
    exports = of_section(trainer.callbacks, "export")
    if exports and start >= total and trainer.global_step < total:
        bits = sorted({spec.bits for spec in qat.layer_specs.values()})
        conflict = Conflict(
            (Setting("qat", "start_step", qat.config.start_step), Setting("export", "dirpath", str(exports[0].config.dirpath))),
            f"start_step resolves to step {start} but this run has {int(total)} optimizer steps, so no step trains"
            f" with int{'/'.join(map(str, bits))} fake quantization and the export would pack weights that never saw"
            " that grid (round-to-nearest of the float weights)",
            "Set QuantizationAwareTraining(start_step=...) before the end of the run (e.g. 0.5 = halfway; with `init`"
            " or `smoothing`, leave room for `calibration_batches` before it, or lower them), or train for more steps",
        )
        raise IncompatibleSettings(conflict.for_callbacks(_class_names(trainer.callbacks)))


# ---------------------------------------------------------------------- the examination
@dataclass(frozen=True)
class LayerProblem:
    """A layer ``callback`` selected but cannot compress. ``named``: a grouped convolution
    a name glob selected, which is never left out."""

    callback: Any
    layer: str
    kind: str
    issue: LayerIssue
    named: bool = False

    def line(self) -> str:
        targets = "target_modules" if self.callback.section == "lora" else "targets"
        note = (f" (a grouped convolution that a name in `{targets}` selects is an error even with"
                " on_incompatible='skip'; one selected by its type is left out with a warning)") if self.named else ""
        return f"{self.layer!r} ({self.kind}): {self.issue.message}{note}"


@dataclass
class Verdict:
    """What :func:`examine` found: the layers to leave out of each callback, and what
    stops the run."""

    callbacks: List[Any]
    model: nn.Module
    skips: Dict[int, Dict[str, str]] = field(default_factory=dict)
    problems: List[LayerProblem] = field(default_factory=list)
    conflicts: List[Conflict] = field(default_factory=list)
    emptied: List[Any] = field(default_factory=list)  # callbacks that skipping leaves with no layer
    known: set = field(default_factory=set)  # ids of the callbacks whose layers were examined
    targeted_count: Dict[int, int] = field(default_factory=dict)  # layers each examined callback targets

    def refused(self, *, with_conflicts: bool) -> bool:
        return bool(self.problems or self.emptied or (with_conflicts and self.conflicts))

    def apply(self) -> None:
        """Tell each examined callback which layers it leaves out, and warn once."""
        for callback in self.callbacks:
            if id(callback) in self.known:
                callback.skip_layers(self.skips.get(id(callback), {}), self.model)
        text = self.warning()
        if text is not None:
            rank_zero_warn(text, category=IncompatibleLayersSkipped)  # every rank decides the same

    def message(self, *, with_conflicts: bool = True) -> str:
        """Every problem, grouped by callback, then the ``exclude`` entries that fix them."""
        blocks: List[List[str]] = []
        for callback, problems in _by_callback(self.problems).items():
            settings = dict.fromkeys(f"{p.issue.argument}={p.issue.value!r}" for p in problems)
            verb = _VERBS.get(callback.section, ("compress", ""))[0]
            head = f"{_label(callback, settings)} cannot {verb}"
            if len(problems) == 1:
                blocks.append([f"{head} layer {problems[0].line()}"])
            else:
                blocks.append([f"{head} {len(problems)} layers it targets:", *(f"  - {p.line()}" for p in problems)])
        for callback in self.emptied:
            skipped = self.skips.get(id(callback), {})
            blocks.append([f"{_label(callback)} would compress no layer: it leaves out every layer its targets"
                           " select; change its settings or its `targets`:",
                           *(f"  - {name!r}: {why}" for name, why in skipped.items())])
        classes = _class_names(self.callbacks)
        if with_conflicts:
            blocks.extend([c.for_callbacks(classes)] for c in sorted(self.conflicts, key=lambda c: c.for_callbacks(classes)))
        if len(blocks) == 1:
            text = "\n".join(blocks[0])
        else:
            lines = [f"{len(blocks)} problems stop this run before training (all of them, so one change fixes the run):"]
            for block in blocks:
                lines.append(f"- {block[0]}")
                lines.extend(block[1:])
            text = "\n".join(lines)
        fix = self._fix(with_conflicts)
        return f"{text}\n{fix}" if fix else text

    def warning(self) -> str | None:
        """One warning naming every layer left out, by callback, with why."""
        skipped = {id(cb): cb for cb in self.callbacks if self.skips.get(id(cb))}
        if not skipped:
            return None
        total = sum(len(self.skips[i]) for i in skipped)
        lines = [f"{total} layer{'s' if total > 1 else ''} left out before training by the callbacks that cannot"
                 " compress them (on_incompatible='skip', or a form of a layer the method cannot take, selected by its type):"]
        for callback in _sorted_callbacks(skipped.values()):
            layers = self.skips[id(callback)]
            stays = _VERBS.get(callback.section, ("", "uncompressed"))[1]
            lines.append(f"{_label(callback)} leaves {len(layers)} layer{'s' if len(layers) > 1 else ''} {stays}:")
            lines.extend(f"  - {name!r}: {why}" for name, why in layers.items())
        return "\n".join(lines)

    def _fix(self, with_conflicts: bool) -> str:
        """``Fix: add exclude=[...] to ...``: the full list of names for each callback
        (not where that would leave it no layer: its settings must change)."""
        excludes: Dict[int, List[str]] = {}
        skippable: Dict[int, bool] = {}
        owners: Dict[int, Any] = {}

        def add(callback: Any, names: Sequence[str], can_skip: bool) -> None:
            owners[id(callback)] = callback
            listed = excludes.setdefault(id(callback), [])
            listed.extend(n for n in names if n not in listed)
            can_skip = can_skip and getattr(callback.config, "on_incompatible", None) == "error"
            skippable[id(callback)] = skippable.get(id(callback), False) or can_skip

        for problem in self.problems:
            add(problem.callback, [problem.layer], not problem.named)
        for conflict in self.conflicts if with_conflicts else ():
            excluding = next((cb for cb in conflict.callbacks if _exclude_argument(cb)), None)
            if excluding is not None and conflict.layers and EVERY_LAYER not in conflict.layers:
                add(excluding, conflict.layers, True)
        parts, skips = [], []
        for callback in _sorted_callbacks(owners.values()):
            names = excludes[id(callback)]
            if len(names) >= self.targeted_count.get(id(callback), len(names) + 1):
                continue  # excluding (or skipping) every layer leaves nothing to compress
            argument = _exclude_argument(callback)
            parts.append(f"{argument}={names!r} to {_label(callback)} (recipe key {callback.section}.{argument})")
            if skippable[id(callback)]:
                skips.append(callback)
        # One setting behind all of each callback's problems (a group size several layers do
        # not divide): changing those comes first, not excluding nearly every layer.
        settings = []
        for callback, problems in _by_callback(self.problems).items():
            arguments = {p.issue.argument for p in problems}
            if len(problems) > 1 and len(arguments) == 1 and next(iter(arguments)).isidentifier():
                (argument,) = arguments
                settings.append(f"`{argument}` of {_label(callback)} (recipe key {callback.section}.{argument})")
        complete = settings and len(settings) == len(_by_callback(self.problems)) and not (with_conflicts and self.conflicts)
        change = f"change {' and '.join(settings)} to values every layer above takes" if complete else ""
        text = "; or ".join(filter(None, [change, f"add {'; and '.join(parts)}" if parts else ""]))
        text = f"Fix: {text}" if text else ""
        if skips:
            keys = ", ".join(f"{cb.section}.on_incompatible" for cb in skips)
            names = " and ".join(_label(cb) for cb in skips)
            text += (f"; or pass on_incompatible='skip' to {names} (recipe key{'s' if len(skips) > 1 else ''} {keys})"
                     " to leave such layers out with a warning")
        return text + "." if text else ""


def examine(callbacks: Sequence[Any], model: nn.Module) -> Verdict:
    """Every problem of ``callbacks`` on ``model``, and the layers each may leave out.

    First each callback's layer issues (:meth:`layer_issues`, asked on what its targets
    select), then the rules between callbacks on the layers left, until leaving layers out
    resolves nothing more.
    """
    stack = Stack(callbacks, model)
    verdict = Verdict(list(callbacks), model)
    compressing = [cb for cb in callbacks if callable(getattr(cb, "layer_issues", None)) and getattr(cb, "section", "")]
    adapted = {name for cb in compressing if cb.section == "lora" for name in (stack.targeted(cb) or {})}
    for callback in compressing:
        layers = stack.targeted(callback)
        if layers is None:
            continue
        verdict.known.add(id(callback))
        verdict.targeted_count[id(callback)] = len(layers)
        targets = targets_of(callback)
        issues = callback.layer_issues(layers, model)
        if callback.section == "pruning":  # a weight the mask's zeros would change for another module
            issues.update(tied_weight_issues(model, {n: layers[n] for n in layers if n not in issues}, adapted,
                                             callback.config.targets))
        for name, issue in issues.items():
            limited = limited_by_type(layers[name])
            named = limited is not None and named_by(name, targets)
            if (limited is not None and not named) or (callback.on_incompatible == "skip" and not named):
                kind = "a grouped convolution" if grouped_convolution(layers[name]) else f"a layer with {limited}"
                why = issue.message + (f" ({kind} selected by its type)" if limited else "")
                verdict.skips.setdefault(id(callback), {})[name] = why
            else:
                verdict.problems.append(LayerProblem(callback, name, describe_layer(layers[name]), issue, named))
            stack.leave_out(callback, name)
    classes = _class_names(callbacks)
    while True:
        verdict.conflicts, resolved = [], False
        for conflict in conflicts(stack):
            giver = _giver(conflict)
            if giver is None or id(giver) not in verdict.known:
                verdict.conflicts.append(conflict)
                continue
            for name in conflict.layers:
                verdict.skips.setdefault(id(giver), {})[name] = conflict.for_callbacks(classes)
                stack.leave_out(giver, name)
            resolved = True
        if not resolved:
            break
    for callback in compressing:
        skipped = verdict.skips.get(id(callback))
        if skipped and len(skipped) == verdict.targeted_count[id(callback)]:
            verdict.emptied.append(callback)
    verdict.problems.sort(key=lambda p: _position(stack, p.callback, p.layer))
    return verdict


def _giver(conflict: Conflict) -> Any:
    """The callback that leaves the conflict's layers out (``on_incompatible="skip"``)."""
    if not conflict.layers:
        return None
    return next((cb for cb in conflict.callbacks if getattr(cb.config, "on_incompatible", "error") == "skip"), None)


def _position(stack: Stack, callback: Any, layer: str) -> Tuple[int, int]:
    names = list(stack.targeted(callback) or ())
    return (0, names.index(layer)) if layer in names else (1, 0)


def _by_callback(problems: Sequence[LayerProblem]) -> Dict[Any, List[LayerProblem]]:
    groups: Dict[int, List[LayerProblem]] = {}
    for problem in problems:
        groups.setdefault(id(problem.callback), []).append(problem)
    callbacks = {id(p.callback): p.callback for p in problems}
    return {cb: groups[id(cb)] for cb in _sorted_callbacks(callbacks.values())}


def _sorted_callbacks(callbacks: Any) -> List[Any]:
    """The registry's order, then by name and settings: the same whatever the list order."""
    def key(cb: Any) -> tuple:
        section = getattr(cb, "section", "")
        return (_ORDER.index(section) if section in _ORDER else len(_ORDER), str(getattr(cb.config, "name", "")),
                repr(cb.config))
    return sorted(callbacks, key=key)


def _label(callback: Any, settings: Sequence[str] = ()) -> str:
    """``QuantizationAwareTraining(name='int4', group_size=128)``; ``settings``: ``"a=v"``."""
    name = getattr(callback.config, "name", None)
    arguments = ([f"name={name!r}"] if name else []) + list(settings)
    return f"{type(callback).__name__}({', '.join(arguments)})" if arguments else type(callback).__name__


def _exclude_argument(callback: Any) -> str | None:
    config = callback.config
    for argument in ("exclude_modules", "exclude"):
        if argument in getattr(config, "__dataclass_fields__", {}):
            return argument
    return None


def _class_names(callbacks: Sequence[Any]) -> Dict[str, str]:
    return {cb.section: type(cb).__name__ for cb in callbacks if getattr(cb, "section", None)}


__all__ = [
    "EVERY_LAYER",
    "IncompatibleLayersSkipped",
    "IncompatibleSettings",
    "Conflict",
    "LayerProblem",
    "Setting",
    "Verdict",
    "prepare_stack",
    "settle_layers",
    "check_recipe",
    "check_quantization_trains",
    "check_batch_norm_update",
    "examine",
]
