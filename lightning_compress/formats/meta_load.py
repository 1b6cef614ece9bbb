"""Loading into a model whose parameters are on the meta device (no memory behind them).

:func:`~lightning_compress.load_packed` builds a model from a callable with
:func:`build_on_meta`: its parameters are created on the meta device and its buffers
(rotary frequencies, causal masks: values the constructor computes, often not saved)
where the constructor puts them. The file's tensors then become the parameters
(:func:`load_tensors`), and packed layers replace the quantized ones, so a float copy of
the model is never allocated. A model the caller built on the meta device works too, as
long as everything on the meta device gets a value from the file
(:func:`check_meta_covered` says which tensor does not, and how to build the model).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Iterator, Mapping, Set

import torch
from torch import Tensor, nn

from lightning_compress.core.notes import add_note
from lightning_compress.formats.errors import PackedFormatError
from lightning_compress.formats.packed import WEIGHTS_FILE, PackedModel, entry_dtype, entry_shape


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within it, every ``nn.Parameter`` a module registers is put on the meta device
    (created, then moved: nothing is written to it, so no memory stays resident).
    Buffers are left alone. Affects every thread while it is active, as accelerate's
    ``init_empty_weights`` does."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param) -> None:
        if type(param) is nn.Parameter and not param.is_meta:  # a subclass may not rebuild this way
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` built within :func:`parameters_on_meta`.

    Raises:
        TypeError: the factory returned something other than an ``nn.Module``.
    """
    try:
        with parameters_on_meta():
            model = factory()
    except Exception as error:
        add_note(error, "load_packed builds the model with its parameters on the meta device; if the factory"
                        " needs real parameter values, pass the model itself: load_packed(dir, factory())")
        raise
    if not isinstance(model, nn.Module):
        raise TypeError(f"the `model` factory returned {type(model).__name__}, not an nn.Module")
    return model


def _kind(dtype: torch.dtype) -> str:
    return "float" if dtype.is_floating_point else "bool" if dtype == torch.bool else "int"


def check_fit(model: nn.Module, packed: PackedModel, expected: Mapping[str, Tensor]) -> None:
    """Refuse a file whose dense tensors are not ``model``'s ``expected`` state-dict tensors
    (names, shapes, kinds of dtype), from the metadata alone.

    Raises:
        PackedFormatError: naming the tensors; a missing one on the meta device is called out.
    """
    entries = packed.metadata["tensors"]
    sources = {**{key: key for key in entries}, **packed.metadata["aliases"]}
    missing = sorted(set(expected) - set(sources))
    unexpected = sorted(set(sources) - set(expected))
    if missing or unexpected:
        empty = [key for key in missing if expected[key].is_meta]
        note = (f"; {empty[:5]} are on the meta device and nothing would give them values: build the model with"
                " those layers, or export it again with them" if empty else "")
        raise PackedFormatError(
            f"the packed model does not fit {type(model).__name__}: missing {missing[:5]}, unexpected"
            f" {unexpected[:5]}{note}; load it into the module class that was exported"
        )
    for key, source in sources.items():
        where = f"tensor {source!r}"
        shape = entry_shape(entries[source], where, packed.reader.max_numel)
        dtype = entry_dtype(entries[source], where)
        if tuple(expected[key].shape) != shape:
            packed.tensor(source)  # a file that disagrees with its own metadata says so first
            raise PackedFormatError(f"tensor {key!r}: the file holds shape {list(shape)}, the model's is"
                                    f" {list(expected[key].shape)}")
        if _kind(expected[key].dtype) != _kind(dtype):
            raise PackedFormatError(f"tensor {key!r}: the file holds {dtype}, the model's is {expected[key].dtype};"
                                    " load it into the module class that was exported")


def check_meta_covered(model: nn.Module, expected: Mapping[str, Tensor], quantized: Set[str]) -> None:
    """Refuse, before anything is loaded, a model with a tensor on the meta device that the
    file gives no value: a buffer left out of the state dict (``persistent=False``: rotary
    frequencies), whose value only the model's constructor computes.

    Raises:
        PackedFormatError: naming the tensor and how to build the model.
    """
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    empty = [name for name, tensor in named if tensor is not None and tensor.is_meta
             and name not in expected and name not in quantized]
    if empty:
        raise PackedFormatError(
            f"{type(model).__name__} has {len(empty)} tensor(s) on the meta device that {WEIGHTS_FILE} holds no"
            f" value for, e.g. {empty[0]!r} (a buffer the model computes when it is built and does not save);"
            " build the model with its buffers on the CPU: pass a callable that builds it (load_packed then puts"
            " only its parameters on the meta device), or pass a model built normally"
        )


def load_tensors(model: nn.Module, keys: Iterable[str], read: Callable[[str], Tensor],
                 expected: Mapping[str, Tensor]) -> None:
    """Give ``model``'s state-dict tensors ``keys`` the values ``read(key)`` returns, one at a
    time: copied in (through ``load_state_dict``) where the model holds memory, taken as
    they are (in the model's dtype) where it is on the meta device. Tensors the model
    shares (tied weights) get one tensor, read once, and stay shared."""
    replaced: Dict[int, Tensor] = {}  # id of a meta tensor -> what took its place
    owners = dict(model.named_modules(remove_duplicate=False))  # a shared module under each of its names
    for key in keys:
        target = expected[key]
        if not target.is_meta:
            model.load_state_dict({key: read(key)}, strict=False)
            continue
        value = replaced.get(id(target))
        if value is None:
            value = read(key).to(target.dtype)
            if isinstance(target, nn.Parameter):
                value = nn.Parameter(value, requires_grad=target.requires_grad)
            replaced[id(target)] = value
        owner_name, _, leaf = key.rpartition(".")
        owner = owners[owner_name]
        if isinstance(value, nn.Parameter):
            owner._parameters[leaf] = value
        else:
            owner._buffers[leaf] = value


__all__ = ["build_on_meta", "check_fit", "check_meta_covered", "load_tensors", "parameters_on_meta"]
