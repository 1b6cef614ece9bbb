"""Whether a scale mapping's fold keeps the model's function, measured on training steps.

AWQ and SmoothQuant divide the output channels of a smooth module ``S`` by scales ``s``
and multiply the input columns of its balance layers by them. That keeps the model's
function exactly when nothing but the balance layers reads ``S``'s output and every step
between them commutes with a per-channel scale (attention over a value projection, ReLU,
a reshape; not GELU, a norm, or a residual add). A hook cannot see the model's graph, but
the loss can: folding is then a symmetry of the loss, so along the one-parameter family
``S`` scaled by ``1 + εr``, the balance columns by ``1 / (1 + εr)``, its derivative is zero
for every ``r``. Per channel ``j`` that is

    a_j = Σ_tokens Y_tj · ∂L/∂Y_tj   (the output of S, read by everything that reads it)
    b_j = Σ_balance Σ_i W_ij · ∂L/∂W_ij   (the balance layers' weights)
    a_j == b_j

which the backward of every calibration step gives for free: a tensor hook on ``S``'s
output and a gradient hook on each balance weight. :class:`FoldCheck` sums both over the
calibration steps (and ranks) and :func:`fold_deviation` compares them, channel by
channel, relative to ``Σ |Y_tj · ∂L/∂Y_tj|``.

Measured on transformers' BERT and LLaMA blocks (4 batches): the built-in mappings
deviate by at most 3e-7 in float32 and 3e-3 in bf16 (autocast or bf16 weights); a GELU
between the layers by 0.2 to 0.3; a module whose output something else also reads (a
post-norm LayerNorm and its residual, ``input_layernorm`` with only ``q_proj`` listed) by
0.6 to 1; an unrelated pair of layers of matching sizes by hundreds.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_compress.core.recompute import counts_as_training_forward
from lightning_compress.core.transforms import raw_weight

# Largest per-channel deviation a fold may show (see the figures above): 15x the bf16
# round-off of a valid fold, 4x below a GELU between the layers.
FOLD_TOLERANCE = 0.05

_A, _B, _SCALE = 0, 1, 2  # rows of a mapping's statistics


class FoldCheck:
    """Records, for each mapping (``{smooth module: balance layers}``), the ``a``, ``b``
    and scale rows above over the backward passes of the steps between :meth:`attach` and
    :meth:`detach`, into the dict ``sums_of()`` returns (``{smooth: [3, channels]}``,
    float32; a checkpointed statistic, so the dict is replaced when one is loaded). A mapping whose balance weights do not all require gradients (frozen
    under LoRA), or whose smooth module's output never does, is not measured."""

    def __init__(self, model: nn.Module, mappings: Mapping[str, Sequence[str]],
                 sums_of: Callable[[], Dict[str, Tensor]]) -> None:
        self.model = model
        self.mappings = dict(mappings)
        self._sums_of = sums_of
        self._handles: List[Any] = []

    def attach(self) -> None:
        modules = dict(self.model.named_modules())
        for smooth, balance in self.mappings.items():
            weights = [raw_weight(modules[name]) for name in balance]
            if not all(w.requires_grad for w in weights):
                continue
            self._handles.append(modules[smooth].register_forward_hook(self._output_recorder(smooth)))
            for weight in weights:
                self._handles.append(weight.register_hook(self._weight_recorder(smooth, weight)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _row(self, smooth: str, like: Tensor, width: int) -> Tensor:
        every = self._sums_of()
        sums = every.get(smooth)
        if sums is None or sums.device != like.device:
            sums = torch.zeros(3, width, device=like.device) if sums is None else sums.to(like.device)
            every[smooth] = sums
        return sums

    def _output_recorder(self, smooth: str):
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            if not (self._handles and isinstance(output, Tensor) and output.requires_grad
                    and counts_as_training_forward()):
                return
            values = output.detach()

            def on_gradient(grad: Tensor) -> None:
                product = (grad.float() * values.float()).reshape(-1, values.shape[-1])
                sums = self._row(smooth, values, values.shape[-1])
                sums[_A] += product.sum(dim=0)
                sums[_SCALE] += product.abs().sum(dim=0)

            output.register_hook(on_gradient)
        return record

    def _weight_recorder(self, smooth: str, weight: Tensor):
        def on_gradient(grad: Tensor) -> None:
            if self._handles:
                columns = (grad.float() * weight.detach().float()).sum(dim=0)
                self._row(smooth, weight, columns.numel())[_B] += columns
        return on_gradient


def fold_deviation(sums: Tensor) -> tuple[float, int] | None:
    """The largest ``|a_j - b_j| / Σ|Y_tj · ∂L/∂Y_tj|`` over channels ``j`` and that
    channel, or ``None`` where nothing was measured (no gradient reached the smooth
    module's output, or a step overflowed)."""
    scale = sums[_SCALE]
    if not bool(scale.any()) or not bool(sums.isfinite().all()):
        return None
    # A channel whose output the loss barely depends on measures only round-off.
    floor = 1e-3 * scale.max()
    deviation = (sums[_A] - sums[_B]).abs() / torch.maximum(scale, floor)
    worst = int(deviation.argmax())
    return float(deviation[worst]), worst


__all__ = ["FOLD_TOLERANCE", "FoldCheck", "fold_deviation"]
