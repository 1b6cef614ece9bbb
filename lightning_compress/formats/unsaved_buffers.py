"""Buffers a model does not save (``persistent=False``): a digest of each in the export,
so a model whose constructor gives them other values is said to compute otherwise.

Their values come from the model the export is loaded into, not from the file (rotary
frequencies, causal masks: computed, so not saved). A constructor that draws one at random
draws another value when :func:`~lightning_compress.load_packed` builds the model with its
parameters on the meta device, which then consume no random numbers before it: the loaded
model computed otherwise than the trained one, silently, in a new user's trial.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Dict, List, Mapping

import torch
from torch import Tensor, nn

from lightning_compress.core.notes import first_four


def unsaved_buffer_digests(model: nn.Module) -> Dict[str, List[str]]:
    """``{buffer name: [dtype, SHA-256 of its shape and bytes]}`` for each buffer of
    ``model`` registered with ``persistent=False`` (those on the meta device left out)."""
    digests = {}
    for prefix, module in model.named_modules():
        for name in sorted(module._non_persistent_buffers_set):
            buffer = module._buffers.get(name)
            if isinstance(buffer, Tensor) and not buffer.is_meta:
                digests[f"{prefix}.{name}" if prefix else name] = [str(buffer.dtype), _digest(buffer)]
    return digests


def warn_on_other_unsaved_buffers(model: nn.Module, recorded: Mapping[str, List[str]] | None) -> None:
    """Warn, naming them, when buffers the export recorded (an export without the record:
    nothing to compare) hold other values in ``model``, in the same dtype."""
    if not isinstance(recorded, Mapping):
        return
    here = unsaved_buffer_digests(model)
    other = [name for name, entry in recorded.items()
             if name in here and list(entry) != here[name] and here[name][0] == entry[0]]
    if other:
        warnings.warn(
            f"buffers the export does not hold (registered with persistent=False) have other values in this model"
            f" than in the model exported: {first_four(other)}, so it does not compute as the trained model did. They"
            " come from the model's constructor: one drawn at random draws another value when load_packed builds"
            " the model from a function (its parameters, on the meta device, draw no random numbers before it);"
            " pass a model built as the trained one was (load_packed(dir, MyModel())), or save that buffer"
            " (persistent=True)",
            UserWarning, stacklevel=3)


def _digest(tensor: Tensor) -> str:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest = hashlib.sha256(str(tuple(tensor.shape)).encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()
