"""Lightning's weight averaging callbacks beside LoRA: the combinations that cannot train,
refused before LoRA touches the model.

Lightning's ``WeightAveraging`` (``EMAWeightAveraging``) and ``StochasticWeightAveraging``
copy the model in their own ``setup`` (``copy.deepcopy``; ``WeightAveraging`` only when
fitting, ``StochasticWeightAveraging`` in every stage) and then pair the copy's parameters
with the model's by position. QAT, pruning and distillation leave the model's parameters
as they are, so they stack with either in any order. LoRA adds parameters, so the copy
must be made after its adapters exist; its NF4 base cannot be copied or averaged; and the
copy goes into every checkpoint whole, so the checkpoint cannot hold only the adapters.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import StochasticWeightAveraging, WeightAveraging

from lightning_compress.callbacks.compatibility import IncompatibleSettings

AVERAGING = (WeightAveraging, StochasticWeightAveraging)


def check_weight_averaging(trainer: Any, lora: Any, stage: str, *, in_place: bool) -> None:
    """From LoRA's ``setup``, before it adds its adapters: refuse an averaging callback
    that cannot copy or average the model LoRA adapts. ``in_place``: the adapters (and NF4
    bases) are on the model already, from an earlier fit, so any copy holds them.

    Raises:
        IncompatibleSettings: naming the two callbacks, their positions and the fix.
    """
    callbacks = list(trainer.callbacks)
    here = next((i for i, cb in enumerate(callbacks) if cb is lora), len(callbacks))
    for index, found in enumerate(callbacks):
        if not isinstance(found, AVERAGING) or not (stage == "fit" or isinstance(found, StochasticWeightAveraging)):
            continue  # no averaging callback, or one that copies nothing in this stage
        name = type(found).__name__
        named = f"Lightning's {name} (callbacks[{index}])"
        copies_the_adapted_model = in_place or index > here
        if lora.config.base == "nf4" and (stage == "fit" or copies_the_adapted_model):
            raise IncompatibleSettings(
                f"LoRA(base='nf4') (callbacks[{here}]) cannot run with {named}: it cannot copy or average torchao's"
                " NF4 base weights (copy.deepcopy quantizes them again with the default block sizes, and NF4 tensors"
                " have no arithmetic for the average's update). Remove the weight averaging callback, or use"
                " LoRA(base='float')")
        if stage != "fit":
            continue
        if not copies_the_adapted_model:
            raise IncompatibleSettings(
                f"{named} copies the model in its setup, before LoRA (callbacks[{here}]) adds its adapters in its own,"
                " and then pairs the two models' parameters by position, so the adapters would be averaged with other"
                f" parameters. Put LoRA before {name} in the Trainer's `callbacks` (callbacks a LightningModule returns"
                f" from `configure_callbacks` come after the Trainer's: return {name} from there too, after LoRA)")
        if lora.adapter_only_checkpoints:
            raise IncompatibleSettings(
                f"LoRA(adapter_only_checkpoints=True) (callbacks[{here}]) cannot keep the frozen weights out of"
                f" checkpoints with {named}, which saves its whole copy of the model (frozen weights included) in"
                " every checkpoint, and a resume would restore the model from it. Set adapter_only_checkpoints=False,"
                " or remove the weight averaging callback")


__all__ = ["AVERAGING", "check_weight_averaging"]
