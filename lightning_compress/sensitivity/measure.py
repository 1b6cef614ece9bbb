"""Per-layer sensitivity: how much the loss rises when one layer alone is compressed.

For each targeted layer and each candidate, only that layer's weight is changed, through
the same weight-transform stack the callbacks use: a :class:`WeightFakeQuantizer` at the
FAKE_QUANT stage (the grid QAT trains on and the export packs), or a magnitude mask at
the MASK stage (:func:`~lightning_compress.sparsity.masks.layer_mask`). The model is
evaluated on a few batches in eval mode under ``no_grad``, and the stage is removed
again: the model comes back exactly as it was (parameters untouched, train/eval flags
restored, no transform left that was not there before).
"""

from __future__ import annotations

import math
import random
import warnings
from typing import Any, Callable, Dict, Iterable, List, Mapping, Sequence

import numpy
import torch
from torch import Tensor, nn

from lightning_compress.core.notes import add_note
from lightning_compress.core.targeting import Target, select_layers, validate_targets, weight_param
from lightning_compress.core.transforms import (
    Stage,
    get_weight_transform,
    install_weight_transform,
    remove_weight_transform,
    weight_before,
)
from lightning_compress.core.validate import ArgumentError, check_callable, check_choice, check_int, check_module, is_number
from lightning_compress.quant.fake_quant import check_divisible
from lightning_compress.quant.spec import QuantSpec, parse_bits
from lightning_compress.quant.weights import DEFAULT_TARGET_TYPES, QUANTIZABLE_TYPES, attach_weight_quantizers
from lightning_compress.sensitivity.report import SensitivityReport, SensitivityRow
from lightning_compress.sparsity.masks import MaskedWeight, SparsityPattern, layer_mask

REFERENCES = ("loss", "kl")
LossFn = Callable[[nn.Module, Any], Tensor]
_OWNER = "layer_sensitivity"  # owner token of the stages this module puts on and takes off


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn | None = None,
    *,
    bits: Sequence[int | str] = (8, 4, 3),
    sparsities: Sequence[float] = (),
    group_size: int | None = None,
    targets: Sequence[Target] | None = None,
    exclude: Sequence[Target] | None = None,
    reference: str = "loss",
) -> SensitivityReport:
    """Measure, layer by layer, what compressing that layer alone costs.

    Each targeted layer's weight is fake-quantized at each candidate bit width on QAT's
    grid (symmetric, min/max ranges, per output channel or per ``group_size`` inputs),
    and, for each of ``sparsities``, magnitude-pruned (unstructured) at that sparsity;
    the other layers stay in float. Every case is evaluated on all ``batches``.

    Args:
        model: a ``LightningModule`` or any ``nn.Module``, on the device its batches go to.
        batches: a few validation batches (a list, or ``itertools.islice(loader, 8)``);
            read once and kept, each moved to the model's device.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor`` for ``reference="loss"``.
            Default for a ``LightningModule``: the loss ``training_step(batch, 0)``
            returns (a tensor, or the ``"loss"`` key of a dict), run in eval mode with
            ``self.log``/``self.log_dict`` silenced, so no Trainer is needed; a
            ``training_step`` that needs its Trainer (manual optimization,
            ``self.trainer.*``) needs a ``loss_fn``. A plain ``nn.Module`` needs one
            (or ``reference="kl"``).
        bits: candidate bit widths, 2 to 8 (``"int4"`` works too).
        sparsities: candidate sparsities in (0, 1); default none.
        group_size: inputs sharing a scale (QAT's ``group_size``); ``None``: one scale
            per output channel.
        targets, exclude: layer types or name globs, as for ``QuantizationAwareTraining``
            (default: every Linear, Conv, ``nn.MultiheadAttention`` and recurrent layer).
        reference: ``"loss"``: delta = mean loss over the batches minus the float
            model's; ``"kl"``: delta = KL(float outputs || compressed outputs) of the
            softmax over the last dimension, averaged over every position, with outputs
            ``model(batch)`` for a tensor batch, ``model(batch[0])`` for a tuple/list,
            ``model(**batch)`` for a dict (a ``.logits`` attribute, a ``"logits"`` key or
            the first element of a tuple output is used).

    Returns:
        A :class:`SensitivityReport`: one row per (layer, candidate).

    Raises:
        ArgumentError: naming the argument, for empty ``batches``, bits outside 2..8,
            a sparsity outside (0, 1), no candidate at all, a bad ``group_size``, an
            unknown ``reference``, ``reference="loss"`` without a loss to use, or a
            float model whose loss (outputs) on the same batches differs between two
            evaluations (state carried from one call to the next).
        ValueError: a target that matches no layer, a ``group_size`` that does not
            divide a layer's inputs, or a layer that already carries the stage a
            candidate needs (a model under QAT or pruning: measure the float model).
    """
    check_module("model", model)
    candidate_bits = check_bits(bits)
    candidate_sparsities = _check_sparsities(sparsities)
    if not candidate_bits and not candidate_sparsities:
        raise ArgumentError("bits", "`bits` and `sparsities` are both empty: give at least one candidate, e.g. bits=(8, 4)")
    if group_size is not None:
        check_int("group_size", group_size, minimum=2, what="None or an int >= 2 (inputs sharing one scale)")
    check_choice("reference", reference, REFERENCES)
    check_callable("loss_fn", loss_fn, what="a function (model, batch) -> scalar loss tensor")
    if reference == "kl" and loss_fn is not None:
        raise ArgumentError(
            "loss_fn", "`loss_fn` is for reference='loss'; reference='kl' compares the model's outputs: drop one of them"
        )
    if reference == "loss" and loss_fn is None:
        loss_fn = _default_loss(model)
    targets = validate_targets("targets", targets, QUANTIZABLE_TYPES)
    exclude = validate_targets("exclude", exclude, QUANTIZABLE_TYPES)
    batches = _check_batches(batches, model)

    layers = select_layers(model, targets=targets, exclude=exclude, supported=QUANTIZABLE_TYPES, default=DEFAULT_TARGET_TYPES)
    specs = {bit: QuantSpec(bit, "channel" if group_size is None else "group", group_size) for bit in candidate_bits}
    _check_layers(layers, specs, bool(candidate_sparsities))

    modes = {module: module.training for module in model.modules()}
    silenced = _silence_logging(model)
    try:
        model.eval()
        evaluate = _Evaluator(model, batches, loss_fn, reference)
        rows: List[SensitivityRow] = []
        for key, layer in layers.items():
            param = weight_param(key, layer)
            weight = weight_before(layer, Stage.FAKE_QUANT, param)
            common = dict(layer=key, type=type(layer).__name__, params=weight.numel())
            for bit, spec in specs.items():
                quantizer = attach_weight_quantizers({key: layer}, {key: spec}, owner=_OWNER)[key]
                quantizer.enabled = True
                try:
                    rows.append(SensitivityRow(**common, bits=bit, sparsity=0.0, delta=evaluate()))
                finally:
                    remove_weight_transform(layer, Stage.FAKE_QUANT, param)
            for sparsity in candidate_sparsities:
                mask = MaskedWeight()
                mask.set(layer_mask(weight_before(layer, Stage.MASK, param), sparsity, SparsityPattern("unstructured")), weight)
                install_weight_transform(layer, Stage.MASK, mask, owner=_OWNER, active_owners=set(), param=param)
                try:
                    rows.append(SensitivityRow(**common, bits=None, sparsity=sparsity, delta=evaluate()))
                finally:
                    remove_weight_transform(layer, Stage.MASK, param)
    finally:
        for module, training in modes.items():
            module.training = training
        _restore_logging(silenced)
    return SensitivityReport(
        rows=rows, reference=reference, baseline=evaluate.baseline, bits=candidate_bits, sparsities=candidate_sparsities,
        group_size=group_size, targets=targets, exclude=exclude, batches=len(batches),
    )


class _Evaluator:
    """The float model's value on the batches (measured once), then each case's delta.

    Every evaluation of batch ``i`` draws the same random numbers (torch's, numpy's and
    Python's global generators seeded with ``i``, the caller's states put back): a loss
    that samples (noise, random masks) compares its cases on the same draws."""

    def __init__(self, model: nn.Module, batches: List[Any], loss_fn: LossFn | None, reference: str) -> None:
        self.model, self.batches, self.loss_fn, self.reference = model, batches, loss_fn, reference
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.warned_dtype = False  # a half-precision loss is warned about once
        if reference == "loss":
            self.float_losses = self._losses()
            self.baseline = math.fsum(self.float_losses) / len(batches)
            unusable = [i for i, loss in enumerate(self.float_losses) if not math.isfinite(loss)]
            what = "loss"
        else:
            self.float_log_probs = self._all_log_probs()
            self.baseline = 0.0
            unusable = [i for i, log_probs in enumerate(self.float_log_probs) if not log_probs.isfinite().all()]
            what = "outputs"
        if unusable:  # every delta would be nan: a report of nothing, and a budget solved on nan
            why = ("a batch whose labels are all ignored, -100, gives a nan mean cross-entropy; leave such batches"
                   " out, or pass a `loss_fn` that handles them") if what == "loss" else (
                   "logits of -inf or nan, as a masked vocabulary gives, make the KL nan; mask with a large finite"
                   " negative value, or use reference='loss'")
            raise ArgumentError("batches", f"the float model's {what} on batch(es) {unusable[:8]} (counting from 0)"
                                f" is not finite, so no delta can be measured against it ({why})")
        self._check_repeatable(what)

    def _check_repeatable(self, what: str) -> None:
        """Evaluate the float model a second time: a model that answers the same batches
        differently from one call to the next (a ``training_step`` that carries a hidden
        state over, as Lightning's demo ``LightningLSTM`` does) would report that drift as
        every layer's delta, the 8-bit ones included, and a budget solved on noise.

        Raises:
            ArgumentError: naming ``loss_fn`` (or ``batches`` for ``reference="kl"``),
                with both values and the fixes.
        """
        if what == "loss":
            again = self._losses()
            moved = [(i, a, b) for i, (a, b) in enumerate(zip(self.float_losses, again))
                     if not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)]
            shown = ", ".join(f"batch {i}: {a:.6g} then {b:.6g}" for i, a, b in moved[:3])
        else:
            again = self._all_log_probs()
            moved = [i for i, (a, b) in enumerate(zip(self.float_log_probs, again))
                     if not torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)]
            shown = f"batch(es) {moved[:8]}"
        if moved:
            argument, fix = (("loss_fn", "pass a `loss_fn(model, batch)` that starts every batch afresh, or"
                              " reference='kl' (the outputs of `model(batch)`; --reference kl on the command line)")
                             if what == "loss" else
                             ("batches", "reset that state in the model's forward, or use reference='loss' with a"
                              " `loss_fn` that does"))
            raise ArgumentError(
                argument,
                f"the float model's {what} on the same batches changed between two evaluations ({shown}), with torch's,"
                " numpy's and Python's global generators seeded the same both times: the model keeps state from one"
                " call to the next (a training_step that carries a hidden state over, as Lightning's demo"
                " LightningLSTM does), or draws from a generator of its own, so every layer's delta would measure"
                f" that drift, not the layer; {fix}",
            )

    def __call__(self) -> float:
        if self.reference == "loss":
            return math.fsum(self._losses()) / len(self.batches) - self.baseline
        total = 0.0
        for log_probs, reference in zip(self._all_log_probs(), self.float_log_probs):
            kl = torch.nn.functional.kl_div(log_probs, reference, log_target=True, reduction="none").sum(-1)
            total += float(kl.mean())
        return total / len(self.batches)

    def _losses(self) -> List[float]:
        return [self._with_draws(index, lambda: self._loss(batch)) for index, batch in enumerate(self.batches)]

    def _all_log_probs(self) -> List[Tensor]:
        return [self._with_draws(index, lambda: _log_probs(_outputs(self.model, batch)))
                for index, batch in enumerate(self.batches)]

    def _with_draws(self, index: int, compute: Callable[[], Any]) -> Any:
        """``compute()`` with torch's random generators (the CPU's, and the model's
        accelerator's), numpy's and Python's seeded with ``index``, restored afterwards."""
        accelerator = self.device.type if self.device.type != "cpu" else "cuda"
        devices = [self.device.index or 0] if self.device.type != "cpu" else []
        python_state, numpy_state = random.getstate(), numpy.random.get_state()
        try:
            with torch.random.fork_rng(devices=devices, device_type=accelerator):
                torch.manual_seed(index)
                random.seed(index)
                numpy.random.seed(index)
                return compute()
        finally:
            random.setstate(python_state)
            numpy.random.set_state(numpy_state)

    def _loss(self, batch: Any) -> float:
        value = self.loss_fn(self.model, batch)
        if isinstance(value, Mapping):
            value = value.get("loss")
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ArgumentError(
                "loss_fn", f"the loss must be a scalar tensor (or a dict with a 'loss' tensor), got {type(value).__name__}"
            )
        if value.dtype in (torch.bfloat16, torch.float16) and not self.warned_dtype:
            self.warned_dtype = True
            warnings.warn(f"the loss is a {str(value.dtype).removeprefix('torch.')} number, whose rounding step (about"
                          f" {torch.finfo(value.dtype).eps:.1e} of its size) hides most layers' deltas (they round to"
                          " 0 or to one step); measure a float32 copy of the model (copy.deepcopy(model).float()), or"
                          " use reference='kl', which compares the outputs in float64", UserWarning, stacklevel=4)
        return float(value.detach().double())


def _default_loss(model: nn.Module) -> LossFn:
    """``training_step``'s loss for a LightningModule (with logging silenced)."""
    import lightning.pytorch as pl

    if not isinstance(model, pl.LightningModule):
        raise ArgumentError(
            "loss_fn",
            f"reference='loss' needs `loss_fn(model, batch) -> loss` for a {type(model).__name__} (not a"
            " LightningModule); pass one, or reference='kl' to compare outputs",
        )

    def training_step_loss(module: nn.Module, batch: Any) -> Tensor:
        try:
            out = module.training_step(batch, 0)
        except Exception as err:
            add_note(err, "(lightning_compress: the default loss calls training_step(batch, 0) outside a Trainer; pass loss_fn=...)")
            raise
        if out is None:
            raise ArgumentError(
                "loss_fn", "training_step returned None (manual optimization?); pass loss_fn(model, batch) -> loss"
            )
        return out

    return training_step_loss


def _outputs(model: nn.Module, batch: Any) -> Tensor:
    try:
        out = _call(model, batch)
    except TypeError as error:  # a forward that does not take the batch as reference='kl' passes it
        add_note(error, "(lightning_compress: reference='kl' calls model(batch) for a tensor batch, model(batch[0]) for a"
                       " tuple or list, model(**batch) for a dict; for another forward, pass reference='loss' with a"
                       " loss_fn(model, batch))")
        raise
    if isinstance(out, Mapping) and "logits" in out:
        out = out["logits"]
    elif not isinstance(out, Tensor) and isinstance(getattr(out, "logits", None), Tensor):
        out = out.logits
    elif isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, Tensor) or not out.is_floating_point():
        raise ArgumentError("reference", f"reference='kl' needs float outputs (logits), the model returned {type(out).__name__}")
    return out


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    if isinstance(batch, Mapping):
        return model(**batch)
    raise ArgumentError(
        "batches",
        f"reference='kl' cannot call the model on a {type(batch).__name__} batch; use reference='loss' with a loss_fn",
    )


def _log_probs(logits: Tensor) -> Tensor:
    return torch.log_softmax(logits.double(), dim=-1)


def check_bits(bits: Any) -> tuple:
    """``bits`` (an int, ``"int4"``, or a list of them) as distinct ints, highest first.

    Raises:
        ArgumentError: not a list of bit widths from 2 to 8, or one listed twice.
    """
    if isinstance(bits, (int, str)) and not isinstance(bits, bool):
        bits = (bits,)
    if not isinstance(bits, (list, tuple)):
        raise ArgumentError("bits", f"`bits` must be a list of bit widths from 2 to 8, e.g. (8, 4, 3); got {bits!r}")
    parsed = [parse_bits("bits", bit) for bit in bits]
    if len(set(parsed)) != len(parsed):
        raise ArgumentError("bits", f"`bits` lists a bit width twice: {list(bits)}; give each once")
    return tuple(sorted(parsed, reverse=True))


def _check_sparsities(sparsities: Any) -> tuple:
    if is_number(sparsities):
        sparsities = (sparsities,)
    if not isinstance(sparsities, (list, tuple)):
        raise ArgumentError("sparsities", f"`sparsities` must be a list of fractions in (0, 1), e.g. (0.5, 0.75); got {sparsities!r}")
    for sparsity in sparsities:
        if not is_number(sparsity) or not 0 < sparsity < 1:
            raise ArgumentError(
                "sparsities", f"`sparsities` must hold fractions in (0, 1) (0.5 = half the weights pruned), got {sparsity!r}"
            )
    if len(set(sparsities)) != len(sparsities):
        raise ArgumentError("sparsities", f"`sparsities` lists a value twice: {list(sparsities)}; give each once")
    return tuple(sorted(float(s) for s in sparsities))


def _check_batches(batches: Any, model: nn.Module) -> List[Any]:
    from lightning.fabric.utilities.apply_func import move_data_to_device

    if isinstance(batches, (Tensor, Mapping, str)) or not isinstance(batches, Iterable):
        raise ArgumentError(
            "batches", f"`batches` must be an iterable of batches (a list, or itertools.islice(loader, 8)), got {type(batches).__name__}"
        )
    held = list(batches)
    if not held:
        raise ArgumentError("batches", "`batches` is empty: pass a few validation batches, e.g. list(itertools.islice(loader, 8))")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return [move_data_to_device(batch, device) for batch in held]


def _check_layers(layers: Mapping[str, nn.Module], specs: Mapping[int, QuantSpec], prune: bool) -> None:
    """Every layer is checked before any is touched."""
    for key, layer in layers.items():
        param = weight_param(key, layer)
        for spec in specs.values():
            check_divisible(key, layer._parameters[param], spec, one_grid=True)
        for stage, needed in ((Stage.FAKE_QUANT, bool(specs)), (Stage.MASK, prune)):
            if needed and get_weight_transform(layer, stage, param) is not None:
                raise ValueError(
                    f"layer {key!r} already has a {stage.name} stage (a QAT or pruning callback set it up);"
                    " measure sensitivity on the float model, before compression, or `exclude` the layer"
                )


def _silence_logging(model: nn.Module) -> Dict[nn.Module, Dict[str, Any]]:
    """``self.log``/``self.log_dict`` of every LightningModule under ``model`` do nothing
    (outside a Trainer loop they warn or raise); returns what to put back."""
    import lightning.pytorch as pl

    saved: Dict[nn.Module, Dict[str, Any]] = {}
    for module in model.modules():
        if isinstance(module, pl.LightningModule):
            saved[module] = {name: module.__dict__[name] for name in ("log", "log_dict") if name in module.__dict__}
            module.__dict__["log"] = module.__dict__["log_dict"] = _ignore
    return saved


def _restore_logging(saved: Mapping[nn.Module, Dict[str, Any]]) -> None:
    for module, attributes in saved.items():
        for name in ("log", "log_dict"):
            module.__dict__.pop(name, None)
        module.__dict__.update(attributes)


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None
