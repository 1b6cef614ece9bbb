"""Putting LoRA adapters on a model, freezing the rest, and merging them back."""

from __future__ import annotations

import warnings
from typing import Dict, List, Mapping

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_compress.core.incompatible import limited_by_type, named_by
from lightning_compress.core.targeting import (
    embeddings_untied,
    match_modules,
    select_layers,
    tied_parameter_names,
    weight_name,
)
from lightning_compress.core.transforms import Stage, install_weight_transform, raw_weight, set_forward
from lightning_compress.core.validate import ArgumentError
from lightning_compress.lora.adapter import MERGED_MARK, DropoutRNG, LoRAAdapter, adapter_of
from lightning_compress.lora.config import ADAPTABLE_TYPES, DEFAULT_TYPES, LoRAConfig
from lightning_compress.quant.nf4 import is_nf4, to_nf4, weight_nbytes

ADAPTER_PARAMETERS = ("lora_A", "lora_B")


def select_adapter_layers(model: nn.Module, config: LoRAConfig, *, check: bool = True) -> Dict[str, nn.Module]:
    """The layers ``config`` adapts; with ``check``, checked for what LoRA (and an NF4
    base) can hold (:meth:`LoRAConfig.layer_issue`).

    The default targets (every Linear layer and every ``nn.MultiheadAttention``, whose
    ``out_proj`` is a Linear: both projections of an attention layer, as PEFT adapts them
    together) leave out ``modules_to_save`` and the layers
    inside them, as PEFT users expect of a new head; a layer that ``target_modules``
    names explicitly and ``modules_to_save`` also holds is an error.

    Raises:
        ValueError: a target matches nothing (with close names), a layer both targeted and
            in ``modules_to_save``, default targets that ``modules_to_save`` leaves empty
            (an ArgumentError naming ``target_modules``); with ``check``, a grouped
            convolution, a layer smaller than the rank ``r`` (an ArgumentError naming
            ``r``), or (``base="nf4"``) a layer that is not Linear or whose size the NF4
            blocks do not divide.
    """
    layers = select_layers(
        model,
        targets=config.target_modules,
        exclude=config.exclude_modules,
        supported=ADAPTABLE_TYPES,
        default=DEFAULT_TYPES,
        argument="target_modules",
        exclude_argument="exclude_modules",
    )
    if config.modules_to_save:
        to_save = match_modules(model, config.modules_to_save, "modules_to_save")
        if config.target_modules is None:
            layers = {name: layer for name, layer in layers.items() if _saved_owner(name, to_save) is None}
            if not layers:
                raise ArgumentError(
                    "target_modules",
                    f"every layer LoRA adapts by default (each Linear and attention layer) lies in `modules_to_save`"
                    f" {list(config.modules_to_save)}, which train fully, so no layer is left to adapt; name the"
                    " layers to adapt in `target_modules`",
                )
        check_not_saved(layers, to_save)
    if check:  # used directly, not by the callback (whose compatibility check decides these)
        limited = {name: kind for name, layer in layers.items()
                   if (kind := limited_by_type(layer)) and not named_by(name, config.target_modules)}
        if limited and len(limited) == len(layers):
            shown = ", ".join(f"{n!r} ({k})" for n, k in limited.items())
            raise ValueError(f"LoRA cannot adapt any layer `target_modules` selects: {shown} are of a form it cannot"
                             " adapt (a grouped convolution, or an attention layer with separate q/k/v weights);"
                             " target other layers")
        if limited:
            warnings.warn(f"LoRA leaves {', '.join(f'{n!r} ({k})' for n, k in limited.items())} without an adapter:"
                          " layers of a form LoRA cannot adapt, selected by their type", UserWarning, stacklevel=3)
            layers = {name: layer for name, layer in layers.items() if name not in limited}
        check_adaptable(layers, config)
    return layers


def check_nf4_shardable(layers: Mapping[str, nn.Module], config: LoRAConfig, shards: int) -> None:
    """For QLoRA under FSDP2, which cuts each weight into ``shards`` row blocks: torchao's
    NF4 tensor splits only along whole scaler blocks (``nf4_block_size ·
    nf4_scaler_block_size`` values).

    Raises:
        ValueError: naming the layers that cannot be cut so, and the fix.
    """
    unit = config.nf4_block_size * config.nf4_scaler_block_size
    bad = [name for name, layer in layers.items()
           if (w := raw_weight(layer, weight_name(layer))).shape[0] % shards or w.numel() % (unit * shards)]
    if bad:
        raise ValueError(
            f"QLoRA under FSDP2 shards each NF4 base into {shards} row blocks of whole scaler blocks"
            f" (nf4_block_size·nf4_scaler_block_size = {unit} values), which {bad[:4]} cannot be cut into; lower"
            " `nf4_scaler_block_size` (or `nf4_block_size`), or leave these layers out with `exclude_modules`"
        )


def check_adaptable(layers: Dict[str, nn.Module], config: LoRAConfig) -> None:
    """Refuse the first layer LoRA cannot adapt with ``config``.

    Raises:
        ValueError: its :meth:`LoRAConfig.layer_issue` (an ArgumentError naming ``r`` for a
            layer smaller than the rank).
    """
    for name, layer in layers.items():
        issue = config.layer_issue(name, layer)
        if issue is not None:
            raise ArgumentError("r", issue.message) if issue.argument == "r" else ValueError(issue.message)


def inject_adapters(
    model: nn.Module,
    config: LoRAConfig,
    layers: Dict[str, nn.Module] | None = None,
    *,
    dropout: DropoutRNG | None = None,
    owner: str = "lora",
    active_owners: set = frozenset(),
    rival_layers: set = frozenset(),
) -> Dict[str, LoRAAdapter]:
    """Give every selected layer an adapter (``B = 0``, so outputs are unchanged), store
    its base in NF4 for ``base="nf4"``, and freeze every parameter of ``model`` except the
    adapters and ``config.modules_to_save``.

    A model that already holds adapters (an earlier Trainer's LoRA, or
    :func:`~lightning_compress.formats.peft.load_adapters`) keeps them: they are taken
    over, with their values, where they fit ``config`` (see :func:`adapters_to_keep`).
    ``active_owners``/``rival_layers``: the other LoRA callbacks of the Trainer and the
    layers they adapt; their adapters (and what they train) stay trainable.

    Everything is checked before the model is changed.
    """
    layers = select_adapter_layers(model, config) if layers is None else layers
    to_save = match_modules(model, config.modules_to_save, "modules_to_save") if config.modules_to_save else {}
    check_adaptable(layers, config)
    check_not_saved(layers, to_save)
    kept = adapters_to_keep(model, layers, config, active_owners, rival_layers)
    rivals_in = any(adapter.owner in active_owners for adapter in adapters_of(model).values())
    dropout = dropout or DropoutRNG(config.lora_dropout)
    adapters = {}
    for name, layer in layers.items():
        param = weight_name(layer)
        weight = raw_weight(layer, param)
        if config.base == "nf4" and not is_nf4(weight):
            layer._parameters[param] = nn.Parameter(
                to_nf4(weight, config.nf4_block_size, config.nf4_scaler_block_size), requires_grad=False
            )
        if name not in kept:
            LoRAAdapter.create_parameters(layer, config.r, weight.dtype)
        adapter = LoRAAdapter(layer, config.scaling, dropout, config.compute_dtype)
        install_weight_transform(layer, Stage.ADAPTER, adapter, owner=owner, active_owners=active_owners, param=param)
        if not isinstance(layer, nn.MultiheadAttention):  # it reads its weights itself: no branch to run
            set_forward(layer, adapter.forward)
        layer.__dict__.pop(MERGED_MARK, None)
        adapters[name] = adapter
    if rivals_in:  # another LoRA of this Trainer froze the rest already, and trains its own: leave those
        for parameter in _trainable(adapters, to_save):
            parameter.requires_grad_(True)
    else:
        freeze_except(model, adapters, to_save)
    return adapters


def adapters_to_keep(
    model: nn.Module, layers: Mapping[str, nn.Module], config: LoRAConfig, active_owners: set = frozenset(),
    rival_layers: set = frozenset(),
) -> Dict[str, LoRAAdapter]:
    """The adapters ``model`` already holds, outside any callback in ``active_owners`` and
    the ``rival_layers`` they adapt, that a new injection of ``layers`` with ``config``
    takes over: a second Trainer's LoRA (another training stage, or a ``validate``) goes
    on with the adapters the first one trained instead of starting new ones from ``B = 0``.

    Raises:
        ValueError: they do not fit ``config`` (another ``r``, scaling, ``base`` or NF4
            blocks), or sit on layers ``layers`` leaves out; every difference named, with
            the two fixes.
            Or a layer of ``layers`` holds an adapter of a callback in ``active_owners``.
    """
    present = adapters_of(model)
    rival = [name for name, adapter in present.items() if name in layers and adapter.owner in active_owners]
    if rival:
        raise ValueError(
            f"{', '.join(map(repr, rival[:6]))}{' ...' if len(rival) > 6 else ''} already hold an adapter of another"
            " LoRA callback in this Trainer; give the two disjoint `target_modules`/`exclude_modules`"
        )
    held = {name: adapter for name, adapter in present.items()
            if adapter.owner not in active_owners and name not in rival_layers}
    differences = [f"{name!r} has an adapter and is not among this LoRA's targets" for name in held if name not in layers]
    for name, adapter in held.items():
        weight = raw_weight(adapter.layer, adapter.param)
        settings = [("r", adapter.layer.lora_A.shape[0], config.r),
                    ("scaling (lora_alpha/r, or rsLoRA's)", adapter.scaling, config.scaling),
                    ("base", "nf4" if is_nf4(weight) else "float", config.base)]
        if is_nf4(weight) and config.base == "nf4":  # the base stays as stored: its blocks are the first stage's
            settings += [("nf4_block_size", weight.block_size, config.nf4_block_size),
                         ("nf4_scaler_block_size", weight.scaler_block_size, config.nf4_scaler_block_size)]
        differences += [f"{name!r} has {setting} {theirs!r}, this LoRA {mine!r}"
                        for setting, theirs, mine in settings if name in layers and theirs != mine]
    if differences:
        shown = "; ".join(differences[:6]) + (f"; and {len(differences) - 6} more" if len(differences) > 6 else "")
        raise ValueError(
            "the model already holds LoRA adapters (from an earlier Trainer's LoRA callback, or load_adapters), which"
            f" a new LoRA callback goes on training only where they fit its settings: {shown}. Give LoRA the"
            " settings and targets they were made with, or merge them into the weights first"
            " (lightning_compress.merge_adapters(model)) to train new adapters on top"
        )
    return held


def check_not_saved(layers: Dict[str, nn.Module], to_save: Dict[str, nn.Module]) -> None:
    """Refuse a layer that would both get an adapter and train fully.

    Raises:
        ValueError: naming the layer, ``target_modules`` and the ``modules_to_save`` entry.
    """
    for name in layers:
        kept = _saved_owner(name, to_save)
        if kept is not None:
            held = "holds it" if kept == name else f"holds {kept!r}, which contains it"
            raise ValueError(
                f"layer {name!r} is both adapted and in `modules_to_save`: `target_modules` selects it and"
                f" `modules_to_save` {held}; a module either trains fully or gets an adapter. Remove it from"
                " `target_modules` (or leave `target_modules` unset: the default targets leave out"
                " `modules_to_save`), or from `modules_to_save`"
            )


def _saved_owner(name: str, to_save: Dict[str, nn.Module]) -> str | None:
    """The ``modules_to_save`` module that is layer ``name`` or contains it, if any."""
    return next((kept for kept in to_save if name == kept or name.startswith(kept + ".")), None)


def freeze_except(model: nn.Module, adapters: Dict[str, LoRAAdapter], modules_to_save: Dict[str, nn.Module]) -> None:
    """``requires_grad`` only for adapter parameters and those of ``modules_to_save``."""
    trainable = {id(p) for p in _trainable(adapters, modules_to_save)}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in trainable)


def _trainable(adapters: Dict[str, LoRAAdapter], modules_to_save: Dict[str, nn.Module]) -> List[nn.Parameter]:
    return [p for m in modules_to_save.values() for p in m.parameters()] + [
        getattr(a.layer, n) for a in adapters.values() for n in ADAPTER_PARAMETERS]


def adapters_of(model: nn.Module) -> Dict[str, LoRAAdapter]:
    """``{layer name: adapter}`` for every layer of ``model`` that holds a LoRA adapter."""
    found = {}
    for name, module in model.named_modules():
        adapter = adapter_of(module)
        if adapter is not None:
            found[name] = adapter
    return found


def merge_adapters(model: nn.Module) -> List[str]:
    """Merge every adapter of ``model`` into its layer's weight (see
    :meth:`LoRAAdapter.merge`) and return the merged layers' names.

    Raises:
        ValueError: the model has no adapters, or they were merged already.
    """
    adapters = adapters_of(model)
    if not adapters:
        merged = [name for name, module in model.named_modules() if module.__dict__.get(MERGED_MARK)]
        if merged:
            raise ValueError(
                f"the LoRA adapters of this model are already merged (into {', '.join(merged[:5])}"
                f"{', ...' if len(merged) > 5 else ''}); merge once"
            )
        raise ValueError("this model has no LoRA adapters to merge")
    merge_into(model, adapters)
    return list(adapters)


def merge_into(model: nn.Module, adapters: Mapping[str, LoRAAdapter]) -> None:
    """Merge ``adapters`` (of layers of ``model``). A weight ``model`` shares between layers
    (``lm_head`` tied to the input embedding) is untied, never written through: the other
    layer keeps the weight it computed with. A transformers model whose head is then no
    longer its input embedding gets ``config.tie_word_embeddings = False``, so
    ``save_pretrained``/``from_pretrained`` do not tie them again (with a warning)."""
    shared = tied_parameter_names(model)
    for adapter in adapters.values():
        adapter.merge(untie=id(raw_weight(adapter.layer, adapter.param)) in shared)
    untied = [m for m in model.modules() if getattr(getattr(m, "config", None), "tie_word_embeddings", False)
              and embeddings_untied(m)]
    for module in untied:
        module.config.tie_word_embeddings = False
    if untied:
        rank_zero_warn(
            f"the output embedding of {type(untied[0]).__name__} no longer shares its input embedding's weight (the"
            " LoRA merge, or the NF4 base, gave it one of its own, so each computes as it did); its config now says"
            " tie_word_embeddings=False, so save_pretrained and from_pretrained keep both",
            category=UserWarning,
        )


def parameter_counts(model: nn.Module) -> Dict[str, float]:
    """Trainable and total parameters, the trainable share, and the bytes of the frozen
    weights (NF4 weights counted packed: codes, scales and tables)."""
    parameters = list(model.parameters())
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    total = sum(p.numel() for p in parameters)
    frozen_bytes = sum(weight_nbytes(p) for p in parameters if not p.requires_grad)
    return {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable / max(total, 1),
        "base_weight_bytes": frozen_bytes,
    }
