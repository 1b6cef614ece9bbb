"""Freed memory handed back to the operating system during a streaming pass.

glibc's allocator serves blocks under its mmap threshold (which grows with the blocks
freed, up to 32 MB) from its heap and keeps them resident once freed, for reuse. A pass
that quantizes, packs or compares a model one layer at a time frees such blocks by the
hundred, of sizes that do not fit the next layer's, and what stays resident adds to its
peak: ``load_packed`` of a 134M LLaMA peaked at 1.65x what the loaded model holds, and
kept it, where 1.03x was alive (measured as ``benchmarks/export_memory.py``'s worker does,
2026-11-29). ``malloc_trim(0)`` returns the free pages wherever they are in the heap. It
is not free: pages handed back are faulted in again when reused (that load took 3.0 s with
a trim after every layer, 1.9 s with none), so :class:`ReleasePacer` trims once per 16 MB
of layers (1.9 s, peak 1.25x). Other C libraries (musl, macOS, Windows) return memory
their own way: nothing is done there.
"""

from __future__ import annotations

import ctypes
import os
from typing import Callable, Optional

import torch
from torch import nn

_UNSET = object()
_trim: object = _UNSET


def _malloc_trim() -> Optional[Callable[[int], int]]:
    global _trim
    if _trim is _UNSET:
        _trim = None
        if os.name == "posix":  # ctypes.CDLL(None) is the process itself only there
            try:
                function = ctypes.CDLL(None).malloc_trim
                function.argtypes, function.restype = [ctypes.c_size_t], ctypes.c_int
                _trim = function
            except (AttributeError, OSError, TypeError):  # not glibc
                pass
    return _trim  # type: ignore[return-value]


def release_freed_memory() -> bool:
    """Return the allocator's free heap pages to the operating system (glibc's
    ``malloc_trim(0)``); ``False`` where the C library has no such call. Live memory is
    untouched: this only lowers what freed blocks keep resident."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


TRAINING_RELEASE_BYTES = 64 << 20
"""The least a training step's one-off temporaries (a mask update's keep-masks, a teacher's
forward) must weigh for :func:`release_after` to trim: the pages handed back include the
step's own activations, which the next step faults in again. Trimming after every step
of a 4.7M-weight MLP at 2048 tokens cost 23% of its step time (benchmarks/pruning_overhead.py,
1.30x against 1.07x without); on a 134M LLaMA it lowered pruning's peak by about 0.1x of
the model and the teacher's by 0.2x."""


def release_after(nbytes: int, device: torch.device) -> bool:
    """:func:`release_freed_memory` when work on ``device`` freed about ``nbytes`` of host
    memory (as the caller counts them), at least :data:`TRAINING_RELEASE_BYTES`; ``False``
    when it did not trim (work on an accelerator frees its memory, not the heap's)."""
    return device.type == "cpu" and nbytes >= TRAINING_RELEASE_BYTES and release_freed_memory()


def parameter_bytes(module: nn.Module) -> int:
    """What ``module``'s parameters hold, in bytes."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


class ReleasePacer:
    """Calls :func:`release_freed_memory` once the temporaries of the work done since the
    last call add up to ``every`` bytes (as the caller counts them: a layer's float size),
    so that freed blocks never keep more than about that much resident."""

    def __init__(self, every: int = 16 << 20) -> None:
        self.every = every
        self.pending = 0

    def done(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending >= self.every:
            self.pending = 0
            release_freed_memory()


EFFECTIVE_WEIGHT_RELEASE_BYTES = 512 << 20
"""How many bytes of effective weights (the weight-transform stack's outputs, made at each
forward and again in the backward) may be freed between two trims. A transformed layer's
effective weight is a short-lived block of its weight's size; once glibc has raised its
mmap threshold past it (a 16 MiB attention projection does), each one comes from the heap,
the step's activations split it, and the next layer's does not fit. On a 134M LLaMA
(benchmarks/training_memory.py, 2026-11-30) that kept pruning's peak at +0.11x the float
model over plain training (medians of four runs) where +0.03x was alive; trimming once per
512 MiB made it +0.00x and -0.04x (QAT +0.09x, was +0.20x) for 4% of pruning's step
time there (256 MiB: -0.2x, 8%). A small model's steps rarely reach a trim."""

_EFFECTIVE_WEIGHTS = ReleasePacer(EFFECTIVE_WEIGHT_RELEASE_BYTES)


def effective_weight_made(weight: torch.Tensor) -> None:
    """Count a new effective weight (freed after its use) toward the next trim; host
    memory only (an accelerator's allocator keeps its own). Not while ``torch.compile``
    traces: a compiled graph would guard on the count (recompiling at every call) and
    cannot call into the C library."""
    if torch.compiler.is_compiling():
        return
    if weight.device.type == "cpu":
        _EFFECTIVE_WEIGHTS.done(weight.numel() * weight.element_size())
