"""How PEFT's adapter format holds LoRA on an ``nn.MultiheadAttention``.

PEFT adapts an attention layer's two projections together, and only so (its
``target_modules`` names the attention layer ``attn``): ``attn.lora_A.weight`` ``[r, E]`` /
``attn.lora_B.weight`` ``[3E, r]`` adapt its ``in_proj_weight``, and
``attn.base_layer.out_proj.lora_A.weight`` / ``lora_B.weight`` its ``out_proj``. Here they are
the adapters on ``attn`` and on ``attn.out_proj``. A model that adapts one of the two without
the other has no PEFT form (:func:`peft_unpaired`), and an adapter PEFT puts on
``attn.out_proj`` alone is never applied there (the attention layer reads that weight, it
does not call the module), so neither is written or read.

Both sides mean ``W + scaling · B·A`` on each projection (PEFT's ``get_delta_weight``). PEFT
0.21.2 adds the out_proj delta twice in its forward and merge (huggingface/peft PR #3774),
so until a PEFT with that fix a ``PeftModel`` computes such a file differently from this
package: :func:`warn_out_proj_delta` says so whenever one is written or read.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Iterable, List, Tuple

from torch import nn

from lightning_compress.core.attention import compressible_attention, out_proj_owner

PEFT_OUT_PROJ = "base_layer.out_proj"  # PEFT's name of an adapted attention layer's out_proj, under it


def peft_unpaired(model: nn.Module, names: Iterable[str]) -> Dict[str, str]:
    """``{layer: why}`` for the layers among ``names`` (adapted, or to be adapted, under
    ``model``) that PEFT's format cannot hold: an ``nn.MultiheadAttention`` whose
    ``out_proj`` is not among them, and the ``out_proj`` of one that is not."""
    chosen = list(names)
    found = {}
    for name in chosen:
        if isinstance(model.get_submodule(name), nn.MultiheadAttention):
            out_proj = join(name, "out_proj")
            if out_proj not in chosen:
                found[name] = (
                    f"attention layer {name!r} is adapted (its in_proj_weight) but its output projection {out_proj!r}"
                    " is not; PEFT adapts both projections of an nn.MultiheadAttention together and has no form for"
                    f" one alone. Adapt {out_proj!r} too (add it to `target_modules`), or leave {name!r} out"
                    " (`exclude_modules`)"
                )
            continue
        owner = out_proj_owner(model, name)
        if owner is not None and owner not in chosen:
            why = ("which has separate q/k/v weights that neither LoRA nor PEFT adapts; leave"
                   if not compressible_attention(model.get_submodule(owner)) else f"Adapt {owner!r} too, or leave")
            found[name] = (
                f"layer {name!r} is the output projection of the nn.MultiheadAttention {owner!r}, which is not adapted;"
                " PEFT adapts an attention layer's out_proj only together with its in_proj_weight (an adapter PEFT"
                f" puts on the out_proj alone is never applied: the attention layer reads that weight). {why}"
                f" {name!r} out (`exclude_modules`)"
            )
    return found


def to_peft_names(model: nn.Module, names: Iterable[str]) -> Tuple[Dict[str, str], List[str]]:
    """``({our layer name: PEFT's}, the names PEFT's target_modules selects)`` for the
    adapted ``names`` (paired: see :func:`peft_unpaired`)."""
    renamed, targets = {}, []
    for name in names:
        owner = out_proj_owner(model, name)
        renamed[name] = join(owner, PEFT_OUT_PROJ) if owner is not None else name
        if owner is None:
            targets.append(name)
    return renamed, targets


def from_peft_names(pairs: Dict[str, Any], model: nn.Module, named: Dict[str, nn.Module]):
    """``pairs`` (``{PEFT layer name: tensors}``) keyed by our layer names, and
    ``{our out_proj name: its attention layer}`` (the name PEFT's ``target_modules``
    selects).

    Raises:
        ValueError: an adapter on an attention layer's ``out_proj`` alone (PEFT never
            applies it), or one projection of an attention layer without the other.
    """
    renamed, targeted_as = {}, {}
    for name, pair in pairs.items():
        owner = _peft_out_proj_owner(name, named)
        if owner is not None:
            ours = join(owner, "out_proj")
            renamed[ours], targeted_as[ours] = pair, owner
            continue
        owner = out_proj_owner(model, name) if name in named else None
        if owner is not None:
            raise ValueError(
                f"the file holds an adapter for {name!r}, the out_proj of the nn.MultiheadAttention {owner!r}; PEFT"
                " never applies an adapter on an attention layer's out_proj alone (the attention layer reads that"
                " weight, it does not call the module), so loading it would change what the model computes. In PEFT,"
                f" target the attention layer {owner!r}, which adapts both of its projections"
            )
        renamed[name] = pair
    for name, layer in named.items():
        if isinstance(layer, nn.MultiheadAttention) and (name in renamed) != (join(name, "out_proj") in renamed):
            own, out = "lora_A/B", f"{PEFT_OUT_PROJ}.lora_A/B"
            has, lacks = (own, out) if name in renamed else (out, own)
            raise ValueError(f"attention layer {name!r} has {has} tensors but no {lacks}; PEFT writes both"
                             " projections of an attention layer, the file is incomplete")
    return renamed, targeted_as


def warn_out_proj_delta(attention: List[str], action: str) -> None:
    """Warn that PEFT 0.21.2 computes the out_proj adapters of ``attention`` (layer names)
    differently (see the module docstring); ``action``: what is done with the file."""
    if attention:
        shown = ", ".join(repr(n) for n in attention[:3]) + (", ..." if len(attention) > 3 else "")
        warnings.warn(
            f"{action} adapters of nn.MultiheadAttention layers ({shown}): this package and the format compute each"
            " out_proj as W + scaling·B·A, but PEFT up to at least 0.21.2 adds that delta twice in a PeftModel's"
            " forward and merge (huggingface/peft PR #3774), so its outputs differ until your PEFT has that fix",
            UserWarning, stacklevel=3,
        )


def join(*parts: str) -> str:
    """A module name from its parts (the root's name is empty)."""
    return ".".join(part for part in parts if part)


def _peft_out_proj_owner(name: str, named: Dict[str, nn.Module]) -> str | None:
    """The attention layer whose out_proj PEFT names ``name`` (``<attn>.base_layer.out_proj``)."""
    owner, found, rest = name.rpartition(PEFT_OUT_PROJ)
    if rest or not found or (owner and not owner.endswith(".")):
        return None
    owner = owner[:-1]
    return owner if isinstance(named.get(owner), nn.MultiheadAttention) else None
