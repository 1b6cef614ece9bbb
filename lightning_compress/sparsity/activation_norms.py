"""Input-feature norms for activation-aware pruning (Wanda: Sun et al. 2023, "A Simple and
Effective Pruning Approach for Large Language Models").

Wanda ranks weight ``W_ij`` by ``|W_ij| · ‖X_j‖₂``, where ``X_j`` is the ``j``-th input
feature of the layer over the tokens it has seen: a small weight on a feature with large
activations still matters. :class:`InputNorms` collects, for each layer, the sum of
squares of every input feature over the training forwards since the last mask update;
:meth:`InputNorms.scales` turns them into the norms to multiply each weight by. The
scores are non-negative, so the mask functions of :mod:`~lightning_compress.sparsity.masks`
rank ``weight * norms`` exactly as they rank ``|W|·‖X‖``.

Pure torch (``torch.distributed`` for the sum over ranks), no Lightning.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Mapping

import torch
from torch import Tensor, nn

from lightning_compress.core.distributed import all_reduce_sum_
from lightning_compress.core.recompute import counts_as_training_forward
from lightning_compress.core.targeting import weight_param
from lightning_compress.core.transforms import WEIGHT, raw_weight

SCORES = ("magnitude", "wanda")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# What PyTorch makes an nn.MultiheadAttention's `out_proj`: the attention layer reads its
# weight without calling it, so no hook ever sees its input.
_ATTENTION_OUTPUT = nn.modules.linear.NonDynamicallyQuantizableLinear


def wanda_issue(key: str, layer: nn.Module) -> str | None:
    """Why ``score="wanda"`` cannot rank the weight ``key`` of ``layer`` (a message that
    names it and the fix), or ``None``: it needs a layer whose input is a float feature
    matrix it multiplies its ``weight`` by (Linear, Conv)."""
    if isinstance(layer, _ATTENTION_OUTPUT):
        why = ("it is the output projection of an nn.MultiheadAttention, which reads its weight without calling it,"
               " so its inputs are never seen")
    elif isinstance(layer, (nn.Linear, _CONV)) and weight_param(key, layer) == WEIGHT:
        return None
    else:
        why = (f"its input is not a float feature matrix its weight multiplies ({type(layer).__name__}: indices,"
               " attention inputs or recurrent states)")
    return (f"layer {key!r} cannot be ranked with score='wanda' (|weight| times the norm of its input feature): {why};"
            f" add {key!r} to `exclude`, or use score='magnitude'")


def wanda_start_message(start_step: Any) -> str:
    """The refusal of a first mask update at step 0, before any training forward."""
    return (f"`score`='wanda' ranks weights with the activations of the training steps before each mask update, but"
            f" `start_step`={start_step!r} puts the first update at step 0, before any; set `start_step` >= 1 (or"
            " use score='magnitude')")


class InputNorms:
    """Per layer, the sum of squares of each input feature (float32, ``[in_features]``;
    a convolution: one per input channel, summed over the batch and every position, and
    shared by the kernel positions of that channel) over the forwards seen while
    :attr:`collecting`, since the last :meth:`reset`.

    Between :meth:`start_batch` and :meth:`end_batch` (a training batch), a forward hook
    on each layer adds its input into a per-batch buffer (not during the backward pass,
    where activation checkpointing runs forwards again); :meth:`end_batch` adds the
    buffers, summed over the ranks under DDP/FSDP2, into the totals. So every rank holds
    the same totals at every batch end, and a checkpoint (:meth:`state`) written between
    two mask updates resumes them exactly. :meth:`take_scales` reads them for an update
    and starts the next interval from zero.

    Args:
        layers: ``{weight key: layer}``: Linear and Conv layers (see :func:`wanda_issue`).
        warn: how to warn of a layer ranked by older norms (``rank_zero_warn`` under
            Lightning: every rank holds the same totals).
    """

    def __init__(self, layers: Mapping[str, nn.Module], warn: Callable[[str], Any] = warnings.warn) -> None:
        self._layers = dict(layers)
        self._warn = warn
        self._sums = {name: torch.zeros(_width(layer)) for name, layer in self._layers.items()}
        self._previous: Dict[str, Tensor] = {}  # {key: ‖X_j‖₂ of the last update it had statistics for}
        self._pending: Dict[str, Tensor] = {}
        self._handles: List[Any] = []
        self.collecting = False

    def attach(self) -> None:
        """Hook the layers (once) and hold the buffers on their devices."""
        if self._handles:
            return
        for name, layer in self._layers.items():
            device = raw_weight(layer).device
            self._pending[name] = torch.zeros(_width(layer), device=device)
            self._sums[name] = self._sums[name].to(device)
            if name in self._previous:
                self._previous[name] = self._previous[name].to(device)
            self._handles.append(layer.register_forward_hook(self._observer(name), with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()
        self.collecting = False

    def start_batch(self, collect: bool) -> None:
        """Count the forwards from now to :meth:`end_batch` when ``collect``."""
        self.collecting = collect

    def end_batch(self) -> None:
        """Add what this batch's forwards saw (summed over ranks) to the totals. Every rank
        calls it after the same batches (a collective when it collected)."""
        if not self.collecting:
            return
        self.collecting = False
        names = list(self._pending)
        all_reduce_sum_([self._pending[name] for name in names])
        for name in names:
            self._sums[name] += self._pending[name]
            self._pending[name].zero_()

    def reset(self) -> None:
        for tensor in (*self._sums.values(), *self._pending.values()):
            tensor.zero_()

    def take_scales(self) -> Dict[str, Tensor]:
        """``{key: ‖X_j‖₂}`` shaped to multiply the layer's weight (``[out, in, *kernel]``),
        from the totals, which start again from zero. A layer no training forward reached
        since the last update (an expert no token was routed to, a branch some batches
        take) is ranked by the norms of the last update it had, with a warning.

        Raises:
            ValueError: naming the layers no training forward has reached since training
                started (all their feature norms are zero).
        """
        totals = self._shared_totals()
        empty = [name for name, sums in totals.items() if not bool(sums.any())]
        never = [name for name in empty if name not in self._previous]
        if never:
            raise ValueError(
                f"score='wanda' has no activation statistics for {never}: no training forward passed through"
                " them since the last mask update, and no earlier update ranked them (or their inputs were all"
                " zero); make sure they run in"
                " `training_step`, add them to `exclude`, or use score='magnitude'"
            )
        if empty:
            self._warn(
                f"score='wanda': no training forward reached {empty} since the last mask update (a branch or expert"
                " some batches skip); their weights are ranked by the input norms of the update before"
            )
        self._previous.update({name: sums.sqrt() for name, sums in totals.items() if name not in empty})
        scales = {name: _shaped(self._layers[name], norms) for name, norms in self._previous.items()}
        self.reset()
        return scales

    def _shared_totals(self) -> Dict[str, Tensor]:
        """The totals, those of layers that share one weight (two modules holding one
        parameter, each fed its own inputs) added together: that weight multiplies the
        inputs of both, so both rank it alike and their masks agree (apart, the zeros of
        both masks landed in the one weight, past the target sparsity)."""
        sharing: Dict[tuple, List[str]] = {}
        for name, layer in self._layers.items():  # (two convolutions of other `groups` read other widths)
            sharing.setdefault((id(raw_weight(layer)), self._sums[name].shape), []).append(name)
        totals = dict(self._sums)
        for names in sharing.values():
            if len(names) > 1:
                combined = sum(self._sums[name] for name in names)
                totals.update({name: combined for name in names})
        return totals

    def sums(self) -> Dict[str, Tensor]:
        """A copy of the totals, ``{key: sum of squares per input feature}``."""
        return {name: sums.clone() for name, sums in self._sums.items()}

    def state(self) -> Dict[str, Dict[str, Tensor]]:
        """The totals since the last update (``"sums"``) and each layer's norms of the last
        update it had statistics for (``"previous"``)."""
        return {part: {name: tensor.detach().cpu().clone() for name, tensor in tensors.items()}
                for part, tensors in (("sums", self._sums), ("previous", self._previous))}

    def load(self, state: Mapping[str, Any]) -> None:
        """Take the totals and last norms of :meth:`state` (or the totals alone, as
        checkpoints before the last norms were kept hold them).

        Raises:
            ValueError: for other layers or widths than these layers'.
        """
        if not isinstance(state, Mapping):
            state = {"sums": state}
        totals_only = all(isinstance(saved, Tensor) for saved in state.values())
        sums, previous = (state, {}) if totals_only else (state.get("sums"), state.get("previous"))
        layers = set(self._sums)
        if not (isinstance(sums, Mapping) and isinstance(previous, Mapping)) or set(sums) != layers \
                or not set(previous) <= layers:
            covered = sorted({*sums, *previous}) if isinstance(sums, Mapping) and isinstance(previous, Mapping) else state
            raise ValueError(
                f"the checkpoint's wanda statistics cover {covered} but this MagnitudePruning ranks"
                f" {sorted(layers)}; resume with the same `targets` and `exclude`"
            )
        loaded = {part: {} for part in ("sums", "previous")}
        for part, tensors in (("sums", sums), ("previous", previous)):
            for name, saved in tensors.items():
                if not isinstance(saved, Tensor) or saved.shape != self._sums[name].shape:
                    raise ValueError(f"the checkpoint's wanda statistics of layer {name!r} do not fit its input size")
                loaded[part][name] = saved.to(device=self._sums[name].device, dtype=torch.float32).clone()
        self._sums, self._previous = loaded["sums"], loaded["previous"]

    def _observer(self, name: str):
        def observe(layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not self.collecting or not counts_as_training_forward():
                return
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, Tensor):
                buffer = self._pending[name]
                buffer += _sum_of_squares(layer, x.detach()).to(buffer.device)
        return observe


def _width(layer: nn.Module) -> int:
    return layer.in_channels if isinstance(layer, _CONV) else layer.in_features


def _sum_of_squares(layer: nn.Module, x: Tensor) -> Tensor:
    """Per input feature: the last dimension of a Linear's input, the channel dimension of
    a convolution's (batched or not), summed over everything else."""
    if isinstance(layer, _CONV):
        channel = x.dim() - len(layer.kernel_size) - 1
        x = x.movedim(channel, -1)
    # vector_norm accumulates in float32 without a float32 copy of the input.
    return torch.linalg.vector_norm(x.reshape(-1, x.shape[-1]), dim=0, dtype=torch.float32).square()


def _shaped(layer: nn.Module, norms: Tensor) -> Tensor:
    """``norms`` (per input feature) broadcast against the layer's weight: over its rows,
    and for a convolution over its kernel positions, each group's rows reading the norms
    of that group's channels."""
    if not isinstance(layer, _CONV):
        return norms
    kernel = [1] * len(layer.kernel_size)
    per_group = norms.view(layer.groups, -1)
    if layer.groups == 1:
        return per_group.view(1, -1, *kernel)
    rows = per_group.repeat_interleave(layer.out_channels // layer.groups, dim=0)
    return rows.view(*rows.shape, *kernel)


__all__ = ["SCORES", "InputNorms", "wanda_issue", "wanda_start_message"]
