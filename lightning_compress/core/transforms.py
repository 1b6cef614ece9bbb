"""The one stack of weight transforms that every compression method writes into.

A layer's effective weight is

    effective_weight = fake_quant( mask ⊙ (W + scale · B·A) )
                       FAKE_QUANT  MASK     ADAPTER

Each method owns one :class:`Stage`; the stages always run in that order, whatever the
order the callbacks were listed in, so methods compose instead of fighting.

How: the layer's class is swapped for a cached subclass whose ``weight`` is a property
that runs the stack over the raw parameter. The raw parameter stays in
``layer._parameters["weight"]``, so ``state_dict`` keys, ``named_parameters`` (and so the
optimizer and DDP) see the user's parameter under its own name, and any code that reads
``layer.weight`` (the layer's own ``forward``, or a parent such as
``nn.MultiheadAttention`` that reads ``out_proj.weight``) gets the effective weight. This
is the mechanism of ``torch.nn.utils.parametrize``, minus its renaming of the parameter.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Dict, Type

from torch import Tensor, nn

WeightTransform = Callable[[Tensor], Tensor]

_TRANSFORMS_ATTR = "_lc_weight_transforms"
_FORWARD_ATTR = "_lc_forward"
_TRANSFORMED_CLASSES: Dict[type, type] = {}


class Stage(enum.IntEnum):
    """Canonical position of a transform in the stack: lower runs first."""

    ADAPTER = 10  # W + scale · B·A  (LoRA)
    MASK = 20  # mask ⊙ W          (pruning)
    FAKE_QUANT = 30  # fake_quant(W) (QAT)


def raw_weight(layer: nn.Module) -> nn.Parameter:
    """The trainable parameter ``W`` under the stack (what the optimizer updates)."""
    return layer._parameters["weight"]


def is_transformed(layer: nn.Module) -> bool:
    return type(layer) in _TRANSFORMED_CLASSES.values()


def add_weight_transform(layer: nn.Module, stage: Stage, transform: WeightTransform) -> None:
    """Put ``transform`` at ``stage`` of ``layer``'s stack.

    Raises:
        ValueError: if another transform already holds that stage of this layer (two
            callbacks of the same method targeting one layer).
    """
    if "weight" not in layer._parameters or layer._parameters["weight"] is None:
        raise ValueError(f"{type(layer).__name__} has no `weight` parameter to transform")
    transforms = _transforms(layer)
    if stage in transforms:
        raise ValueError(
            f"stage {stage.name} of this {type(layer).__name__} is already taken; two callbacks"
            " of the same kind target the same layer. Give them disjoint `targets`/`exclude`."
        )
    if not is_transformed(layer):
        layer.__class__ = _transformed_class(type(layer))
    transforms[stage] = transform
    _sort(layer)


def get_weight_transform(layer: nn.Module, stage: Stage) -> WeightTransform | None:
    return layer.__dict__.get(_TRANSFORMS_ATTR, {}).get(stage)


def remove_weight_transform(layer: nn.Module, stage: Stage) -> None:
    """Remove ``stage`` from the stack; with nothing left the layer gets its own class back."""
    transforms = layer.__dict__.get(_TRANSFORMS_ATTR)
    if not transforms or stage not in transforms:
        return
    del transforms[stage]
    if transforms:
        _sort(layer)
        return
    del layer.__dict__[_TRANSFORMS_ATTR]
    layer.__dict__.pop(_FORWARD_ATTR, None)
    layer.__class__ = _original_class(type(layer))


def weight_before(layer: nn.Module, stage: Stage) -> Tensor:
    """The weight as it enters ``stage``: the raw parameter with earlier stages applied.

    Pruning scores the merged ``W + B·A`` this way, and QAT quantizes the masked weight.
    """
    return run_stages(layer, raw_weight(layer), after=None, before=stage)


def run_stages(layer: nn.Module, weight: Tensor, *, after: Stage | None, before: Stage | None) -> Tensor:
    """Apply ``layer``'s stages strictly between ``after`` and ``before`` to ``weight``.

    ``None`` leaves that end open. LoRA's merge uses it to mask a weight it merged itself.
    """
    for transform_stage, transform in layer.__dict__.get("_lc_sorted", ()):
        if before is not None and transform_stage >= before:
            break
        if after is None or transform_stage > after:
            weight = transform(weight)
    return weight


def stages(layer: nn.Module) -> tuple:
    """The stages present in ``layer``'s stack, in the order they run."""
    return tuple(stage for stage, _ in layer.__dict__.get("_lc_sorted", ()))


def set_forward(layer: nn.Module, forward: Callable[..., Any] | None) -> None:
    """Make a transformed ``layer`` compute its output with ``forward(*args, **kwargs)``.

    For a stage that has a cheaper exact form than transforming the weight: a LoRA
    adapter computes ``W x + scale · B(A x)`` instead of ``(W + scale · B·A) x``, which
    skips the full-size weight gradient. ``layer.weight`` still runs the stack, so code
    that reads the weight directly (``nn.MultiheadAttention``, tied weights) sees the
    effective weight. ``None`` restores the layer's own forward.
    """
    if forward is None:
        layer.__dict__.pop(_FORWARD_ATTR, None)
        return
    if not is_transformed(layer):
        raise ValueError(f"set_forward needs a layer with a weight transform, got {type(layer).__name__}")
    layer.__dict__[_FORWARD_ATTR] = forward


def own_forward(layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Run the forward of ``layer``'s own class (which reads the effective ``weight``)."""
    return _original_class(type(layer)).forward(layer, *args, **kwargs)


def _transforms(layer: nn.Module) -> Dict[Stage, WeightTransform]:
    if _TRANSFORMS_ATTR not in layer.__dict__:
        layer.__dict__[_TRANSFORMS_ATTR] = {}
    return layer.__dict__[_TRANSFORMS_ATTR]


def _sort(layer: nn.Module) -> None:
    # Kept as a tuple so the hot path (`weight` on every forward) does no sorting.
    layer.__dict__["_lc_sorted"] = tuple(sorted(_transforms(layer).items()))


def _effective_weight(self: nn.Module) -> Tensor:
    weight = self._parameters["weight"]
    for _, transform in self.__dict__["_lc_sorted"]:
        weight = transform(weight)
    return weight


def _original_class(cls: type) -> type:
    for base, transformed in _TRANSFORMED_CLASSES.items():
        if transformed is cls:
            return base
    return cls


def _new_transformed(base: type) -> nn.Module:
    return object.__new__(_transformed_class(base))


def _reduce_ex(self: nn.Module, protocol: int):
    # Pickle (torch.save(model), ddp_spawn) and deepcopy rebuild the cached subclass from
    # its importable base instead of failing on a class that has no module-level name.
    state = self.__getstate__() if hasattr(self, "__getstate__") else self.__dict__
    return (_new_transformed, (_original_class(type(self)),), state)


def _transformed_class(base: Type[nn.Module]) -> type:
    if base not in _TRANSFORMED_CLASSES:
        base_forward = base.forward

        def forward(self, *args, **kwargs):
            override = self.__dict__.get(_FORWARD_ATTR)
            if override is not None:
                return override(*args, **kwargs)
            return base_forward(self, *args, **kwargs)

        # Same name as the base so `print(model)` and summaries look as the user expects.
        _TRANSFORMED_CLASSES[base] = type(
            base.__name__,
            (base,),
            {
                "weight": property(_effective_weight),
                "forward": forward,
                "__reduce_ex__": _reduce_ex,
                "__module__": base.__module__,
                "__qualname__": base.__qualname__,
            },
        )
    return _TRANSFORMED_CLASSES[base]


def install_weight_transform(
    layer: nn.Module, stage: Stage, transform: WeightTransform, *, owner: str, active_owners: set
) -> None:
    """Like :func:`add_weight_transform` for a callback identified by ``owner``.

    A transform left at ``stage`` by a callback that no longer trains this model (not in
    ``active_owners``, e.g. QAT from an earlier Trainer) is replaced; one held by an active
    callback is a conflict.
    """
    existing = get_weight_transform(layer, stage)
    if existing is not None:
        if getattr(existing, "owner", None) in active_owners:
            raise ValueError(
                f"two active callbacks put a {stage.name} transform on the same"
                f" {type(layer).__name__}; give them disjoint `targets`/`exclude`"
            )
        remove_weight_transform(layer, stage)
    transform.owner = owner
    add_weight_transform(layer, stage, transform)


def bind_owner(module: nn.Module, owner: str) -> None:
    """Record that callback ``owner`` has set up ``module`` (a plain attribute, not state)."""
    module.__dict__.setdefault("_lc_owners", set()).add(owner)


def is_bound(module: nn.Module, owner: str) -> bool:
    return owner in module.__dict__.get("_lc_owners", ())


def owner_tokens(callbacks) -> set:
    """The owner tokens of the lightning-compress callbacks in ``callbacks``."""
    return {token for cb in callbacks if (token := getattr(cb, "owner_token", None))}


def detach_all(root: nn.Module) -> None:
    """Remove every transform from every layer under ``root`` (used by tests and export)."""
    for module in root.modules():
        for stage in list(module.__dict__.get(_TRANSFORMS_ATTR, {})):
            remove_weight_transform(module, stage)


__all__ = [
    "Stage",
    "WeightTransform",
    "add_weight_transform",
    "get_weight_transform",
    "remove_weight_transform",
    "raw_weight",
    "weight_before",
    "run_stages",
    "stages",
    "set_forward",
    "own_forward",
    "is_transformed",
    "detach_all",
    "install_weight_transform",
    "bind_owner",
    "is_bound",
    "owner_tokens",
]
