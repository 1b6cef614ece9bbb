"""What a LoRA callback checks in a checkpoint's LoRA state before Lightning loads it."""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from torch import nn

from lightning_compress.core.sharding import full
from lightning_compress.quant.nf4 import tensor_digest

from lightning_compress.lora.config import LoRAConfig


def check_checkpoint_adapters(state: Mapping[str, Any], config: LoRAConfig, adapters: Dict[str, Any],
                              module: nn.Module | None) -> None:
    """Refuse a checkpoint whose adapters this callback cannot take: another rank,
    scaling or base, other layers, or another model's layers. ``adapters``: those this
    callback holds now (none: only the settings are compared).

    Raises:
        ValueError: naming the setting and the fix.
    """
    for key, argument, mine in (("r", "r", config.r), ("scaling", "lora_alpha/use_rslora", config.scaling),
                                ("base", "base", config.base)):
        if state[key] != mine and state["layers"]:  # a checkpoint without adapters (merged) fits any
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


def check_merged_resume(state: Optional[Mapping[str, Any]], stage: Any) -> None:
    """Refuse to resume a fit from the checkpoint of a model whose adapters were merged
    after training: it holds no adapters to train on, and its optimizer state is theirs.

    Raises:
        ValueError: naming how to train on from those weights.
    """
    if stage == "fit" and state and not state.get("layers") and state.get("merged"):
        raise ValueError(
            f"this checkpoint was saved after LoRA merged its adapters (into {state['merged'][:3]}), so there is no"
            " LoRA training to resume from it (its optimizer state is that of the merged adapters): load its weights"
            " into the model (`model.load_state_dict(torch.load(path, weights_only=True)['state_dict'])`) and start"
            " a new fit without `ckpt_path`")


def weights_fingerprint(module: nn.Module, keys: Sequence[str]) -> str:
    """SHA-256 of ``module``'s weights ``keys`` (an NF4 weight's codes and scales): what
    proves on resume that the frozen weights a checkpoint leaves out are the same."""
    digest = hashlib.sha256()
    named = module.state_dict(keep_vars=True)
    for key in keys:
        digest.update(key.encode())
        tensor_digest(digest, full(named[key]))  # FSDP2: the whole base, as one process digests it
    return digest.hexdigest()


def wrap_on_load_checkpoint(pl_module: nn.Module, check: Callable[[dict], None],
                            before_load: Callable[[dict], None]) -> None:
    """Make the instance's ``on_load_checkpoint(checkpoint)`` run the class's, then every
    LoRA callback's ``check(checkpoint)``, then each one's ``before_load(checkpoint)``:
    Lightning calls it right before it loads the weights (callback hooks run only after),
    looking it up on the instance; a refusal comes before any callback changed the model.
    Wrapped once; the hooks are kept on the wrapper (a function, which ``copy.deepcopy``
    shares rather than copying the callbacks along with a model)."""
    wrapper = vars(pl_module).get("on_load_checkpoint")
    if wrapper is None:
        own = pl_module.on_load_checkpoint

        def wrapper(checkpoint):
            own(checkpoint)
            for phase in (0, 1):
                for hooks in list(wrapper.lora_hooks):
                    hooks[phase](checkpoint)

        wrapper.lora_hooks = []
        pl_module.on_load_checkpoint = wrapper
    if (check, before_load) not in getattr(wrapper, "lora_hooks", [(check, before_load)]):
        wrapper.lora_hooks.append((check, before_load))


__all__ = ["check_checkpoint_adapters", "check_merged_reload", "check_merged_resume", "weights_fingerprint",
           "wrap_on_load_checkpoint"]
