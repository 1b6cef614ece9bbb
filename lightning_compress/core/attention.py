"""``nn.MultiheadAttention`` as a compressed model computes it.

An attention layer holds two GEMMs: the input projection (``in_proj_weight``, read by
the layer itself, applied to query, key and value) and the output projection
(``out_proj``, an ``nn.Linear`` whose weight the layer also reads itself: PyTorch never
calls ``out_proj``'s forward). A compressed attention layer computes with
:func:`attention_forward`, which

- reads ``in_proj_weight`` once per call (so a transform stack on it runs once), and
- calls ``out_proj`` as a module whenever it has forward hooks (an input stage, a
  packed layer's input quantizer, a feature capture), so what runs on a Linear's input
  runs on the output projection's input too. The attention output before the
  projection comes from ``F.multi_head_attention_forward`` with an identity output
  weight, which is exact (every product is by 1 or 0).

It never takes PyTorch's fused inference path (``torch._native_multi_head_attention``),
which would skip both. :func:`fast_path_disabled` turns that path off for a whole
model while it is measured or exported: the fused kernels of ``nn.TransformerEncoderLayer``
and ``nn.MultiheadAttention`` skip the submodules' forwards and cannot be exported to ONNX.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IN_PROJ = "in_proj_weight"
_QKV = ("query", "key", "value")


def compressible_attention(module: nn.Module) -> bool:
    """Whether ``module`` is an attention layer whose input projection this package
    compresses: one packed ``in_proj_weight`` (query, key and value of the same width;
    separate ``q/k/v_proj_weight`` are not handled)."""
    return isinstance(module, nn.MultiheadAttention) and module._parameters.get(IN_PROJ) is not None


def attention_inputs(args: tuple, kwargs: dict, transform: Callable[[Tensor], Tensor]) -> Tuple[tuple, dict]:
    """``args``/``kwargs`` of an attention call with query, key and value (positional or
    keyword) passed through ``transform``: the inputs of the input projection. A tensor
    passed several times is transformed once and passed on as one tensor, so
    self-attention stays self-attention (``query is key is value``)."""
    args, kwargs = list(args), dict(kwargs)
    done = {}
    for position, name in enumerate(_QKV):
        holder, slot = (args, position) if position < len(args) else (kwargs, name)
        if holder is kwargs and name not in kwargs:
            continue
        x = holder[slot]
        if isinstance(x, Tensor):
            if id(x) not in done:
                done[id(x)] = transform(x)
            holder[slot] = done[id(x)]
    return tuple(args), kwargs


def calls_out_proj(attention: nn.Module) -> bool:
    """Whether :func:`attention_forward` runs ``attention.out_proj`` as a module: when
    it has forward hooks, which reading its weight would skip."""
    out_proj = attention.out_proj
    return bool(out_proj._forward_pre_hooks or out_proj._forward_hooks)


def attention_forward(
    attention: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    need_weights: bool = True,
    attn_mask: Optional[Tensor] = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """``nn.MultiheadAttention.forward`` without its fused path (same arguments, same
    result as its unfused path); see the module docstring. Nested tensors (what
    ``nn.TransformerEncoder`` makes of a padded batch in eval mode) go to PyTorch's own
    forward: only its fused path takes them."""
    if query.is_nested or key.is_nested or value.is_nested:
        return nn.MultiheadAttention.forward(attention, query, key, value, key_padding_mask, need_weights, attn_mask,
                                             average_attn_weights, is_causal)
    batched = query.dim() == 3
    if attention.batch_first and batched:
        if key is value:
            if query is key:
                query = key = value = query.transpose(1, 0)
            else:
                query, key = (x.transpose(1, 0) for x in (query, key))
                value = key
        else:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
    routed = calls_out_proj(attention)
    out_proj = attention.out_proj
    if routed:
        out_weight = torch.eye(attention.embed_dim, dtype=query.dtype, device=query.device)
        out_bias = None
    else:
        out_weight, out_bias = out_proj.weight, out_proj.bias
    separate = {}
    if not attention._qkv_same_embed_dim:
        separate = dict(use_separate_proj_weight=True, q_proj_weight=attention.q_proj_weight,
                        k_proj_weight=attention.k_proj_weight, v_proj_weight=attention.v_proj_weight)
    output, weights = F.multi_head_attention_forward(
        query, key, value, attention.embed_dim, attention.num_heads, attention.in_proj_weight,
        attention.in_proj_bias, attention.bias_k, attention.bias_v, attention.add_zero_attn, attention.dropout,
        out_weight, out_bias, training=attention.training, key_padding_mask=key_padding_mask,
        need_weights=need_weights, attn_mask=attn_mask, average_attn_weights=average_attn_weights,
        is_causal=is_causal, **separate,
    )
    if routed:
        output = out_proj(output)
    if attention.batch_first and batched:
        output = output.transpose(1, 0)
    return output, weights


def out_proj_owner(root: nn.Module, name: str) -> Optional[str]:
    """The name of the attention layer whose ``out_proj`` is the module ``name`` under
    ``root``; ``None`` when it is not an output projection."""
    parent, _, child = name.rpartition(".")
    if child != "out_proj":
        return None
    owner = root.get_submodule(parent) if parent else root
    return parent if isinstance(owner, nn.MultiheadAttention) else None


def keep_padded_batches(root: nn.Module) -> None:
    """Make every ``nn.TransformerEncoder`` under ``root`` that holds a layer with forward
    hooks keep a padded batch as it is in eval mode.

    Given ``src_key_padding_mask`` in eval mode, the encoder turns the batch into a nested
    tensor, which an input stage (an activation quantizer, a packed layer's input
    quantizer: they quantize the tokens of a dense tensor) cannot take, and on which an
    attention layer takes PyTorch's fused path, which never calls its ``out_proj``. With
    ``use_nested_tensor`` off the encoder computes as it does while training.
    """
    for module in root.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
            sub._forward_pre_hooks or sub._forward_hooks for sub in module.modules()
        ):
            module.use_nested_tensor = False


@contextlib.contextmanager
def fast_path_disabled() -> Iterator[None]:
    """PyTorch's fused attention inference path (``nn.MultiheadAttention``,
    ``nn.TransformerEncoderLayer``, ``nn.TransformerEncoder``) off inside the block, as
    it was before afterwards: every layer then runs its submodules' forwards, as the
    fake-quant model does while it trains, and traces to exportable ops."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


__all__ = [
    "IN_PROJ",
    "attention_forward",
    "attention_inputs",
    "calls_out_proj",
    "compressible_attention",
    "fast_path_disabled",
    "keep_padded_batches",
    "out_proj_owner",
]
