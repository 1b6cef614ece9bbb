"""Effective weights recomputed in the backward pass instead of kept for it.

A layer computes with its effective weight (``fake_quant(mask ⊙ (W + s·B·A))``), and the
layer's own op (``F.linear``, a convolution) saves that weight for its backward: a second
full-size copy of every transformed weight, alive from the forward to the backward (1x
the targeted weights' size for QAT or pruning). As activation checkpointing does for
activations, the forward of a transformed layer runs under saved-tensor hooks that store,
in place of its effective weights, how to compute them again from the raw parameters,
which are kept anyway; the backward recomputes each one (the stack has no randomness and
its parameters do not change before the optimizer step) and frees it after use.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch
from torch import Tensor, nn

Stack = Callable[[nn.Module, str, Tensor], Tensor]  # (layer, slot, raw) -> effective weight
_Entry = Tuple[Tensor, nn.Module, str, Tensor, int, Stack]
_RECORDS: List[Dict[int, _Entry]] = []  # one per recording forward running


_CHECKS_RUNNING = [0]  # export checks (dry export, parity, the ONNX trace) under way


def in_backward() -> bool:
    """Whether this runs inside a backward pass: a forward run there is activation
    checkpointing recomputing one (counted once already, even the reentrant kind's, which
    first ran under no_grad), which statistics of the training forwards must not count twice."""
    if torch.compiler.is_compiling():  # not traceable; a compiled graph's recompute is its own
        return False
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


@contextlib.contextmanager
def export_checks() -> Iterator[None]:
    """Forwards that check an export (the dry export before the first step, the parity
    check, the ONNX trace), which may run inside a training batch: not training forwards."""
    _CHECKS_RUNNING[0] += 1
    try:
        yield
    finally:
        _CHECKS_RUNNING[0] -= 1


def counts_as_training_forward() -> bool:
    """Whether a forward now may add to statistics of the training forwards (a static
    observer's range, a calibrated start's inputs, wanda's input norms): not a recompute
    inside the backward (:func:`in_backward`), not an export's check (:func:`export_checks`)."""
    return not _CHECKS_RUNNING[0] and not in_backward()


def note_effective(layer: nn.Module, slot: str, raw: Tensor, effective: Tensor, stack: Stack) -> None:
    """Called with each effective weight ``stack`` computed from ``raw``: inside a forward
    that records, it is saved as a recipe rather than as a tensor."""
    if _RECORDS and effective is not raw and effective.requires_grad:
        root = effective if effective._base is None else effective._base
        _RECORDS[-1][id(root)] = (root, layer, slot, raw, raw._version, stack)


@contextlib.contextmanager
def recomputed_weights() -> Iterator[None]:
    """Run a transformed layer's forward so that its effective weights are recomputed in
    the backward pass rather than saved (no effect without autograd)."""
    if not torch.is_grad_enabled() or _RECORDS or _other_hooks_active():
        # Inside another transformed layer's forward, that one's hooks record this layer's
        # weights too. Under activation checkpointing (or anyone's saved-tensor hooks)
        # those hooks already decide what is kept: ours would take precedence over them
        # for everything this layer saves, its inputs included.
        yield
        return
    record: Dict[int, _Entry] = {}

    def pack(tensor: Tensor) -> Any:
        root = tensor if tensor._base is None else tensor._base
        entry = record.get(id(root))
        if entry is None or entry[0] is not root:
            return tensor
        return _Recipe(*entry[1:], saved=tensor, root=root)

    _RECORDS.append(record)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            yield
    finally:
        _RECORDS.pop()
        record.clear()


class _Recipe:
    """How to compute a saved effective weight (or a view of it) again."""

    def __init__(self, layer: nn.Module, slot: str, raw: Tensor, version: int, stack: Stack, *, saved: Tensor,
                 root: Tensor) -> None:
        self.layer, self.slot, self.raw, self.version, self.stack = layer, slot, raw, version, stack
        self.size, self.stride = saved.size(), saved.stride()
        self.offset = saved.storage_offset() - root.storage_offset()
        self.is_root = saved is root

    def __call__(self) -> Tensor:
        raw = self.layer._parameters[self.slot]
        # Autograd refuses a saved tensor changed in place since the forward; so do we. (A
        # parameter FSDP2 gathered again for the backward is another tensor: not checked.)
        if raw is self.raw and raw._version != self.version:
            raise RuntimeError(
                f"the `{self.slot}` of a {type(self.layer).__name__} was modified in place between the forward"
                " and the backward pass; its effective weight cannot be recomputed for the gradient"
            )
        with torch.no_grad():
            weight = self.stack(self.layer, self.slot, raw)
        if self.is_root and weight._base is None:
            return weight
        root = weight if weight._base is None else weight._base
        return root.as_strided(self.size, self.stride, root.storage_offset() + self.offset)


def _other_hooks_active() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


def _unpack(saved: Any) -> Tensor:
    return saved() if isinstance(saved, _Recipe) else saved
