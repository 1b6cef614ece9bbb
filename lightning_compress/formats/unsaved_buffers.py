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
from lightning_compress.formats.safetensors_stream import tensor_bytes


def unsaved_buffer_digests(model: nn.Module) -> Dict[str, List]:
    """``{buffer name: [dtype, shape, SHA-256 of its bytes]}`` for each buffer of ``model``
    registered with ``persistent=False``: plain dense tensors only (one on the meta
    device, sparse, quantized or sharded (a DTensor) is left out)."""
    digests = {}
    for prefix, module in model.named_modules():
        for name in sorted(module._non_persistent_buffers_set):
            buffer = module._buffers.get(name)
            if type(buffer) is Tensor and buffer.layout == torch.strided and not (buffer.is_quantized or buffer.is_meta):
                digests[f"{prefix}.{name}" if prefix else name] = [str(buffer.dtype), list(buffer.shape), _digest(buffer)]
    return digests


def warn_on_other_unsaved_buffers(model: nn.Module, recorded: Mapping[str, List] | None) -> None:
    """Warn, naming them, when buffers the export recorded (an export without the record:
    nothing to compare) hold other values in ``model``, of the same dtype and shape (a
    cache ``forward`` grows, or a model loaded in another dtype, is not compared)."""
    if not isinstance(recorded, Mapping):
        return
    here = unsaved_buffer_digests(model)
    other = [name for name, entry in recorded.items()
             if name in here and list(entry) != here[name] and list(entry)[:2] == here[name][:2]]
    if other:
        warnings.warn(
            f"buffers the export does not hold (registered with persistent=False) have other values in this model"
            f" than in the model exported: {first_four(other)}, and the loaded model computes with this model's."
            " A constructor that draws them at random draws others when load_packed builds the model from a"
            " function (its parameters, on the meta device, draw no random numbers before them) or when the draw"
            " is not seeded: build the model as the trained one was built (seeded alike) and pass it"
            " (load_packed(dir, MyModel())), or register them with persistent=True, which the export then holds."
            " (A buffer `forward` updates, such as a cache, differs for that reason alone.)",
            UserWarning, stacklevel=3)


def _digest(tensor: Tensor) -> str:
    return hashlib.sha256(tensor_bytes(tensor.to("cpu").contiguous())).hexdigest()
