"""The one stack of transforms that every compression method writes into.

A layer's effective weight is

    effective_weight = fake_quant( mask ⊙ (W + scale · B·A) )
                       FAKE_QUANT  MASK     ADAPTER

and its input, before the layer computes, passes through its input stages
(``INPUT_QUANT``: fake-quantized activations). Each method owns one :class:`Stage` of a
*slot*: a named floating parameter of the layer (``"weight"``, ``"in_proj_weight"`` of
``nn.MultiheadAttention``, ``"weight_ih_l0"`` of ``nn.LSTM``) or the layer's input
(:data:`INPUT`). The stages of a slot always run in :class:`Stage` order, whatever the
order the callbacks were listed in, so methods compose instead of fighting.

How: the layer's class is swapped for a cached subclass in which each transformed
parameter name is a property that runs the stack over the raw parameter. The input stages
run in one forward pre-hook the stack registers on the layer (so, as with any pre-hook,
PyTorch's fused attention fast path, which would skip them, stays off for the module that
holds the layer, and the layer's forward hooks see the transformed input). Attention
layers: see :mod:`~lightning_compress.core.attention`. The raw parameters stay in
``layer._parameters``, so ``state_dict`` keys, ``named_parameters`` (and so the optimizer
and DDP) see the user's parameters under their own names, and any code that reads
``layer.weight`` (the layer's own ``forward``, or a parent such as
``nn.MultiheadAttention`` that reads ``out_proj.weight``) gets the effective weight. This
is the mechanism of ``torch.nn.utils.parametrize``, minus its renaming of the parameter.
Recurrent layers compute from a cached list of their weights (``_flat_weights``); the
subclass fills it with the effective weights for the duration of each forward (computed
once) and keeps the raw parameters there otherwise (so copies hold leaf tensors).
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Dict, Iterator, Tuple, Type

from torch import Tensor, nn

from lightning_compress.core.attention import attention_forward, attention_inputs
from lightning_compress.core.memory import effective_weight_made
from lightning_compress.core.recompute import note_effective, recomputed_weights
from lightning_compress.core.recurrent import effective_flat_weights, raw_flat_weights, raw_init_flat_weights, recurrent_getstate
from lightning_compress.core.sharding import full, is_shard

WeightTransform = Callable[[Tensor], Tensor]

WEIGHT = "weight"
INPUT = "<input>"  # the slot of a layer's first forward argument (never a parameter name)
_STACK_ATTR = "_lc_stack"  # {slot: {stage: transform}}
_SORTED_ATTR = "_lc_sorted"  # {slot: ((stage, transform), ...)}, read on every forward
_FORWARD_ATTR = "_lc_forward"
_INPUT_HOOK_ATTR = "_lc_input_hook"  # the id of the forward pre-hook that runs the input stages
_TRANSFORMED_CLASSES: Dict[type, type] = {}


class Stage(enum.IntEnum):
    """Canonical position of a transform in its slot's stack: lower runs first."""

    ADAPTER = 10  # W + scale · B·A  (LoRA)
    MASK = 20  # mask ⊙ W          (pruning)
    FAKE_QUANT = 30  # fake_quant(W) (QAT)
    INPUT_QUANT = 40  # fake_quant(x) on the layer's input (QAT activations)


# ---------------------------------------------------------------------- weights
def raw_weight(layer: nn.Module, param: str = WEIGHT) -> nn.Parameter:
    """The trainable parameter under the stack (what the optimizer updates).

    Raises:
        ValueError: when ``layer`` has no parameter ``param``.
    """
    parameter = layer._parameters.get(param)
    if parameter is None:
        raise ValueError(f"{type(layer).__name__} has no parameter `{param}`; it has {sorted(layer._parameters)}")
    return parameter


def is_transformed(layer: nn.Module) -> bool:
    return type(layer) in _TRANSFORMED_CLASSES.values()


def add_weight_transform(layer: nn.Module, stage: Stage, transform: WeightTransform, param: str = WEIGHT) -> None:
    """Put ``transform`` at ``stage`` of the stack of ``layer``'s parameter ``param``.

    Raises:
        ValueError: if ``param`` is not a floating parameter of the layer, or another
            transform already holds that stage (two callbacks of the same method
            targeting one layer).
    """
    parameter = layer._parameters.get(param)
    if parameter is None or not parameter.is_floating_point():
        floating = [n for n, p in layer._parameters.items() if p is not None and p.is_floating_point()]
        raise ValueError(
            f"{type(layer).__name__} has no floating parameter `{param}` to transform; its floating parameters"
            f" are {floating}"
        )
    _add(layer, param, stage, transform)


def get_weight_transform(layer: nn.Module, stage: Stage, param: str = WEIGHT) -> WeightTransform | None:
    return layer.__dict__.get(_STACK_ATTR, {}).get(param, {}).get(stage)


def remove_weight_transform(layer: nn.Module, stage: Stage, param: str = WEIGHT) -> None:
    """Remove ``stage`` from ``param``'s stack; with nothing left on any slot the layer
    gets its own class back."""
    stack = layer.__dict__.get(_STACK_ATTR)
    if not stack or stage not in stack.get(param, {}):
        return
    del stack[param][stage]
    if not stack[param]:
        del stack[param]
        if param == INPUT:
            _remove_input_hook(layer)
    if stack:
        _sort(layer)
        return
    for attr in (_STACK_ATTR, _SORTED_ATTR, _FORWARD_ATTR):
        layer.__dict__.pop(attr, None)
    layer.__class__ = _original_class(type(layer))


def weight_before(layer: nn.Module, stage: Stage, param: str = WEIGHT) -> Tensor:
    """The weight as it enters ``stage``: the raw parameter with earlier stages applied.

    Pruning scores the merged ``W + B·A`` this way, and QAT quantizes the masked weight.
    A parameter FSDP2 holds sharded is gathered whole first (every rank must call this).
    """
    return run_stages(layer, full(raw_weight(layer, param)), after=None, before=stage, param=param)


def run_stages(
    layer: nn.Module, weight: Tensor, *, after: Stage | None, before: Stage | None, param: str = WEIGHT
) -> Tensor:
    """Apply the stages of ``param`` strictly between ``after`` and ``before`` to ``weight``.

    ``None`` leaves that end open. LoRA's merge uses it to mask a weight it merged itself.
    """
    for transform_stage, transform in layer.__dict__.get(_SORTED_ATTR, {}).get(param, ()):
        if before is not None and transform_stage >= before:
            break
        if after is None or transform_stage > after:
            weight = transform(weight)
    return weight


def stages(layer: nn.Module, param: str = WEIGHT) -> tuple:
    """The stages present in the stack of ``param`` (or :data:`INPUT`), in the order they run."""
    return tuple(stage for stage, _ in layer.__dict__.get(_SORTED_ATTR, {}).get(param, ()))


def transformed_slots(layer: nn.Module) -> Tuple[str, ...]:
    """The parameter names (and :data:`INPUT`) of ``layer`` that carry stages."""
    return tuple(layer.__dict__.get(_SORTED_ATTR, {}))


def weight_slots(layer: nn.Module) -> Tuple[str, ...]:
    """The parameter names of ``layer`` that carry stages (its transformed weights)."""
    return tuple(slot for slot in transformed_slots(layer) if slot != INPUT)


def all_transforms(layer: nn.Module) -> Iterator[Tuple[str, Stage, Any]]:
    """Every ``(slot, stage, transform)`` of ``layer``: what reports and exports read."""
    for slot, entries in layer.__dict__.get(_SORTED_ATTR, {}).items():
        for stage, transform in entries:
            yield slot, stage, transform


# ---------------------------------------------------------------------- inputs
def add_input_transform(layer: nn.Module, stage: Stage, transform: Callable[..., Tensor]) -> None:
    """Put ``transform`` at ``stage`` of ``layer``'s input stack: the layer's first forward
    argument passes through it before the layer computes. ``transform(x, layer)`` gets
    the layer too (an observer updates only while it trains).

    Raises:
        ValueError: if another transform already holds that stage.
    """
    _add(layer, INPUT, stage, transform)


def get_input_transform(layer: nn.Module, stage: Stage) -> Callable[..., Tensor] | None:
    return get_weight_transform(layer, stage, param=INPUT)


def remove_input_transform(layer: nn.Module, stage: Stage) -> None:
    remove_weight_transform(layer, stage, param=INPUT)


# ---------------------------------------------------------------------- forward
def set_forward(layer: nn.Module, forward: Callable[..., Any] | None) -> None:
    """Make a transformed ``layer`` compute its output with ``forward(*args, **kwargs)``.

    For a stage that has a cheaper exact form than transforming the weight: a LoRA
    adapter computes ``W x + scale · B(A x)`` instead of ``(W + scale · B·A) x``, which
    skips the full-size weight gradient. ``layer.weight`` still runs the stack, so code
    that reads the weight directly (``nn.MultiheadAttention``, tied weights) sees the
    effective weight. Input stages run before it. ``None`` restores the layer's own forward.
    """
    if forward is None:
        layer.__dict__.pop(_FORWARD_ATTR, None)
        return
    if not is_transformed(layer):
        raise ValueError(f"set_forward needs a layer with a stage on the stack, got {type(layer).__name__}")
    layer.__dict__[_FORWARD_ATTR] = forward


def own_forward(layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Run the forward of ``layer``'s own class (which reads the effective weights)."""
    return _original_class(type(layer)).forward(layer, *args, **kwargs)


# ---------------------------------------------------------------------- ownership
def install_weight_transform(
    layer: nn.Module,
    stage: Stage,
    transform: Any,
    *,
    owner: str,
    active_owners: set,
    param: str = WEIGHT,
) -> None:
    """Like :func:`add_weight_transform` (or :func:`add_input_transform` for
    ``param=INPUT``) for a callback identified by ``owner``.

    A transform left at ``stage`` by a callback that no longer trains this model (not in
    ``active_owners``, e.g. QAT from an earlier Trainer) is replaced; one held by an active
    callback is a conflict.
    """
    existing = get_weight_transform(layer, stage, param)
    if existing is not None:
        if getattr(existing, "owner", None) in active_owners:
            where = "input" if param == INPUT else f"`{param}`"
            raise ValueError(
                f"two active callbacks put a {stage.name} transform on the {where} of the same"
                f" {type(layer).__name__}; give them disjoint `targets`/`exclude`"
            )
        remove_weight_transform(layer, stage, param)
    transform.owner = owner
    if param == INPUT:
        add_input_transform(layer, stage, transform)
    else:
        add_weight_transform(layer, stage, transform, param)


def bind_owner(module: nn.Module, owner: str) -> None:
    """Record that callback ``owner`` has set up ``module`` (a plain attribute, not state)."""
    module.__dict__.setdefault("_lc_owners", set()).add(owner)


def is_bound(module: nn.Module, owner: str) -> bool:
    return owner in module.__dict__.get("_lc_owners", ())


def owner_tokens(callbacks) -> set:
    """The owner tokens of the lightning-compress callbacks in ``callbacks``."""
    return {token for cb in callbacks if (token := getattr(cb, "owner_token", None))}


def detach_all(root: nn.Module, *, keep_inputs: bool = False) -> None:
    """Remove every transform from every layer under ``root``; with ``keep_inputs`` the
    input stages stay (an export that folds the weights still quantizes activations)."""
    for module in root.modules():
        for slot, stage, _ in list(all_transforms(module)):
            if not (keep_inputs and slot == INPUT):
                remove_weight_transform(module, stage, slot)


# ---------------------------------------------------------------------- internals
def _add(layer: nn.Module, slot: str, stage: Stage, transform: Any) -> None:
    if not isinstance(stage, Stage):
        raise ValueError(f"`stage` must be a Stage ({', '.join(s.name for s in Stage)}), got {stage!r}")
    stack = layer.__dict__.setdefault(_STACK_ATTR, {})
    if stage in stack.get(slot, {}):
        raise ValueError(
            f"stage {stage.name} of this {type(layer).__name__} is already taken; two callbacks"
            " of the same kind target the same layer. Give them disjoint `targets`/`exclude`."
        )
    if not is_transformed(layer):
        layer.__class__ = _transformed_class(type(layer))
    if slot != INPUT:
        _expose(type(layer), slot)
    elif _INPUT_HOOK_ATTR not in layer.__dict__:
        handle = layer.register_forward_pre_hook(_run_input_stages, with_kwargs=True)
        layer.__dict__[_INPUT_HOOK_ATTR] = handle.id
    stack.setdefault(slot, {})[stage] = transform
    _sort(layer)


def _sort(layer: nn.Module) -> None:
    # Kept sorted so the hot path (every read of a weight, every forward) does no sorting.
    layer.__dict__[_SORTED_ATTR] = {
        slot: tuple(sorted(entries.items())) for slot, entries in layer.__dict__[_STACK_ATTR].items()
    }


def _effective(name: str) -> property:
    def effective(self: nn.Module) -> Tensor:
        if name not in self._parameters:  # another instance of the class has this parameter
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        raw = self._parameters[name]
        if is_shard(raw):  # FSDP2 at rest: it reads its own sharded parameter back through here
            return raw
        weight = _run_stack(self, name, raw)
        note_effective(self, name, raw, weight, _run_stack)
        return weight

    return property(effective)


def _run_stack(layer: nn.Module, name: str, weight: Tensor) -> Tensor:
    raw = weight
    for _, transform in layer.__dict__.get(_SORTED_ATTR, {}).get(name, ()):
        weight = transform(weight)
    if weight is not raw:
        effective_weight_made(weight)  # its freed blocks are handed back now and then (core.memory)
    return weight


def _expose(cls: type, name: str) -> None:
    """Make ``name`` a property of the transformed class: a layer of that class without
    stages on ``name`` reads its raw parameter through it."""
    if not isinstance(cls.__dict__.get(name), property):
        setattr(cls, name, _effective(name))


def _original_class(cls: type) -> type:
    for base, transformed in _TRANSFORMED_CLASSES.items():
        if transformed is cls:
            return base
    return cls


def _new_transformed(base: type, slots: Tuple[str, ...] = ()) -> nn.Module:
    cls = _transformed_class(base)
    for slot in slots:  # unpickled in a fresh process: the class has not exposed them yet
        if slot != INPUT:
            _expose(cls, slot)
    return object.__new__(cls)


def _reduce_ex(self: nn.Module, protocol: int):
    # Pickle (torch.save(model), ddp_spawn) and deepcopy rebuild the cached subclass from
    # its importable base instead of failing on a class that has no module-level name.
    state = self.__getstate__() if hasattr(self, "__getstate__") else self.__dict__
    return (_new_transformed, (_original_class(type(self)), transformed_slots(self)), state)


def _run_input_stages(layer: nn.Module, args: tuple, kwargs: dict):
    """The forward pre-hook of a layer with input stages: they transform its first
    argument (``input=`` when it is passed by keyword)."""
    entries = layer.__dict__.get(_SORTED_ATTR, {}).get(INPUT)
    if not entries:
        return None

    def run(x: Tensor) -> Tensor:
        for _, transform in entries:
            x = transform(x, layer)
        return x
    if isinstance(layer, nn.MultiheadAttention):  # its input projection reads query, key and value
        return attention_inputs(args, kwargs, run)
    if args:
        x = run(args[0])
    elif "input" in kwargs:
        x = run(kwargs["input"])
    else:
        return None
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "input": x}


def _remove_input_hook(layer: nn.Module) -> None:
    hook_id = layer.__dict__.pop(_INPUT_HOOK_ATTR, None)
    layer._forward_pre_hooks.pop(hook_id, None)
    layer._forward_pre_hooks_with_kwargs.pop(hook_id, None)


def _transformed_class(base: Type[nn.Module]) -> type:
    if base not in _TRANSFORMED_CLASSES:
        # PyTorch's attention never calls out_proj and may take a fused path that skips the stack.
        base_forward = attention_forward if base.forward is nn.MultiheadAttention.forward else base.forward
        members: Dict[str, Any] = {"__reduce_ex__": _reduce_ex, "__module__": base.__module__,
                                   "__qualname__": base.__qualname__}

        def forward(self, *args, **kwargs):
            override = self.__dict__.get(_FORWARD_ATTR)
            with recomputed_weights():
                if override is not None:
                    return override(*args, **kwargs)
                return base_forward(self, *args, **kwargs)

        def recurrent_forward(self, *args, **kwargs):
            try:
                with recomputed_weights():
                    return base_forward(self, *args, **kwargs)
            finally:
                self._flat_weights = raw_flat_weights(self)

        if issubclass(base, nn.RNNBase):
            members.update(forward=recurrent_forward, _update_flat_weights=effective_flat_weights,
                           _init_flat_weights=raw_init_flat_weights, __getstate__=recurrent_getstate)
        else:
            members["forward"] = forward
        # Same name as the base so `print(model)` and summaries look as the user expects.
        _TRANSFORMED_CLASSES[base] = type(base.__name__, (base,), members)
    return _TRANSFORMED_CLASSES[base]


__all__ = [
    "Stage",
    "WeightTransform",
    "WEIGHT",
    "INPUT",
    "add_weight_transform",
    "get_weight_transform",
    "remove_weight_transform",
    "add_input_transform",
    "get_input_transform",
    "remove_input_transform",
    "raw_weight",
    "weight_before",
    "run_stages",
    "stages",
    "transformed_slots",
    "weight_slots",
    "all_transforms",
    "set_forward",
    "own_forward",
    "is_transformed",
    "detach_all",
    "install_weight_transform",
    "bind_owner",
    "is_bound",
    "owner_tokens",
]
