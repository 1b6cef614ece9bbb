"""Where an export's checks compute: the CPU, for a model trained on an accelerator."""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Iterator

from torch import nn

from lightning_compress.core.sharding import has_collective_forward


@contextmanager
def on_the_cpu(model: nn.Module) -> Iterator[bool]:
    """``model`` on the CPU inside the block, then back on its device; yields whether it
    moved. A sharded model (FSDP2, DTensor) and one on the CPU or the meta device stay.

    Why: what the export writes is checked on the CPU, where onnxruntime, llama.cpp's
    reader and the packed files' CPU kernels run, and where Lightning (2.6) has already
    moved the model when ``on_fit_end`` exports it. A check that packs on a GPU and
    recomputes on the CPU disagrees in the last bit (transcendental functions, cuDNN's
    TF32 kernels), and a weight or activation on a rounding boundary then moves a whole
    step. The dry export before training runs here too, as the final export will.
    """
    devices = {t.device for t in itertools.chain(model.parameters(), model.buffers())}
    # One accelerator only: a model split over devices (offloaded parts, a device map), on
    # the CPU or partly on the meta device stays where it is.
    if len(devices) != 1 or next(iter(devices)).type in ("cpu", "meta") or has_collective_forward(model):
        yield False
        return
    device = devices.pop()
    try:
        model.cpu()
        yield True
    finally:
        model.to(device)


__all__ = ["on_the_cpu"]
