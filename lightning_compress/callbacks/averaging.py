"""Lightning's weight averaging callbacks beside LoRA: the combinations that cannot train,
refused before LoRA touches the model, and the stale copy a merge leaves behind.

Lightning's ``WeightAveraging`` (``EMAWeightAveraging``) and ``StochasticWeightAveraging``
copy the model in their own ``setup`` (``copy.deepcopy``) and then pair the copy's
parameters with the model's by position:

- ``WeightAveraging`` copies only when fitting, after calling ``configure_model`` itself
  (which runs LoRA's injection where LoRA waits for it), and swaps the copy in at every
  validation, even after the fit;
- ``StochasticWeightAveraging`` copies in every stage, before ``configure_model``, and
  loads the average a checkpoint holds into its copy in every stage.

QAT, pruning and distillation leave the model's parameters as they are, so they stack
with either in any order. LoRA adds parameters, so the copy must be made after its
adapters exist; its NF4 base cannot be averaged; and the copy goes into every checkpoint
whole, so the checkpoint cannot hold only the adapters.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from lightning.pytorch.callbacks import StochasticWeightAveraging, WeightAveraging
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_compress.callbacks.compatibility import IncompatibleSettings
from lightning_compress.core.targeting import weight_name
from lightning_compress.core.transforms import raw_weight
from lightning_compress.lora.adapter import adapter_of

AVERAGING = (WeightAveraging, StochasticWeightAveraging)

# torchao's NF4Tensor defaults: blocks of 64 weights, their scales quantized in blocks of
# 256, so a weight it quantizes with them must hold a multiple of 64 * 256
NF4_DEFAULT_BLOCKS = 64 * 256


def _position(callbacks: list, lora: Any) -> int:
    return next((i for i, cb in enumerate(callbacks) if cb is lora), len(callbacks))


def _stale_copy(callback: Any, kinds: tuple, shapes: list) -> Any:
    """``callback``'s copy of the model (Lightning 2.6 names it ``_average_model``) if it is
    one of ``kinds`` and the copy's parameters no longer pair with ``shapes``, else ``None``."""
    average = getattr(callback, "_average_model", None) if isinstance(callback, kinds) else None
    return None if average is None or [p.shape for p in average.parameters()] == shapes else average


def check_weight_averaging(trainer: Any, lora: Any, pl_module: nn.Module, stage: str, *, in_place: bool,
                           deferred: bool, injects: bool) -> None:
    """From LoRA's ``setup``, before it adds its adapters: refuse an averaging callback
    that cannot copy or average the model LoRA adapts. ``in_place``: LoRA's adapters are on
    the model already, from an earlier fit; ``deferred``: LoRA adds them after the module's
    ``configure_model``; ``injects``: LoRA puts adapters on the model in this stage (not a
    merged model it evaluates as it is).

    Raises:
        IncompatibleSettings: naming the two callbacks, their positions and the fix.
    """
    callbacks = list(trainer.callbacks)
    here = _position(callbacks, lora)
    layers = lora.selected_layers(pl_module) or {}
    # Adapters another LoRA callback left on these layers are taken over, not added; layers
    # a deferred LoRA adapts may not exist before `configure_model`.
    adds = not in_place and (any(adapter_of(layer) is None for layer in layers.values()) or (deferred and not layers))
    for index, found in enumerate(callbacks):
        if not isinstance(found, AVERAGING):
            continue
        swa = isinstance(found, StochasticWeightAveraging)
        name = type(found).__name__
        named = f"Lightning's {name} (callbacks[{index}])"
        if stage != "fit" and swa and index > here and lora.config.base == "nf4" and (in_place or injects):
            odd = [layer_name for layer_name, layer in layers.items()
                   if math.prod(raw_weight(layer, weight_name(layer)).shape) % NF4_DEFAULT_BLOCKS]
            if odd:
                raise IncompatibleSettings(
                    f"{named} copies the model in every stage, and after LoRA(base='nf4') (callbacks[{here}]) the copy"
                    f" holds the NF4 bases of {odd[:3]}, which torchao's deepcopy quantizes again with its default"
                    f" blocks ({NF4_DEFAULT_BLOCKS} weights a group of scales), which do not divide them. Leave"
                    f" {name} out of the Trainer that evaluates this model: it averages nothing outside fit")
        if stage == "fit" and lora.config.base == "nf4":
            raise IncompatibleSettings(
                f"LoRA(base='nf4') (callbacks[{here}]) cannot train with {named}: it cannot average torchao's NF4"
                " base weights (copy.deepcopy quantizes them again with the default block sizes, and NF4 tensors"
                " have no arithmetic for the average's update). Remove the weight averaging callback, or use"
                " LoRA(base='float')")
        # Otherwise its copy holds the adapters, or pairs nothing with the model before a load (see below).
        if stage == "fit" and adds and swa and deferred:
            raise IncompatibleSettings(
                f"{named} copies the model in its setup, before `configure_model` (which this module overrides),"
                f" and LoRA (callbacks[{here}]) adds its adapters after `configure_model`, so in any order the copy"
                " would lack them and pair the model's parameters with others. Use Lightning's WeightAveraging()"
                " (an equal average of every step's weights) or EMAWeightAveraging, listed after LoRA: they call"
                " `configure_model` before they copy")
        if stage == "fit" and adds and index < here:
            raise IncompatibleSettings(
                f"{named} copies the model in its setup, before LoRA (callbacks[{here}]) adds its adapters in its own,"
                " and then pairs the two models' parameters by position, so the adapters would be averaged with (or"
                f" loaded into) other parameters. List LoRA before {name} (callbacks a LightningModule returns from"
                f" `configure_callbacks` come after the Trainer's: return {name} from there too, after LoRA)")
        if stage == "fit" and lora.adapter_only_checkpoints:
            why = ("so the checkpoint holds the frozen weights anyway" if swa else
                   "and a resume restores the model from it, which then lacks the frozen weights")
            raise IncompatibleSettings(
                f"LoRA(adapter_only_checkpoints=True) (callbacks[{here}]) cannot keep the frozen weights out of"
                f" checkpoints with {named}: it saves its whole copy of the model (frozen weights included) in every"
                f" checkpoint, {why}. Set adapter_only_checkpoints=False, or remove the weight averaging callback")


def check_averages_to_load(trainer: Any, lora: Any, pl_module: nn.Module, checkpoint: dict) -> None:
    """From LoRA's hook before Lightning loads ``checkpoint``, after LoRA set up, for a
    ``StochasticWeightAveraging`` whose copy (made in its setup, in every stage) lacks the
    adapters while the checkpoint holds an average Lightning will load into it strictly:
    listed after LoRA, it copied a model LoRA had merged, or one whose adapters come after
    ``configure_model``, so it copies the model again, as it meant to; listed before LoRA,
    it is refused.

    Raises:
        IncompatibleSettings: naming the callback and the order that works.
    """
    callbacks = list(trainer.callbacks)
    here = _position(callbacks, lora)
    shapes = [p.shape for p in pl_module.parameters()]
    for index, callback in enumerate(callbacks):
        saved = checkpoint.get("callbacks", {}).get(callback.state_key) or {}
        if saved.get("average_model_state") is None or _stale_copy(callback, (StochasticWeightAveraging,), shapes) is None:
            continue
        if index < here:
            raise IncompatibleSettings(
                f"Lightning's StochasticWeightAveraging (callbacks[{index}]) copied the model in its setup, before LoRA"
                f" (callbacks[{here}]) added its adapters, so it cannot load the average this checkpoint holds into"
                " its copy. List LoRA before StochasticWeightAveraging")
        callback._average_model = copy.deepcopy(pl_module)  # what its setup copies, now with the adapters


def drop_stale_averages(trainer: Any, pl_module: nn.Module, *, copy_swa: bool = False) -> None:
    """Outside fit, or once LoRA merged its adapters: forget a ``WeightAveraging`` copy
    whose parameters no longer pair with the model's. The average was copied into the
    model at the end of the fit that made it; swapping the stale copy in at each validation
    would put other tensors in the adapters' places, or fail on their shapes, and a
    checkpoint saved now would hold it. With ``copy_swa``, a ``StochasticWeightAveraging``
    copy copies the model again, as its setup would."""
    shapes = [p.shape for p in pl_module.parameters()]
    for callback in trainer.callbacks:
        if _stale_copy(callback, AVERAGING, shapes) is None:
            continue
        if isinstance(callback, StochasticWeightAveraging):
            if copy_swa:
                callback._average_model = copy.deepcopy(pl_module)
            continue
        callback._average_model = None
        rank_zero_info(f"{type(callback).__name__}: its copy from the last fit no longer matches the model's"
                       " parameters (merged LoRA adapters, or another model), so validation uses the model as it is")


__all__ = ["check_averages_to_load", "check_weight_averaging", "drop_stale_averages"]
