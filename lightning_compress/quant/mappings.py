"""Where per-input-channel scales can be folded: AWQ's and SmoothQuant's block mappings.

AWQ and SmoothQuant rescale the inputs of a group of Linear layers ("balance" layers)
channel by channel: the layers compute with ``W·diag(s)`` and their input must become
``X / s``. That division is folded into the module that produces the input (the
"smooth" module): a norm's weight (and bias), or the output rows of a Linear. It keeps
the model's function only when the smooth module's output feeds nothing but the balance
layers, which holds for these names and no others:

- LLaMA-style pre-norm decoder blocks (LLaMA, Mistral, Qwen2; the mappings
  llm-compressor ships for them): ``input_layernorm`` -> ``self_attn.{q,k,v}_proj``,
  ``self_attn.v_proj`` -> ``self_attn.o_proj`` (when the shapes agree: not under
  grouped-query attention), ``post_attention_layernorm`` -> ``mlp.{gate,up}_proj``,
  ``mlp.up_proj`` -> ``mlp.down_proj`` (the down projection's input is
  ``act(gate) * up``, linear in ``up``).
- BERT-style blocks: ``attention.self.value`` -> ``attention.output.dense`` (attention
  mixes value rows across tokens, which commutes with a per-channel scale). BERT's
  LayerNorms are post-norm: their output is also the residual stream, so nothing is
  folded into them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

from torch import nn

from lightning_compress.core.distributed import is_rank_zero
from lightning_compress.core.targeting import close_names_hint
from lightning_compress.quant.spec import QuantSpec

# (smooth module, balance layers): names relative to the block that holds them.
_RULES: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
    ("attention.self.value", ("attention.output.dense",)),
)


@dataclass(frozen=True)
class ScaleMapping:
    """Layers ``balance`` all read the output of ``smooth``, and nothing else does."""

    smooth: str
    balance: Tuple[str, ...]


def find_mappings(model: nn.Module, rules: Mapping[str, Sequence[str]] | None = None) -> List[ScaleMapping]:
    """Every mapping of ``rules`` (default: the built-in ones above) found in ``model``,
    in module order.

    ``rules`` maps a smooth module's name (or its last parts) to the names of its
    balance layers relative to the same parent, e.g. ``{"norm1": ["qkv"]}`` finds
    ``blocks.0.norm1 -> blocks.0.qkv`` in every block. A mapping is used only when its
    balance layers are ``nn.Linear`` layers whose input size equals the smooth module's
    output size (a norm's ``weight`` length, a Linear's ``out_features``).
    """
    pairs = _RULES if rules is None else tuple((smooth, tuple(balance)) for smooth, balance in rules.items())
    modules: Dict[str, nn.Module] = dict(model.named_modules())
    found = []
    for name, module in modules.items():
        for smooth_suffix, balance_suffixes in pairs:
            prefix = _block_prefix(name, smooth_suffix)
            if prefix is None:
                continue
            balance = tuple(prefix + suffix for suffix in balance_suffixes)
            if all(_reads(modules.get(b), _output_size(module)) for b in balance):
                found.append(ScaleMapping(name, balance))
    return found


def unmatched_rules(model: nn.Module, rules: Mapping[str, Sequence[str]]) -> List[str]:
    """Why the user's ``rules`` miss where they miss: one sentence for each rule that
    names no module, and for each place a rule's smooth module is found without the
    mapping (per block), for error messages."""
    modules: Dict[str, nn.Module] = dict(model.named_modules())
    leaves = [n for n in modules if n]  # close_names_hint compares their last parts too
    reasons: List[str] = []
    for smooth_suffix, balance_suffixes in rules.items():
        names = [n for n in modules if _block_prefix(n, smooth_suffix) is not None]
        if not names:
            reasons.append(f"{smooth_suffix!r} names no module.{close_names_hint(smooth_suffix, leaves)}")
            continue
        found = {m.smooth for m in find_mappings(model, {smooth_suffix: balance_suffixes})}
        for name in names:
            if name not in found:
                reasons.extend(_why_not(modules, name, _block_prefix(name, smooth_suffix), balance_suffixes, leaves))
    return list(dict.fromkeys(reasons))


def _why_not(modules: Mapping[str, nn.Module], name: str, prefix: str, balance_suffixes: Sequence[str],
             leaves: Sequence[str]) -> List[str]:
    size = _output_size(modules[name])
    if size is None:
        return [f"{name!r} ({type(modules[name]).__name__}) is neither a norm with a 1-D weight nor an nn.Linear, so"
                " no scale can be folded into it"]
    reasons = []
    for suffix in balance_suffixes:
        layer = modules.get(prefix + suffix)
        if layer is None:
            reasons.append(f"{prefix + suffix!r} (under {name!r}) names no module.{close_names_hint(suffix, leaves)}")
        elif not isinstance(layer, nn.Linear):
            reasons.append(f"{prefix + suffix!r} is {type(layer).__name__}: mappings scale the input columns of"
                           " nn.Linear layers only")
        elif layer.in_features != size:
            reasons.append(f"{prefix + suffix!r} reads {layer.in_features} features but {name!r} gives {size}")
    return reasons


def covering_mappings(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    specs: Mapping[str, QuantSpec],
    setting: str,
    init: str | None,
    rules: Mapping[str, Sequence[str]] | None,
) -> List[ScaleMapping]:
    """The mappings (of ``rules``, else the built-in ones) whose balance layers include
    one of the quantized ``layers`` (on grids ``specs``); ``setting`` names the start
    for messages.

    Raises:
        ValueError: a quantized layer no mapping covers (with why the user's rules miss),
            a layer under two mappings, or (``init='awq'``) a mapping whose layers are on
            different grids.
    """
    found = find_mappings(model, rules)
    mappings = [m for m in found if any(name in layers for name in m.balance)]
    if rules is not None:
        _warn_of_unused_rules(model, rules, found)
    owners: Dict[str, str] = {}
    for mapping in mappings:
        for name in mapping.balance:
            if name in owners:
                raise ValueError(
                    f"`mappings` lists {name!r} under both {owners[name]!r} and {mapping.smooth!r}: a layer's input"
                    " columns can take the scales of one mapping only; keep it under the module whose output it reads"
                )
            owners[name] = mapping.smooth
    uncovered = uncovered_layers(model, layers, setting, rules)  # (the compatibility check names them first)
    if uncovered:
        raise ValueError("; ".join(uncovered.values()))
    if init == "awq":
        for mapping in mappings:
            grids = {specs[n] for n in mapping.balance if n in specs}
            if len(grids) > 1:
                raise ValueError(
                    f"init='awq' searches one scale per input channel for {list(mapping.balance)}, which `overrides`"
                    " put on different grids; give them one grid"
                )
    return mappings


def describe_setting(init: str | None, smoothing: float | None) -> str:
    """``init='gptq' with smoothing=0.5``: the user's setting, for messages."""
    parts = ([f"init={init!r}"] if init is not None else []) + ([f"smoothing={smoothing}"] if smoothing is not None else [])
    return " with ".join(parts)


def uncovered_layers(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    setting: str,
    rules: Mapping[str, Sequence[str]] | None,
) -> Dict[str, str]:
    """``{name: why}`` for the quantized ``layers`` no mapping of ``rules`` (else the
    built-in ones) covers: AWQ or SmoothQuant (``setting``) has nowhere to fold their
    scales. Each message names the layer and the fixes."""
    covered = {name for m in find_mappings(model, rules) for name in m.balance}
    missing = [key for key in layers if key not in covered]
    if not missing:
        return {}
    reasons = _reasons(model, rules)  # which rules there are and why they miss: said once, at the first layer
    return {
        key: f"{setting} has nowhere to fold its per-channel scales for {key!r}: "
             + (f"{_known(rules)}{reasons}" if index == 0 else
                f"no {'usable `mappings` entry' if rules is not None else 'built-in mapping'} covers it (see"
                f" {missing[0]!r}).")
             + f" Give `mappings` for it, or quantize it in a second QuantizationAwareTraining callback without {setting}"
        for index, key in enumerate(missing)
    }


def _warn_of_unused_rules(model: nn.Module, rules: Mapping[str, Sequence[str]], found: Sequence[ScaleMapping]) -> None:
    """The user's entries that match nothing in ``model``: a typo the targeted layers did
    not need would otherwise pass in silence."""
    unused = {smooth: balance for smooth, balance in rules.items()
              if not any(_block_prefix(m.smooth, smooth) is not None for m in found)}
    if unused and is_rank_zero():
        reasons = unmatched_rules(model, unused)
        warnings.warn(f"`mappings` entries {sorted(unused)} match nothing in the model and are not used"
                      + (f": {'; '.join(reasons[:4])}" if reasons else ""), UserWarning, stacklevel=3)


def _known(rules: Mapping[str, Sequence[str]] | None) -> str:
    if rules is not None:  # ("no `mappings` {'c3': ['c4']} covers it" read wrong where the entry names it)
        return f"no entry of `mappings` {dict(rules)} can cover it"
    return ("no built-in mapping (LLaMA-style `input_layernorm -> q/k/v_proj`, `post_attention_layernorm -> gate/up_proj`,"
            " `up_proj -> down_proj`, `v_proj -> o_proj` where their sizes agree, which grouped-query attention"
            " breaks; BERT's `attention.self.value -> attention.output.dense`) covers it")


def _reasons(model: nn.Module, rules: Mapping[str, Sequence[str]] | None) -> str:
    """``": why the rules miss; ..."`` (the user's rules only), else ``"."``."""
    reasons = unmatched_rules(model, rules) if rules is not None else []
    return f": {'; '.join(reasons[:6])}." if reasons else "."


def _block_prefix(name: str, suffix: str) -> str | None:
    """The part of module ``name`` before ``suffix`` (its block, ending in ``.``, or
    ``""``) when ``name`` is ``suffix`` or ends with ``"." + suffix``; else ``None``."""
    if name != suffix and not name.endswith("." + suffix):
        return None
    return name[: len(name) - len(suffix)]


def _output_size(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    weight = getattr(module, "weight", None)  # a norm: LayerNorm, RMSNorm, LlamaRMSNorm, ...
    if isinstance(weight, nn.Parameter) and weight.dim() == 1:
        return weight.numel()
    return None


def _reads(layer: nn.Module | None, size: int | None) -> bool:
    return isinstance(layer, nn.Linear) and size is not None and layer.in_features == size


__all__ = ["ScaleMapping", "covering_mappings", "describe_setting", "find_mappings", "uncovered_layers", "unmatched_rules"]
