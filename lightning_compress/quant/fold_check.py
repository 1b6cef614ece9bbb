"""Whether a scale mapping's fold keeps the model's function, measured on training steps.

AWQ and SmoothQuant divide the output channels of a smooth module ``S`` by scales ``s``
and multiply the input columns of its balance layers by them. That keeps the model's
function exactly when nothing but the balance layers reads ``S``'s output and every step
between them commutes with a per-channel scale (attention over a value projection, ReLU,
a reshape; not GELU, a norm, or a residual add). A hook cannot see the model's graph, but
the loss of every batch can: a fold that keeps the function is a symmetry of it, so along
the family ``S``'s channel ``j`` scaled by ``1 + ε``, the balance layers' column ``j`` by
``1 / (1 + ε)``, the loss's derivative is zero. From parameter gradients alone:

    a_j = Σ_k S.weight_jk · ∂L/∂S.weight_jk + S.bias_j · ∂L/∂S.bias_j   (= Σ_t Y_tj ∂L/∂Y_tj)
    b_j = Σ_balance Σ_i W_ij · ∂L/∂W_ij
    a_j == b_j, for every batch

(a norm's weight and bias are 1-D: ``S.weight_j · ∂L/∂S.weight_j``). The equality holds
batch by batch, so :class:`FoldCheck` compares each batch's ``a`` and ``b``: the sums
over batches would also agree for a fold that changes the function once the model has
trained to a minimum of its loss, where every direction's derivative averages to zero,
but no single batch's does. Parameter gradients only come with the backward passes that
update the weights (not an extra ``autograd.grad`` with respect to the inputs), and
activation checkpointing forms them as usual.

Measured on transformers' BERT and LLaMA blocks (6 batches), untrained and trained: the
built-in mappings deviate by less than 1e-5 in float32 and at most 0.0033 in bf16
(autocast or bf16 weights, batch size 1 to 4); a GELU between the layers by 0.088 to 0.16, a module whose
output something else also reads (a post-norm LayerNorm and its residual,
``input_layernorm`` with only ``q_proj`` listed) or unrelated layers of matching sizes by
0.59 to 0.99. A loss with a penalty on these weights (rather than the optimizer's
``weight_decay``) is not invariant either, and is refused alike.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_compress.core.distributed import all_reduce_sum_, is_rank_zero
from lightning_compress.core.transforms import Stage, get_weight_transform, raw_weight

# Largest deviation a fold may show: 9x the bf16 round-off of a valid fold measured
# above, 3x below a GELU between the layers.
FOLD_TOLERANCE = 0.03

_DEVIATION, _SIZE = 0, 1  # rows of a mapping's totals: Σ_batches |a - b|, Σ_batches |a| + |b|


def smooth_parameters(module: nn.Module) -> List[Tensor]:
    """The parameters of a smooth module whose gradients give ``a``: its weight (raw, under
    any transform) and bias."""
    weight = raw_weight(module) if isinstance(module, nn.Linear) else module.weight
    bias = getattr(module, "bias", None)
    return [weight] + ([bias] if isinstance(bias, Tensor) else [])


class FoldCheck:
    """Records, for each mapping (``{smooth module: balance layers}``), the batch-by-batch
    comparison above over the backward passes of the training batches between
    :meth:`attach` and :meth:`detach` (one batch each), into the dict ``totals_of()``
    returns (``{smooth: [2, channels]}``, float32; a checkpointed statistic, so the dict
    is replaced when one is loaded). A batch whose gradients are not finite (a loss
    scaler's overflow) is left out.

    A batch that did not give every parameter of a mapping a gradient (frozen, or not
    reached by the loss) says nothing about it.
    """

    def __init__(self, model: nn.Module, mappings: Mapping[str, Sequence[str]],
                 totals_of: Callable[[], Dict[str, Tensor]]) -> None:
        self.model = model
        self.mappings = dict(mappings)
        self._totals_of = totals_of
        self._handles: List[Any] = []
        self._batch: Dict[str, Tensor] = {}  # {smooth: [a, b]} of the batch under way
        self._fired: Dict[str, set] = {}  # {smooth: ids of its parameters whose gradient came this batch}
        modules = dict(model.named_modules())
        self._parameters = {
            smooth: (smooth_parameters(modules[smooth]), [raw_weight(modules[name]) for name in balance])
            for smooth, balance in self.mappings.items()
        }

    def attach(self) -> None:
        if self._handles:
            return
        for smooth, (own, weights) in self._parameters.items():
            # Asked at every batch: a LoRA callback set up after this one freezes base weights.
            if not all(p.requires_grad for p in (*own, *weights)):
                continue
            for parameter in own:
                self._handles.append(parameter.register_hook(self._recorder(smooth, parameter, row=0, columns=False)))
            for weight in weights:
                self._handles.append(weight.register_hook(self._recorder(smooth, weight, row=1, columns=True)))

    def detach(self) -> None:
        """The end of a training batch: add its comparison to the totals."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        totals = self._totals_of()
        for smooth, (a, b) in self._batch.items():
            own, weights = self._parameters[smooth]
            # Every parameter's gradient, or the batch says nothing (some were frozen
            # inside the batch, or the loss did not reach them all).
            if self._fired[smooth] != {id(p) for p in (*own, *weights)}:
                continue
            if not bool(torch.isfinite(a).all() and torch.isfinite(b).all()):
                continue
            total = totals.get(smooth)
            if total is None or total.device != a.device:
                total = torch.zeros(2, a.numel(), device=a.device) if total is None else total.to(a.device)
                totals[smooth] = total
            total[_DEVIATION] += (a - b).abs()
            total[_SIZE] += a.abs() + b.abs()
        self._batch, self._fired = {}, {}

    def _recorder(self, smooth: str, parameter: Tensor, *, row: int, columns: bool):
        def on_gradient(grad: Tensor) -> None:
            product = grad.float() * parameter.detach().float()
            # A balance weight's column j, or the smooth module's output channel j (its
            # weight's row j, its bias's entry j).
            per_channel = product.sum(dim=0) if columns else product.reshape(product.shape[0], -1).sum(dim=1)
            batch = self._batch.get(smooth)
            if batch is None:
                batch = self._batch[smooth] = torch.zeros(2, per_channel.numel(), device=per_channel.device)
            batch[row] += per_channel
            self._fired.setdefault(smooth, set()).add(id(parameter))
        return on_gradient

    def verify(self, totals: Dict[str, Tensor], setting: str) -> None:
        """At the start, before anything is folded: refuse a mapping with a LoRA adapter
        on one of its layers, or one whose fold changed a batch's loss (summed over
        ranks); warn of the mappings that could not be measured.

        Raises:
            ValueError: naming the mapping, why, and the fix.
        """
        modules = dict(self.model.named_modules())
        for smooth, balance in self.mappings.items():
            adapted = [name for name in (smooth, *balance) if get_weight_transform(modules[name], Stage.ADAPTER)]
            if adapted:
                raise ValueError(
                    f"{setting} would fold scales into {smooth!r} and the input columns of {list(balance)}, but"
                    f" {adapted} compute with a LoRA adapter (W + B·A), which would not scale with W (and an NF4 base"
                    " cannot be rescaled); leave those layers out of the LoRA targets, or exclude them from this"
                    " QuantizationAwareTraining callback"
                )
        # The same list on every rank (a mapping nothing reached: zeros), summed: one decision.
        widths = {smooth: weights[0].shape[1] for smooth, (_, weights) in self._parameters.items()}
        device = next(iter(self._parameters.values()))[1][0].device if self._parameters else None
        summed = [totals.get(smooth, torch.zeros(2, widths[smooth], device=device)) for smooth in self.mappings]
        all_reduce_sum_(summed)
        unmeasured = []
        for (smooth, balance), total in zip(self.mappings.items(), summed):
            found = fold_deviation(total)
            if found is None:
                unmeasured.append(smooth)
            elif found[0] > FOLD_TOLERANCE:
                raise ValueError(
                    f"{setting} would fold scales into {smooth!r} and the input columns of {list(balance)}, but that"
                    f" changes what the model computes: on the calibration batches the loss is not invariant to the"
                    f" rescaling (off by {found[0]:.0%} of its size, most in input channel {found[1]}). Something besides those"
                    f" layers reads {smooth!r}'s output (a residual connection, a parallel branch, a layer left out of"
                    " the mapping), a step between them does not commute with a per-channel scale (GELU, a norm, an"
                    " addition), or the loss penalizes these weights. Fix `mappings`, or exclude"
                    f" {list(balance)}"
                )
        if unmeasured and is_rank_zero():
            warnings.warn(
                f"{setting}: could not check that folding into {unmeasured} keeps the model's function (their or"
                " their layers' parameters are frozen, or no calibration batch gave them all finite, non-zero"
                " gradients); folded as given",
                UserWarning, stacklevel=2,
            )


def fold_deviation(totals: Tensor) -> tuple[float, int] | None:
    """``Σ|a - b| / Σ(|a| + |b|)`` over batches and channels, and the channel that
    deviates most; ``None`` where nothing was measured. Over all channels: a channel
    whose ``a`` and ``b`` nearly cancel within a batch measures mostly round-off (in bf16,
    21% of its size on a valid LLaMA fold in this package's bf16-mixed test, when channels
    were judged one by one), while what breaks a fold reaches every channel."""
    deviation, size = totals[_DEVIATION], totals[_SIZE]
    if not bool(size.any()):
        return None
    return float(deviation.sum() / size.sum()), int(deviation.argmax())


__all__ = ["FOLD_TOLERANCE", "FoldCheck", "fold_deviation", "smooth_parameters"]
