"""What a LoRA callback checks in a checkpoint's LoRA state before Lightning loads it."""

from __future__ import annotations

from typing import Any, Dict, Mapping

from torch import nn

from lightning_compress.lora.config import LoRAConfig


def check_checkpoint_adapters(state: Mapping[str, Any], config: LoRAConfig, adapters: Dict[str, Any],
                              module: nn.Module | None) -> None:
    """Refuse a checkpoint whose adapters this callback cannot take: another rank,
    scaling or base, other layers, or another model's layers.

    Raises:
        ValueError: naming the setting and the fix.
    """
    for key, argument, mine in (("r", "r", config.r), ("scaling", "lora_alpha/use_rslora", config.scaling),
                                ("base", "base", config.base)):
        if state[key] != mine:
            raise ValueError(f"the checkpoint's LoRA adapters have {key}={state[key]!r} but this callback has"
                             f" {key}={mine!r}; resume with the same `{argument}`")
    if adapters and state["layers"] and state["layers"] != list(adapters):
        known = {name for name, _ in module.named_modules()} if module is not None else set()
        if known.issuperset(adapters) and known.isdisjoint(state["layers"]):  # another model's checkpoint
            raise ValueError(f"the checkpoint's LoRA adapters sit on {state['layers'][:3]}..., none of which this"
                             " model has: the checkpoint is from another model; resume from one of this model")
        raise ValueError(f"the checkpoint's LoRA adapters sit on {state['layers']}, this callback adapts"
                         f" {list(adapters)}; resume with the same `target_modules` and `exclude_modules`")


def check_merged_reload(state: Mapping[str, Any]) -> None:
    """Before a model whose adapters were merged takes fresh ones for a checkpoint written
    before the merge: the frozen weights that checkpoint leaves out (``adapter_only_checkpoints``,
    an NF4 base) would have to come from the model, whose weights now hold the merged adapters.

    Raises:
        ValueError: naming why and the two ways to evaluate the checkpoint.
    """
    if state.get("dropped_keys"):
        raise ValueError(
            "this model's LoRA adapters are merged into its weights, and the checkpoint leaves the frozen weights out"
            " (adapter_only_checkpoints=True, or an NF4 base), so they cannot be rebuilt from this model: evaluate"
            " the checkpoint with a model built anew from the same pretrained weights, or before merging")


__all__ = ["check_checkpoint_adapters", "check_merged_reload"]
