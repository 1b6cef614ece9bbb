"""What a stack of callbacks leaves untouched, or touches beyond its targets, said at setup.

Layers whose weights a method on its default targets does not compress because of their
type (transformers' ``Conv1D``, the projections of GPT-2; ``nn.ConvTranspose2d``;
``nn.Bilinear``) stay float and dense, and "QAT on GPT-2" would quantize only its
``lm_head`` without a word: a warning names them before the first step.
:func:`shared_weights` finds a pruned weight that another module shares (a tied
``lm_head`` and input embedding), which pruning may not zero (:func:`tied_weight_issues`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Set

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_compress.core.incompatible import LayerIssue
from lightning_compress.core.targeting import CONV1D_NOTE, module_name, tied_parameter_names, uncompressed_by_type
from lightning_compress.core.targeting import weight_param
from lightning_compress.core.transforms import raw_weight

# Sections whose default targets mean "every layer we can compress".
_EVERY_LAYER_SECTIONS = ("qat", "pruning")
_SHOWN = 4


def warn_about_coverage(callbacks: Sequence[Any], model: nn.Module) -> None:
    """Warn (rank zero) about the layers of ``model`` that the default targets of QAT and
    pruning leave out by type."""
    for callback in callbacks:
        section = getattr(callback, "section", None)
        if section in _EVERY_LAYER_SECTIONS and callback.uses_default_targets():
            left = uncompressed_by_type(model, callback.config.supported_types)
            if left:
                rank_zero_warn(f"{type(callback).__name__} (default targets) leaves in float the layers of types it does"
                               f" not compress: {_by_type(left)}. {_hint(left)}", category=UserWarning)


def shared_weights(model: nn.Module, layers: Dict[str, nn.Module]) -> Dict[str, List[str]]:
    """``{weight key: [other parameter names]}`` for each selected weight that modules
    outside the selection also hold (the same parameter object). The other names of the
    selected module itself (a module registered twice, as in ``nn.ModuleList([block] * n)``)
    are not listed: that module is the one pruned, wherever it is used."""
    by_id = tied_parameter_names(model)
    selected_modules = {module_name(key, weight_param(key, layer)) for key, layer in layers.items()}
    shared = {}
    for key, layer in layers.items():
        param = weight_param(key, layer)
        owner = module_name(key, param)
        others = [name for name in by_id.get(id(raw_weight(layer, param)), [])
                  if name.rpartition(".")[0] not in selected_modules and name != f"{owner}.{param}"]
        if others:
            shared[key] = others
    return shared


def tied_weight_issues(model: nn.Module, layers: Dict[str, nn.Module], adapted: Set[str],
                       targets: Any = None) -> Dict[str, LayerIssue]:
    """``{name: issue}`` for each of the pruned ``layers`` whose weight a module outside
    them shares (a head tied to the input embedding, ``tie_word_embeddings=True``): the mask
    would act on the layer alone in training, then its zeros in the shared weight would
    prune the other module after fit, a model other than the one trained and validated. A
    layer with a LoRA adapter (``adapted``) is fine: its mask acts on ``W + B·A`` and leaves
    ``W`` as it is (an NF4 base even gives the layer a weight of its own). ``targets``: the
    pruning callback's, which selected the layer (named in the issue)."""
    shared = shared_weights(model, {name: layer for name, layer in layers.items() if name not in adapted})
    return {
        name: LayerIssue("targets", targets, f"layer {name!r} shares its weight with {', '.join(map(repr, others))}"
                         " (one parameter, as tie_word_embeddings=True makes of a transformers head and its input"
                         " embedding): the mask's zeros would prune that too, after training it dense; leave the layer"
                         " out, untie the weights before training, or put a LoRA adapter on the layer (its mask then"
                         " acts on W + B·A)")
        for name, others in shared.items()
    }


def _by_type(left: Dict[str, str]) -> str:
    groups: Dict[str, List[str]] = {}
    for name, kind in left.items():
        groups.setdefault(kind, []).append(name)
    parts = []
    for kind, names in groups.items():
        more = f", ... ({len(names)} in all)" if len(names) > _SHOWN else ""
        parts.append(f"{kind} ({', '.join(map(repr, names[:_SHOWN]))}{more})")
    return "; ".join(parts)


def _hint(left: Dict[str, str]) -> str:
    if "Conv1D" in left.values():
        return f"{CONV1D_NOTE}; see the README's support matrix"
    return "See the README's support matrix for the layer types each method compresses"


__all__ = ["shared_weights", "uncompressed_by_type", "warn_about_coverage"]
