"""What a stack of callbacks leaves untouched, or touches beyond its targets, said at setup.

Two things a user would not see otherwise, each one warning before the first step:

- layers whose weights a method on its default targets does not compress because of
  their type (transformers' ``Conv1D``, the projections of GPT-2; ``nn.ConvTranspose2d``;
  ``nn.Bilinear``): they stay float and dense, and "QAT on GPT-2" would quantize only its
  ``lm_head`` without a word;
- a pruned weight that another module shares (a tied ``lm_head`` and input embedding):
  pruning zeroes the shared parameter, so the module that was not targeted is pruned too.
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
    pruning leave out by type, and about pruned weights that other modules share."""
    for callback in callbacks:
        section = getattr(callback, "section", None)
        if section in _EVERY_LAYER_SECTIONS and callback.uses_default_targets():
            left = uncompressed_by_type(model, callback.config.supported_types)
            if left:
                rank_zero_warn(f"{type(callback).__name__} (default targets) leaves in float the layers of types it does"
                               f" not compress: {_by_type(left)}. {_hint(left)}", category=UserWarning)
        if section == "pruning":
            try:
                layers = callback.select(model) or {}
            except ValueError:  # bad targets: the callback's own setup says so
                continue
            shared = shared_weights(model, layers)
            if shared:
                listed = "; ".join(f"{key!r} is also {', '.join(map(repr, others))}" for key, others in shared.items())
                rank_zero_warn(f"{type(callback).__name__} prunes weights other modules share (tied): {listed}. Pruning"
                               " zeroes the shared parameter, so those modules are pruned too; untie them, or exclude"
                               " the layer", category=UserWarning)


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
