"""The export check's first step: every packed weight read back (one at a time) and
compared bit for bit with the model's effective weight (its fake-quantized value)."""

from __future__ import annotations

from typing import List, Mapping

import torch
from torch import Tensor, nn

from lightning_compress.core.memory import ReleasePacer
from lightning_compress.core.targeting import module_name
from lightning_compress.core.transforms import weight_slots
from lightning_compress.formats.blocks import dequantizes_to
from lightning_compress.formats.packed import PackedModel


def weight_mismatches(model: nn.Module, packed: PackedModel) -> List[str]:
    """Keys whose packed value differs from the model's; one layer read (and its effective
    weight computed) at a time."""
    bad, pacer = [], ReleasePacer()
    for key, layer in packed.layers.items():
        # The last layer's temporaries are handed back before this one's effective weight
        # (see lightning_compress.core.memory): a vocabulary head's is the check's largest.
        pacer.done(packed.grids[key].float32_bytes)
        trained = getattr(model.get_submodule(module_name(key, layer.param)), layer.param).detach()
        if not dequantizes_to(layer.weight, trained):
            bad.append(key)
        del layer, trained
    state = model.state_dict()
    for key, tensor in packed.tensors.items():
        current = _effective(model, key, state)
        if current is None or not torch.equal(tensor, current.detach().cpu()):
            bad.append(key)
        pacer.done(tensor.numel() * tensor.element_size())
        del tensor, current
    packed.check_complete()
    return bad


def _effective(model: nn.Module, key: str, state: Mapping[str, Tensor]) -> Tensor | None:
    owner, _, leaf = key.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if leaf in weight_slots(module):  # compare the effective weight
        return getattr(module, leaf)
    return state.get(key)


__all__ = ["weight_mismatches"]
