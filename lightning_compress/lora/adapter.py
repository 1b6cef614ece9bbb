"""One layer's LoRA adapter: the ADAPTER stage of its weight-transform stack.

The layer computes with ``W + scaling · B·A`` (``W`` dequantized first when it is stored
in NF4). ``A`` and ``B`` are registered on the layer as ``lora_A`` and ``lora_B``, so the
user's ``configure_optimizers`` and DDP see them as ordinary parameters; the shapes are
PEFT's: ``A`` is ``[r, in, *kernel]`` and ``B`` is ``[out, r, 1, ...]`` for Linear and Conv,
``A`` is ``[r, num_embeddings]``, ``B`` is ``[embedding_dim, r]`` for Embedding, and ``A``
is ``[r, E]``, ``B`` is ``[3E, r]`` for the packed ``in_proj_weight`` of an
``nn.MultiheadAttention`` (the weight an adapter transforms is :func:`weight_name`'s).

Two exact ways to compute the same output:

- branch: ``W x + scaling · B(A(dropout(x)))``. The weight gradient of the frozen ``W``
  is never formed and an NF4 ``W`` is dequantized inside the matmul (torchao saves only
  the 4-bit tensor for backward). Used while the adapter is the layer's only stage.
- merged: ``(W + scaling · B·A) x``, which is what ``layer.weight`` returns. Used when
  pruning or QAT transform the same weight, since they act on the merged weight. An
  attention layer always computes this way: it reads its ``in_proj_weight`` (and its
  ``out_proj``'s weight) itself, so there is no branch to run (nor dropout, as in PEFT).
"""

from __future__ import annotations

import math
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.core.sharding import full
from lightning_compress.core.targeting import weight_name
from lightning_compress.core.transforms import (
    Stage,
    get_weight_transform,
    own_forward,
    raw_weight,
    remove_weight_transform,
    run_stages,
    set_forward,
    stages,
)
from lightning_compress.quant.nf4 import dequantize_nf4, is_nf4

_CONV_FUNCTIONS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
MERGED_MARK = "_lc_lora_merged"


class DropoutRNG:
    """Adapter-input dropout drawn from a generator of its own, so it can be checkpointed:
    a resumed run draws the same masks as one that never stopped (Lightning does not
    checkpoint the global RNG)."""

    def __init__(self, p: float, seed: int = 0) -> None:
        self.p = p
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._pending: Dict[str, Any] | None = None

    def __call__(self, x: Tensor, training: bool) -> Tensor:
        if not training or self.p == 0.0:
            return x
        keep = torch.empty_like(x).bernoulli_(1.0 - self.p, generator=self._generator_on(x.device))
        return x * keep / (1.0 - self.p)

    def state_dict(self) -> Dict[str, Any]:
        if self._generator is None:
            return self._pending or {"seed": self.seed}
        return {"seed": self.seed, "device": str(self._generator.device), "state": self._generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self._generator, self._pending = None, dict(state)

    def _generator_on(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device.type != device.type:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
            pending, self._pending = self._pending, None
            if pending and "state" in pending and pending.get("device", "cpu").split(":")[0] == device.type:
                self._generator.set_state(pending["state"])
        return self._generator


class LoRAAdapter:
    """The ADAPTER stage of one layer (create it with :meth:`attach`)."""

    def __init__(self, layer: nn.Module, scaling: float, dropout: DropoutRNG, compute_dtype: torch.dtype | None) -> None:
        self.layer = layer
        self.scaling = scaling
        self.dropout = dropout
        self.compute_dtype = compute_dtype
        self.param = weight_name(layer)  # the parameter it transforms: `weight`, or `in_proj_weight`

    @property
    def base_dtype(self) -> torch.dtype:
        """The float dtype ``W`` computes in (an NF4 ``W`` dequantizes to it): ``A``'s,
        made in ``W``'s dtype and converted with the rest of the model since (Lightning's
        ``precision="bf16-true"`` converts the model after the adapters are made, and
        leaves an NF4 ``W`` as it is)."""
        return self.layer.lora_A.dtype

    @classmethod
    def create_parameters(cls, layer: nn.Module, r: int, dtype: torch.dtype) -> None:
        """Register ``lora_A`` (Kaiming-uniform, as PEFT) and ``lora_B`` (zeros) on ``layer``."""
        options = dict(dtype=dtype, device=raw_weight(layer, weight_name(layer)).device)
        a_shape, b_shape = adapter_shapes(layer, r)
        lora_a = torch.empty(a_shape, **options)
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
        layer.lora_A = nn.Parameter(lora_a)
        layer.lora_B = nn.Parameter(torch.zeros(b_shape, **options))

    # ------------------------------------------------------------ weight transform
    def delta(self, dtype: torch.dtype | None = None) -> Tensor:
        """``scaling · B·A`` in the layer's weight shape (in ``dtype``, default ``A``'s)."""
        # Whole under FSDP2 outside a forward (pruning scores, reports, the export).
        lora_a, lora_b = full(self.layer.lora_A), full(self.layer.lora_B)
        if dtype is not None:
            lora_a, lora_b = lora_a.to(dtype), lora_b.to(dtype)
        product = lora_b.flatten(1) @ lora_a.flatten(1)
        if isinstance(self.layer, nn.Embedding):
            return product.t() * self.scaling
        return (product * self.scaling).view(raw_weight(self.layer, self.param).shape)

    def dense_base(self, dtype: torch.dtype | None = None) -> Tensor:
        """``W`` as a dense tensor (dequantized when stored in NF4)."""
        weight = full(raw_weight(self.layer, self.param))
        if is_nf4(weight):
            return dequantize_nf4(weight, dtype or self.base_dtype)
        return weight if dtype is None else weight.to(dtype)

    def __call__(self, weight: Tensor) -> Tensor:
        base = dequantize_nf4(weight, self.base_dtype) if is_nf4(weight) else weight
        return base + self.delta(base.dtype)

    def table_fields(self) -> Dict[str, Any]:
        """This stage's column of the per-layer table."""
        return {"lora_rank": self.layer.lora_A.shape[0]}

    # ------------------------------------------------------------ forward
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        layer = self.layer
        if stages(layer) != (Stage.ADAPTER,):
            return own_forward(layer, x, *args, **kwargs)  # merged: later stages need the weight
        if isinstance(layer, nn.Embedding):
            return self._embedding(x)
        in_dtype = x.dtype
        if self.compute_dtype is not None and x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        lora_a, lora_b = layer.lora_A.to(x.dtype), layer.lora_B.to(x.dtype)
        hidden = self.dropout(x, layer.training)
        bias = layer.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if isinstance(layer, nn.Linear):
            out = F.linear(x, raw_weight(layer), bias)  # NF4: torchao dequantizes inside
            out = out + F.linear(F.linear(hidden, lora_a), lora_b) * self.scaling
        else:
            conv = _CONV_FUNCTIONS[_conv_type(layer)]
            out = layer._conv_forward(x, raw_weight(layer), bias)
            out = out + conv(layer._conv_forward(hidden, lora_a, None), lora_b) * self.scaling
        return out if out.dtype == in_dtype else out.to(in_dtype)

    def _embedding(self, ids: Tensor) -> Tensor:
        layer = self.layer
        out = F.embedding(ids, raw_weight(layer), layer.padding_idx, layer.max_norm, layer.norm_type,
                          layer.scale_grad_by_freq, layer.sparse)
        # No dropout on integer ids (as PEFT); A's columns are looked up like the table's rows.
        hidden = F.embedding(ids, layer.lora_A.t(), layer.padding_idx)
        return out + (hidden @ layer.lora_B.t()) * self.scaling

    # ------------------------------------------------------------ merge
    @torch.no_grad()
    def merge(self, untie: bool = False) -> None:
        """Write ``W + scaling · B·A`` into ``W`` (in float32, an NF4 ``W`` dequantized first),
        re-apply the stages between ADAPTER and FAKE_QUANT (pruning masks) to it, and
        remove the adapter. The layer then computes what it computed before, up to float
        rounding of the branch form. ``untie``: ``W`` is shared with another layer (a head
        tied to the input embedding), which must keep computing with it: the merged weight
        becomes a parameter of this layer's own."""
        layer = self.layer
        merged = self.dense_base(torch.float32) + self.delta(torch.float32)
        merged = run_stages(layer, merged, after=Stage.ADAPTER, before=Stage.FAKE_QUANT, param=self.param)
        weight = raw_weight(layer, self.param)
        if is_nf4(weight) or untie:
            dtype = self.base_dtype if is_nf4(weight) else weight.dtype
            layer._parameters[self.param] = nn.Parameter(merged.to(dtype), requires_grad=False)
        else:
            weight.copy_(merged.to(weight.dtype))
        set_forward(layer, None)
        remove_weight_transform(layer, Stage.ADAPTER, self.param)
        del layer.lora_A, layer.lora_B
        layer.__dict__[MERGED_MARK] = True


def adapter_of(layer: nn.Module) -> LoRAAdapter | None:
    """The LoRA adapter on ``layer``'s adapted weight, if it holds one."""
    adapter = get_weight_transform(layer, Stage.ADAPTER, weight_name(layer))
    return adapter if isinstance(adapter, LoRAAdapter) else None


def check_on_model(adapters: Dict[str, LoRAAdapter], merged: list, action: str, fix: str,
                   fix_replaced: str | None = None) -> None:
    """Refuse to ``action`` (merge, save) one LoRA callback's ``adapters`` that are no longer
    on the model, naming why and ``fix`` (``fix_replaced`` for adapters replaced on it).

    Raises:
        ValueError: none set up yet, merged already (``merged`` names the layers), or
            replaced (by :func:`~lightning_compress.merge_adapters`, or a later Trainer's LoRA
            callback that took them over).
    """
    if not adapters:
        if merged:
            raise ValueError(f"the LoRA adapters were already merged (into {', '.join(merged[:5])}); {fix}")
        raise ValueError(f"LoRA has no adapters to {action} yet: {action} after fit (or validate/test) has set them up")
    if any(adapter_of(adapter.layer) is not adapter for adapter in adapters.values()):
        raise ValueError("this LoRA's adapters are no longer on the model: merged already, or taken over by a later"
                         f" Trainer's LoRA callback; {fix_replaced or fix}")


def adapter_shapes(layer: nn.Module, r: int) -> tuple:
    """PEFT's shapes of ``(A, B)`` for a rank-``r`` adapter on ``layer``."""
    if isinstance(layer, nn.Embedding):
        return (r, layer.num_embeddings), (layer.embedding_dim, r)
    shape = raw_weight(layer, weight_name(layer)).shape
    kernel = tuple(shape[2:])
    return (r, shape[1], *kernel), (shape[0], r, *(1,) * len(kernel))


def _conv_type(layer: nn.Module) -> type:
    return next(t for t in _CONV_FUNCTIONS if isinstance(layer, t))
