"""What a layer's fake quantizers hold between runs.

One layer's entry of ``QuantizationAwareTraining``'s checkpoint state is read from its
weight quantizer (and static input observer) and loaded back into new ones. The same
entries let a new QAT callback take over the quantizers an earlier Trainer's callback
left on a model: ``Trainer(callbacks=[QuantizationAwareTraining(...)]).validate(model)``
after ``fit`` must measure the trained grid, not replace it with a new one that is off
until training starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Tuple

import torch
from torch import nn

from lightning_compress.core.notes import first_four
from lightning_compress.core.targeting import weight_param
from lightning_compress.core.transforms import Stage, get_weight_transform
from lightning_compress.quant.activations import DynamicTokenQuantizer, StaticRangeObserver, input_quantizer_of
from lightning_compress.quant.spec import QuantSpec
from lightning_compress.quant.weights import WeightFakeQuantizer

Held = Tuple[WeightFakeQuantizer, Any]  # a layer's weight quantizer and its input quantizer (or None)


def quantizer_entry(quantizer: WeightFakeQuantizer, inputs: Any = None) -> Dict[str, Any]:
    """One layer's checkpoint entry: its grid, whether it is on, its chosen ranges (mse
    clips, a calibrated start's grid, learned scales) and a static observer's range."""
    entry: Dict[str, Any] = {"spec": quantizer.spec.describe(), "enabled": quantizer.enabled,
                             "weight_range": quantizer.weight_range}
    if quantizer.clip is not None:
        entry["clip"] = quantizer.clip.cpu().clone()
    if quantizer.grid is not None:
        entry["grid"] = [t.cpu().clone() for t in quantizer.grid]
    if quantizer.learned:
        entry["log_scale"] = quantizer.log_scale.detach().cpu().clone()
        entry["zero_point"] = quantizer.zero_point.cpu().clone()
        entry["initialized"] = quantizer.initialized
    if isinstance(inputs, StaticRangeObserver):
        entry["observer"] = {key: value.clone() if isinstance(value, torch.Tensor) else value
                             for key, value in inputs.state_dict().items()}
    return entry


def load_entry(quantizer: WeightFakeQuantizer, inputs: Any, entry: Mapping[str, Any]) -> None:
    """Set ``quantizer`` (and the layer's input quantizer ``inputs``) to what ``entry``
    (:func:`quantizer_entry`'s) holds; the grids must be the same (checked by the caller)."""
    quantizer.enabled = entry["enabled"]
    quantizer.clip = entry.get("clip")
    grid = entry.get("grid")
    quantizer.grid = None if grid is None else (grid[0].float(), grid[1].to(torch.int32))
    if quantizer.learned and "log_scale" in entry:
        with torch.no_grad():
            quantizer.log_scale.copy_(entry["log_scale"])
        quantizer.zero_point = entry["zero_point"].to(quantizer.log_scale.device)
        quantizer.initialized = entry["initialized"]
    if inputs is not None:
        inputs.enabled = entry["enabled"]
        if isinstance(inputs, StaticRangeObserver) and "observer" in entry:
            inputs.load_state_dict(entry["observer"])


def held_quantizers(layers: Mapping[str, nn.Module], active_owners: set) -> Dict[str, Held]:
    """``{name: (weight quantizer, input quantizer)}`` of the ``layers`` that hold fake
    quantization from outside ``active_owners``: an earlier Trainer's QAT callback, or
    :func:`~lightning_compress.round_to_nearest`."""
    held = {}
    for name, layer in layers.items():
        quantizer = get_weight_transform(layer, Stage.FAKE_QUANT, weight_param(name, layer))
        if isinstance(quantizer, WeightFakeQuantizer) and getattr(quantizer, "owner", None) not in active_owners:
            held[name] = (quantizer, input_quantizer_of(layer))
    return held


def held_differences(held: Mapping[str, Held], specs: Mapping[str, QuantSpec], *, learned: bool, weight_range: str,
                     activations: Mapping[str, str | None], observer: str) -> List[str]:
    """How the ``held`` quantizers differ from those a callback with these settings would
    attach (``specs``: its grid per layer; ``activations``: its input quantization per
    layer, ``None`` where it puts none); at most four named, then a count."""
    differences = []
    for name, (quantizer, inputs) in held.items():
        held_activations = (None if inputs is None else "int8_dynamic" if isinstance(inputs, DynamicTokenQuantizer)
                            else "int8_static")
        settings = [("grid", quantizer.spec.describe(), specs[name].describe()),
                    ("learn_ranges", quantizer.learned, learned),
                    ("weight_range", quantizer.weight_range, weight_range),
                    ("activations", held_activations, activations[name])]
        if isinstance(inputs, StaticRangeObserver) and activations[name] == "int8_static":
            settings.append(("observer", inputs.kind, observer))
        differences += [f"layer {name!r} has {setting} {theirs!r}, this callback {mine!r}"
                        for setting, theirs, mine in settings if theirs != mine]
    return first_four(differences)


@dataclass
class TakeOver:
    """What a new QAT callback does with the quantizers ``layers`` hold (:func:`take_over`):
    ``entries`` to go on with; and ``refusal``, for an evaluation that cannot go on with
    them, the error to raise unless a checkpoint gives the callback's grid (known only
    when its state is loaded, after setup)."""

    entries: Dict[str, Dict[str, Any]]
    refusal: str | None = None


def take_over(layers: Mapping[str, nn.Module], specs: Mapping[str, QuantSpec], active_owners: set, *, stage: str,
              calibrated: bool, learned: bool, weight_range: str, activations: str | None, observer: str) -> TakeOver:
    """What a new QAT callback with these settings does with the quantizers ``layers``
    hold from outside ``active_owners`` (an earlier Trainer's QAT, or ``round_to_nearest``):
    goes on with all of them where their settings are its own (with a calibrated start,
    ``calibrated``, applied once already, only when they cover every layer); otherwise
    with none: a ``fit`` starts a new stage, and an evaluation (``stage`` other than
    ``"fit"``), which would put a grid on those layers that is off until training starts
    and measure them in float, is refused unless a checkpoint gives the grid (``refusal``).
    """
    held = held_quantizers(layers, active_owners)
    inputs = {name: None if isinstance(layer, (nn.Embedding, nn.RNNBase)) else activations  # weight-only there
              for name, layer in layers.items()}
    differences = held_differences(held, specs, learned=learned, weight_range=weight_range, activations=inputs,
                                   observer=observer)
    unheld = [name for name in layers if name not in held]
    going_on = not differences and not (calibrated and unheld)
    entries = {name: quantizer_entry(*pair) for name, pair in held.items()} if going_on else {}
    # An attention layer's q/k/v weights share one input quantizer: one of them quantized
    # before holds the layer's input range, which this callback would replace.
    shared = [inputs for name in unheld if (inputs := input_quantizer_of(layers[name])) is not None
              and getattr(inputs, "owner", None) not in active_owners]
    if not (held or shared) or stage == "fit" or not (differences or unheld):
        return TakeOver(entries)
    owners = {getattr(quantizer, "owner", None) for quantizer, _ in held.values()} | {q.owner for q in shared}
    source = "round_to_nearest" if owners == {"round_to_nearest"} else "an earlier QuantizationAwareTraining"
    problems = differences + ([f"{', '.join(first_four([repr(name) for name in unheld]))} hold none"] if unheld else [])
    return TakeOver(entries, (
        f"the model holds fake quantization from {source}: {'; '.join(problems)}. This callback would put a new"
        f" grid on those layers, off until training starts, so the {stage} would measure them in float; {stage}"
        " with the settings the model was quantized with and the same targets, from a checkpoint (`ckpt_path`), or"
        " with no QuantizationAwareTraining callback (its fake quantization stays on the model)"
    ))


def grid_differences(entries: Mapping[str, Mapping[str, Any]], specs: Mapping[str, QuantSpec],
                     weight_range: str) -> List[str]:
    """How a checkpoint's QAT ``entries`` (``{layer: entry}``) of the layers in ``specs``
    differ from the grid a callback puts on them: another grid, or ``weight_range``
    (checkpoints older than it: min/max); at most four named, then a count."""
    differences = []
    for name, entry in entries.items():
        if name not in specs:
            continue  # (an entry for a layer not targeted is the caller's to name)
        if entry.get("spec") != specs[name].describe():
            differences.append(f"layer {name!r} was trained with {entry.get('spec')} but this callback quantizes it"
                               f" as {specs[name].describe()}")
        trained_range = entry.get("weight_range", "minmax")
        if trained_range != weight_range:
            differences.append(f"layer {name!r} was trained with weight_range={trained_range!r} but this callback"
                               f" uses weight_range={weight_range!r}")
    return first_four(differences)


def checkpoint_misfit(entries: Mapping[str, Mapping[str, Any]], specs: Mapping[str, QuantSpec],
                      weight_range: str) -> List[str]:
    """:func:`grid_differences`, and the layers of ``specs`` the checkpoint holds no entry
    for, or entries for layers not in ``specs``: what keeps a checkpoint from giving the
    grid; at most four named, then a count."""
    problems = [f"the checkpoint holds no QAT state for {name!r}" for name in specs if name not in entries]
    problems += [f"the checkpoint holds QAT state for {name!r}, which this callback does not target"
                 for name in entries if name not in specs]
    return first_four(problems + grid_differences(entries, specs, weight_range))


__all__ = ["TakeOver", "quantizer_entry", "load_entry", "held_quantizers", "held_differences", "take_over",
           "checkpoint_misfit", "grid_differences"]
