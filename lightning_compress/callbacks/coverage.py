"""What a stack of callbacks leaves untouched, or touches beyond its targets, said at setup.

Layers whose weights a method on its default targets does not compress because of their
type (transformers' ``Conv1D``, the projections of GPT-2; ``nn.ConvTranspose2d``;
``nn.Bilinear``) stay float and dense, and "QAT on GPT-2" would quantize only its
``lm_head`` without a word: a warning names them before the first step.
:func:`shared_weights` finds a pruned weight that another module shares (a tied
``lm_head`` and input embedding), which ``MagnitudePruning`` refuses.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_compress.core.targeting import module_name, tied_parameter_names, weight_param
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


def uncompressed_by_type(model: nn.Module, supported: tuple) -> Dict[str, str]:
    """``{name: type}`` of the modules that hold a floating weight of 2 or more dimensions
    of their own and are not of a ``supported`` type (or inside one)."""
    found: Dict[str, str] = {}
    covered: List[str] = []
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(module, supported):
            covered.append(name + ".")
            continue
        own = [p for p in module._parameters.values() if p is not None and p.is_floating_point() and p.dim() >= 2]
        if own and not any(name.startswith(prefix) for prefix in covered):
            found[name] = type(module).__name__
    return found


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


def refuse_shared_weights(model: nn.Module, layers: Dict[str, nn.Module]) -> None:
    """Refuse to prune a weight that a module outside ``layers`` shares (a head tied to the
    input embedding, ``tie_word_embeddings=True``): the mask would act on the head alone in
    training, then its zeros in the shared weight would prune the embedding after fit, a
    model other than the one trained and validated.

    Raises:
        ValueError: naming each such layer, the modules sharing its weight and the fix.
    """
    shared = shared_weights(model, layers)
    if shared:
        listed = "; ".join(f"{key!r} is also {', '.join(map(repr, others))}" for key, others in shared.items())
        first = next(iter(shared)).rpartition(".")[2]
        raise ValueError(
            f"MagnitudePruning would prune weights other modules share (tied, as tie_word_embeddings=True makes them):"
            f" {listed}. Its zeros would prune those modules too, after training them dense; add {first!r} to"
            " `exclude` (recipe key pruning.exclude), or untie the weights before training"
        )


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
        return ("transformers' Conv1D (GPT-2's projections) is a Linear with a transposed weight, which this package"
                " does not compress yet; see the README's support matrix")
    return "See the README's support matrix for the layer types each method compresses"


__all__ = ["shared_weights", "uncompressed_by_type", "warn_about_coverage"]
