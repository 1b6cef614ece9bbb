"""Choosing which layers a callback compresses.

A target is either a layer type (``nn.Linear``) or a glob over fully-qualified module
names (``"encoder.*.ffn.*"``). A glob matches the whole name or a trailing part of it, so
``"query"`` selects ``encoder.layer.0.attention.self.query`` as PEFT's
``target_modules`` does. A glob that selects nothing is an error listing close names:
a typo must never silently compress nothing.

A selection is keyed by *weight key*: the module's name for a layer that has one
compressed weight (``weight``, or ``in_proj_weight`` of an attention layer), and
``<module>.<parameter>`` for each weight of a layer that has several, each compressed on
its own grid and mask: the matrices of a recurrent layer (``rnn.weight_ih_l0``,
``rnn.weight_hh_l0``, ...) and the separate query/key/value projections of an attention
layer whose key or value width differs from its query's (``cross.q_proj_weight``). A glob
in ``targets`` or ``exclude`` may name one such weight. :func:`weight_param` and
:func:`module_name` read a key back.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple, Type, Union

import torch
from torch import nn

from lightning_compress.core.attention import IN_PROJ, compressible_attention
from lightning_compress.core.validate import ArgumentError

Target = Union[str, Type[nn.Module]]

RECURRENT_TYPES = (nn.RNN, nn.LSTM, nn.GRU)
# The weights of layers that have several: weight_ih_l0, weight_hh_l1_reverse, weight_hr_l0
# (an LSTM's projection) of a recurrent layer, and q/k/v_proj_weight of an attention layer
# whose key and value widths differ from its query's (biases stay float, as every layer's).
_SEVERAL_WEIGHTS = re.compile(r"weight_(?:ih|hh|hr)_l\d+(?:_reverse)?|[qkv]_proj_weight")
SEPARATE_PROJECTIONS = ("q_proj_weight", "k_proj_weight", "v_proj_weight")


def validate_targets(
    argument: str, targets: Sequence[Target] | None, supported: Tuple[type, ...]
) -> Tuple[Target, ...] | None:
    """Check a ``targets``/``exclude`` argument at ``__init__`` time.

    Raises:
        ArgumentError: naming ``argument`` for an entry that is neither a non-empty string
            nor a supported layer type.
    """
    if targets is None:
        return None
    if isinstance(targets, (str, type)):
        targets = [targets]
    if not isinstance(targets, (list, tuple)):
        raise ArgumentError(
            argument,
            f"`{argument}` must be a list of layer types or name globs, got {type(targets).__name__}"
        )
    for target in targets:
        if isinstance(target, str):
            if not target.strip():
                raise ArgumentError(argument, f"`{argument}` has an empty name pattern; remove it")
        elif isinstance(target, type) and issubclass(target, nn.Module):
            if not issubclass(target, supported):
                names = ", ".join(t.__name__ for t in supported)
                raise ArgumentError(
                    argument,
                    f"`{argument}` names the layer type {target.__name__}, which this method"
                    f" cannot compress; supported types: {names}"
                )
        else:
            raise ArgumentError(
                argument,
                f"`{argument}` entries must be layer types or name globs, got {target!r}"
            )
    return tuple(targets)


def validate_name(name: str | None) -> str | None:
    """Check a callback's optional ``name`` (it keys the callback's checkpoint state)."""
    if name is not None and (not isinstance(name, str) or not name):
        raise ArgumentError("name", f"`name` must be a non-empty string or None, got {name!r}")
    return name


def select_layers(
    root: nn.Module,
    *,
    targets: Sequence[Target] | None,
    exclude: Sequence[Target] | None,
    supported: Tuple[type, ...],
    default: Tuple[type, ...],
    argument: str = "targets",
    exclude_argument: str = "exclude",
) -> Dict[str, nn.Module]:
    """Return ``{qualified name: layer}`` for the layers a callback should compress.

    Args:
        root: the LightningModule (names are relative to it).
        targets: types or globs; ``None`` selects every layer of the ``default`` types.
        exclude: types or globs removed from the selection.
        supported: the layer types the method can compress; anything else is skipped by
            type targets and rejected when a glob selects only unsupported layers.
        default: the types chosen when ``targets`` is ``None``.

    Raises:
        ValueError: a glob matches no layer (with close names), a glob matches only
            layers of unsupported types, or nothing at all is selected.
    """
    named = [(name, module) for name, module in root.named_modules() if name]
    candidates = {name: module for name, module in named if _compressible(module, supported)}
    # The weights of layers that have several (a recurrent layer's matrices), by weight key:
    # a glob may name one of them, in `targets` and in `exclude`.
    matrices = [(key, module) for name, module in candidates.items() for key in layer_weights(name, module)
                if key != name]
    pool = named + matrices

    if targets is None:
        selected = {n: m for n, m in candidates.items() if isinstance(m, default)}
    else:
        selected = {}
        for target in targets:
            matches = _match(target, pool)
            if isinstance(target, str):
                if not matches:
                    raise ValueError(_no_match_message(argument, target, pool, root))
                usable = {n: m for n, m in matches.items() if n in candidates or (n, m) in matrices}
                if not usable:
                    kinds = sorted({type(m).__name__ for m in matches.values()})
                    raise ValueError(
                        f"`{argument}` pattern {target!r} matches only layers of unsupported"
                        f" types ({', '.join(kinds)}); supported:"
                        f" {', '.join(t.__name__ for t in supported)}"
                    )
                selected.update(usable)
            else:
                selected.update({n: m for n, m in matches.items() if n in candidates})

    for pattern in exclude or ():
        matches = _match(pattern, pool)
        if isinstance(pattern, str) and not matches:
            raise ValueError(_no_match_message(exclude_argument, pattern, pool, root))
        for name in matches:
            selected.pop(name, None)
            for key in layer_weights(name, matches[name]) if name in candidates else ():
                selected.pop(key, None)

    # Model order, so reports and checkpoints list layers as the model defines them; a
    # layer with several weights as one entry per weight (see the module docstring).
    keyed: Dict[str, nn.Module] = {}
    for name, module in named:
        for key in layer_weights(name, module) if name in candidates else ():
            if key in selected or name in selected and key not in _excluded_keys(name, module, exclude, pool):
                keyed[key] = module
    if not keyed:
        later = _later_hint(root)
        others = uncompressed_by_type(root, tuple(supported))
        kinds = sorted(set(others.values()))
        unsupported = (f" Its other layers with weights are of types this method does not compress: {', '.join(kinds)}"
                       f" ({', '.join(map(repr, list(others)[:3]))}{', ...' if len(others) > 3 else ''})"
                       + (f": {CONV1D_NOTE}." if "Conv1D" in kinds else ".")) if others else ""
        raise ValueError(
            f"`{argument}` selects no layer of {type(root).__name__}"
            f" (supported types: {', '.join(t.__name__ for t in supported)})."
            f" Check `{argument}` and `{exclude_argument}`.{later}{unsupported}"
        )
    return keyed


# Why GPT-2 is left out: its projections are transformers' Conv1D.
CONV1D_NOTE = ("transformers' Conv1D (GPT-2's projections) is a Linear with a transposed weight, which this package does"
               " not compress yet")


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


def _later_hint(root: nn.Module) -> str:
    """Why a layer may be missing at setup, where ``root`` builds some in ``configure_model``."""
    if not _builds_later(root):
        return ""
    return (" If `configure_model` builds the layers, they are not there yet when the callbacks set up: build"
            " them in `__init__` (`configure_model` may shard them).")


def _builds_later(root: nn.Module) -> bool:
    """Whether ``root`` is a LightningModule with a ``configure_model`` of its own."""
    from lightning.pytorch import LightningModule

    return isinstance(root, LightningModule) and type(root).configure_model is not LightningModule.configure_model


def _excluded_keys(name: str, module: nn.Module, exclude: Sequence[Target] | None, pool) -> set:
    """The weight keys of layer ``name`` that an ``exclude`` glob names one by one."""
    keys = set(layer_weights(name, module)) - {name}
    return {key for pattern in exclude or () if isinstance(pattern, str) for key in _match(pattern, pool) if key in keys}


def weight_name(layer: nn.Module) -> str:
    """The parameter a method compresses on a layer that has one: ``in_proj_weight`` for
    an ``nn.MultiheadAttention`` (query, key and value projections in one; its
    ``out_proj`` is a Linear of its own), ``weight`` for every other layer but recurrent
    ones (see :func:`weight_param`)."""
    return IN_PROJ if isinstance(layer, nn.MultiheadAttention) else "weight"


def layer_weights(name: str, layer: nn.Module) -> Dict[str, str]:
    """``{weight key: parameter name}`` of the weights a method compresses on ``layer``
    (named ``name``): one for most layers, every weight matrix of a recurrent one."""
    prefix = f"{name}." if name else ""
    if isinstance(layer, nn.RNNBase):
        return {prefix + param: param for param in layer._flat_weights_names if _SEVERAL_WEIGHTS.fullmatch(param)}
    if _separate_projections(layer):
        return {prefix + param: param for param in SEPARATE_PROJECTIONS}
    return {name: weight_name(layer)}


def is_recurrent_weight(param: str) -> bool:
    """Whether ``param`` names one of several weights of a layer: a weight matrix of a
    recurrent layer (``weight_hh_l0``), or a separate projection of an attention layer
    (``q_proj_weight``); such a weight's key is ``<layer>.<param>``."""
    return bool(_SEVERAL_WEIGHTS.fullmatch(param))


def weight_param(key: str, layer: nn.Module) -> str:
    """The parameter of ``layer`` that the weight key ``key`` stands for."""
    if isinstance(layer, nn.RNNBase) or _separate_projections(layer):
        return key.rpartition(".")[2]
    return weight_name(layer)


def module_name(key: str, param: str) -> str:
    """The name of the module that holds the weight ``key`` (whose parameter is ``param``)."""
    if is_recurrent_weight(param):
        return key[: -len(param)].rstrip(".")
    return key


def _separate_projections(layer: nn.Module) -> bool:
    """An ``nn.MultiheadAttention`` whose query, key and value projections are separate
    weights (its key or value width differs from its query's)."""
    return isinstance(layer, nn.MultiheadAttention) and all(
        isinstance(layer._parameters.get(param), torch.Tensor) for param in SEPARATE_PROJECTIONS)


def shared_module_names(model: nn.Module) -> Dict[str, str]:
    """``{name: first name}`` for every module registered under more than one name (a
    layer reused by reference, e.g. ``nn.ModuleList([block] * n)``): each later name maps
    to the name ``named_modules()`` lists it under, which is the one compression uses.
    Modules below a shared one are shared too, and are listed."""
    first: Dict[int, str] = {}
    shared: Dict[str, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        known = first.setdefault(id(module), name)
        if known != name:
            shared[name] = known
    return shared


def first_registration(key: str, shared: Mapping[str, str]) -> str:
    """The state-dict ``key`` under the first name of its module (``key`` itself when its
    module has one name); ``shared`` is :func:`shared_module_names`."""
    module, dot, leaf = key.rpartition(".")
    return f"{shared[module]}.{leaf}" if dot and module in shared else key


def names_of(name: str, shared: Mapping[str, str]) -> List[str]:
    """``name`` and the other names of the module registered under it (``shared`` is
    :func:`shared_module_names`), ``name`` first."""
    first = shared.get(name, name)
    return [name, *(other for other in [first, *shared] if other != name and shared.get(other, other) == first)]


def tied_parameter_names(model: nn.Module) -> Dict[int, List[str]]:
    """``{id(parameter): its names}`` for each parameter that several modules hold (tied
    weights: a head and the input embedding). A module registered under several names is
    one module: only its first name counts (:func:`shared_module_names`)."""
    shared = shared_module_names(model)
    names: Dict[int, List[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if first_registration(name, shared) == name:
            names.setdefault(id(parameter), []).append(name)
    return {identity: group for identity, group in names.items() if len(group) > 1}


def input_and_output_embeddings(model: nn.Module) -> Tuple[nn.Module, nn.Module] | None:
    """A transformers ``model``'s (input embedding, head), or ``None`` when it has not both
    (no such accessors, one returns ``None``, or the base class's ``NotImplementedError``)."""
    try:
        pair = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return pair if all(isinstance(layer, nn.Module) for layer in pair) else None


def embeddings_untied(model: nn.Module) -> bool:
    """Whether a transformers ``model``'s head holds another weight than its input embedding
    (they may have been tied, then split by an NF4 base or a LoRA merge)."""
    pair = input_and_output_embeddings(model)
    return pair is not None and pair[0]._parameters.get("weight") is not pair[1]._parameters.get("weight")


def parameter_key(key: str, param: str) -> str:
    """The state-dict key of the weight ``key``: ``<module>.<param>``."""
    module = module_name(key, param)
    return f"{module}.{param}" if module else param


def _compressible(module: nn.Module, supported: Tuple[type, ...]) -> bool:
    if isinstance(module, nn.MultiheadAttention):
        return isinstance(module, supported) and (compressible_attention(module) or _separate_projections(module))
    if isinstance(module, nn.RNNBase):
        return isinstance(module, supported) and any(map(is_recurrent_weight, module._flat_weights_names))
    return isinstance(module, supported) and module._parameters.get("weight") is not None


def name_matches(name: str, pattern: str) -> bool:
    """Whether the name pattern ``pattern`` (of ``targets``, ``exclude``, ``overrides``)
    selects module ``name``: the whole name or its last dot-separated parts, literally
    (a name holding ``[``, ``]``, ``?`` or ``*``, as the names an error message suggests
    do) or as an ``fnmatch`` glob."""
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern) \
        or fnmatch.fnmatchcase(name, "*." + pattern)


def _match(target: Target, named: Iterable[Tuple[str, nn.Module]]) -> Dict[str, nn.Module]:
    if isinstance(target, str):
        return {n: m for n, m in named if name_matches(n, target)}
    return {n: m for n, m in named if isinstance(m, target)}


def close_names_hint(name: str, names: Sequence[str]) -> str:
    """" Close names: ... Module names look like: ..." for an error about ``name``."""
    # Compare against whole names and their last components ("qurey" vs "query").
    if not names:
        return " The model has no submodules."
    pool = sorted(set(names) | {n.rsplit(".", 1)[-1] for n in names})
    close = difflib.get_close_matches(name, pool, n=5, cutoff=0.5)
    hint = f" Close names: {', '.join(close)}." if close else ""
    sample = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return f"{hint} Module names look like: {sample}"


def _no_match_message(argument: str, pattern: str, named: Iterable[Tuple[str, nn.Module]], root: nn.Module) -> str:
    shared = shared_module_names(root)
    later = [name for name in shared if _match(pattern, [(name, None)])]
    if later:  # named_modules() lists a module registered under several names once, under the first
        first = shared[later[0]]
        return (f"`{argument}` pattern {pattern!r} matches only {later[0]!r}, another name of {first!r} (one module"
                f" registered under both names); a shared module is compressed as one, wherever it is used: name"
                f" {first!r}")
    return (f"`{argument}` pattern {pattern!r} matches no module." + close_names_hint(pattern, [n for n, _ in named])
            + _later_hint(root))


def match_modules(root: nn.Module, patterns: Sequence[str], argument: str) -> Dict[str, nn.Module]:
    """``{name: module}`` for the modules whose names match any glob in ``patterns``.

    Raises:
        ValueError: a pattern matches no module (naming ``argument`` and close names).
    """
    named = [(name, module) for name, module in root.named_modules() if name]
    selected: Dict[str, nn.Module] = {}
    for pattern in patterns:
        matches = _match(pattern, named)
        if not matches:
            raise ValueError(_no_match_message(argument, pattern, named, root))
        selected.update(matches)
    return selected
