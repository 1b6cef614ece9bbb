"""``load_packed``: a packed directory + the user's module → a runnable compressed model."""

from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, Mapping, Optional, Union

import torch
from torch import nn

from lightning_compress.core.filesystem import user_path
from lightning_compress.core.memory import ReleasePacer, release_freed_memory
from lightning_compress.core.transforms import is_transformed
from lightning_compress.core.validate import check_bool, dtype_spelled
from lightning_compress.formats.errors import PackedFormatError
from lightning_compress.formats.failed_export import failed_path, recorded_failure, refusal
from lightning_compress.formats.meta_load import build_on_meta, check_fit, check_meta_covered, load_tensors
from lightning_compress.formats.packed import DTYPES, METADATA_FILE, PackedModel, open_packed
from lightning_compress.formats.unsaved_buffers import warn_on_other_unsaved_buffers
from lightning_compress.core.attention import keep_padded_batches
from lightning_compress.core.targeting import module_name, names_of, parameter_key, shared_module_names
from lightning_compress.formats.runtime import (
    BACKENDS, MEASURED_KERNELS, build_packed_unit, kernel_report)
from lightning_compress.quant.fake_quant import as_matrix


def load_packed(
    directory: Union[str, os.PathLike],
    model: Union[nn.Module, Callable[[], nn.Module]],
    *,
    backend: str = "auto",
    cache_dequantized: bool = False,
    allow_failed_parity: bool = False,
) -> nn.Module:
    """Rebuild the compressed model saved by :func:`lightning_compress.export`.

    Args:
        directory: the export directory.
        model: a fresh instance of the exported module (e.g. ``MyModule()``, or one built
            on the meta device: ``with torch.device("meta"): MyModule()``, whose buffers the
            file must then hold), or a callable that builds one (``MyModule``): it is built
            with its parameters on the meta device (see
            :mod:`~lightning_compress.formats.meta_load`), so no float copy of the model is
            ever allocated; tensors are then read one layer at a time, and the peak is about
            what the loaded model holds. Its float weights are replaced; quantized layers
            become :class:`~lightning_compress.formats.runtime.PackedLinear` /
            ``PackedConv`` / ``PackedEmbedding`` / ``PackedMultiheadAttention`` computing
            from the packed codes.
        backend: ``"auto"``: each layer runs the kernel the export's parity check chose
            for it: the int8 GEMM (activations quantized per token as int8 dynamic
            training does, integer products through oneDNN: a layer 1.2x to 3x float32 on an
            AVX-512/AMX CPU; see :mod:`~lightning_compress.formats.int8_gemm`) for int8
            per-channel/per-tensor Linear layers, weight-only or
            trained with dynamic int8 activations, where it kept the export's SQNR
            threshold (plus a 1 dB margin) alone and in the whole model, on the export's
            inputs; the exact dequantize path for every
            other layer. An export checked without inputs measured nothing: then only
            layers trained with dynamic int8 activations run the int8 GEMM.
            ``"dequantize"``: every layer exactly as the fake-quant model computes.
            ``"fbgemm"``: every int8 per-channel/per-tensor Linear on the int8 GEMM,
            measured or not, and an unavailable kernel is an error.
        cache_dequantized: layers on the dequantize path compute their float weight once
            and keep it (kernel ``"cached"``): the same numbers at float speed, for the
            memory of a float model. Off by default: packed weights stay packed in
            memory (int4 at 4 bits a weight) and are dequantized inside each call.
        allow_failed_parity: load a directory whose export failed its check (the
            ``<dir>.failed-parity/`` an export keeps so the run is not lost), with a
            warning naming the failure; refused by default.

    Returns:
        The model, in eval mode; ``model.packed_kernels`` maps each packed layer to the
        kernel it runs (``"fbgemm"``, ``"dequantize"`` or ``"cached"``).

    Raises:
        PackedFormatError: the directory is missing, corrupted, of an unknown version, or
            does not fit ``model`` (the message names the file and the tensor or layer), or a
            tensor of ``model`` on the meta device gets no value from it (named, with the fix).
        FailedExportError: (a ``PackedFormatError``) the export failed its check and
            ``allow_failed_parity`` is false.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown `backend` {backend!r}; choose one of {BACKENDS}")
    check_bool("cache_dequantized", cache_dequantized)
    try:
        packed = open_packed(directory)  # checksums verified; tensors are read layer by layer below
    except PackedFormatError as error:
        where = user_path(directory, "directory")
        kept = failed_path(where)
        if not where.is_dir() and kept.is_dir():
            raise PackedFormatError(f"{error}; {kept} holds the files of an export to it that failed its check (see"
                                    " its parity.json)") from None
        raise
    failure = recorded_failure(packed.metadata)
    if failure is not None and not allow_failed_parity:
        raise refusal(directory, failure)
    if failure is not None:
        warnings.warn(f"loading {directory}, an export that failed its check ({failure}); it is not verified to compute"
                      " what the trained model computes (see its parity.json)", UserWarning, stacklevel=2)
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise TypeError(f"`model` must be an nn.Module or a callable returning one, got {type(model).__name__}")
        model = build_on_meta(model)
    carrying = next((name for name, module in model.named_modules() if is_transformed(module)), None)
    if carrying is not None:
        # Its fake quantization (or mask, or adapter) would act again on the loaded weights.
        raise PackedFormatError(
            f"`model` still carries a training run's compression stages (layer {carrying!r}, e.g. fake quantization"
            " from QuantizationAwareTraining), which would act again on the packed weights: pass a freshly built"
            f" model (e.g. {type(model).__name__}(...)), or a function that builds one"
        )
    install_packed(model, packed, backend, cache_dequantized)
    warn_on_other_unsaved_buffers(model, packed.metadata.get("unsaved_buffers"))
    return model.eval()


def install_packed(model: nn.Module, packed: PackedModel, backend: str, cache: bool = False) -> Dict[str, nn.Module]:
    """Load ``packed`` into ``model`` in place, reading one tensor or layer at a time: dense
    tensors into its state (parameters and buffers on the meta device take the file's
    tensor itself, in their dtype), quantized layers swapped for packed modules (on the
    kernels the export chose, for ``"auto"``; ``cache``: see ``load_packed``'s
    ``cache_dequantized``). Everything is checked against the metadata before the model is
    changed. Returns the swapped-out original layers.

    Raises:
        PackedFormatError: the file does not fit ``model``, or a tensor of ``model`` on the
            meta device gets no value from it (both name the tensor or layer).
    """
    chosen = measured_kernels(packed)
    expected = dict(model.state_dict(keep_vars=True))
    shared = shared_module_names(model)
    units: Dict[str, list] = {}
    weight_keys = set()  # the packed layers' weights, under every name of their module
    _check_same_sharing(model, packed, shared)
    for key, grid in packed.grids.items():
        name = module_name(key, grid.param)
        weight = getattr(_submodule(model, name), grid.param, None)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != tuple(grid.weight.shape):
            packed.layer(key)  # a file that disagrees with its own metadata says so first
            raise PackedFormatError(
                f"layer {key!r}: the file holds a weight of shape {list(grid.weight.shape)}, the model's is"
                f" {None if weight is None else list(weight.shape)}; load it into the model that was exported"
            )
        for registered in names_of(name, shared):  # a layer shared by several names is stored once
            weight_keys.add(parameter_key(key, grid.param) if registered == name else f"{registered}.{grid.param}")
        units.setdefault(name, []).append(key)
    for key in weight_keys:
        expected.pop(key, None)
    _check_same_ties(model, packed, expected)
    check_fit(model, packed, expected)
    _warn_on_another_float_dtype(model, packed, expected)
    check_meta_covered(model, expected, weight_keys)
    load_tensors(model, list(packed.tensors), packed.tensor, expected)  # first: packed layers take their biases
    release_freed_memory()
    originals, pacer = {}, ReleasePacer()
    for name in sorted(units):  # parents first: an attention layer, then its out_proj
        original = originals[name] = _submodule(model, name)
        weights = [packed.layer(key) for key in units[name]]
        try:
            device = as_matrix(getattr(original, weights[0].param)).device
            device = torch.device("cpu") if device.type == "meta" else device
            replacement = _to_device(build_packed_unit(weights, original, backend, chosen.get(name), cache), device)
        except ValueError as err:
            raise PackedFormatError(f"layer {name!r}: {err}") from None
        replace_module(model, name, replacement, shared)
        del weights, replacement
        pacer.done(sum(packed.grids[key].float32_bytes for key in units[name]))  # see core.memory
    packed.check_complete()
    keep_padded_batches(model)  # packed layers quantize their input in a pre-hook
    model.packed_kernels = kernel_report(model)
    return originals


def _warn_on_another_float_dtype(model: nn.Module, packed: PackedModel, expected: Mapping[str, torch.Tensor]) -> None:
    """Warn when ``model``'s float tensors (built on the meta device or not: both keep their
    dtype) have another dtype than the file's (a bfloat16 run loaded into a float32 model):
    loaded into them, the model computes in its own dtype, not as training computed."""
    for key, entry in packed.metadata["tensors"].items():
        tensor, stored = expected.get(key), DTYPES.get(entry.get("dtype"))
        if not (isinstance(tensor, torch.Tensor) and stored is not None
                and tensor.is_floating_point() and stored.is_floating_point and tensor.dtype != stored):
            continue
        mine = dtype_spelled(tensor.dtype)
        warnings.warn(
            f"the export's float tensors are {dtype_spelled(stored)} (e.g. {key!r}), this model's"
            f" {mine}: loaded, it computes in {mine}, not as"
            f" training computed; build the model in the export's dtype (model.to({stored}), or pass a function that"
            f" builds it so: lambda: MyModel().to({stored})) to compute as trained",
            UserWarning, stacklevel=4)
        return  # one warning: the first tensor that differs


def _check_same_sharing(model: nn.Module, packed: PackedModel, shared: Mapping[str, str]) -> None:
    """Refuse a file that stores separately a module ``model`` registers as another name of
    an earlier one: loading both into the one module would keep whichever came last."""
    stored = [module_name(key, grid.param) for key, grid in packed.grids.items()]
    stored += [key.rpartition(".")[0] for key in packed.metadata["tensors"]]
    separate = next((name for name in stored if name in shared), None)
    if separate is not None:
        raise PackedFormatError(
            f"the file stores {separate!r} on its own, but in {type(model).__name__} {separate!r} is another name of"
            f" {shared[separate]!r} (one module registered under both names); load it into a model built as the"
            " exported one was"
        )


def _check_same_ties(model: nn.Module, packed: PackedModel, expected: Mapping[str, torch.Tensor]) -> None:
    """Refuse a file that stores as two tensors what ``model`` ties into one (an input
    embedding and an output head): the second would overwrite the first. The export
    records a tie it saw as an alias; two stored tensors mean the exported model had
    them apart (LoRA's merge unties a tied head it adapted)."""
    first: Dict[int, str] = {}
    for key in packed.metadata["tensors"]:
        target = expected.get(key)
        if target is None:
            continue
        tied = first.setdefault(id(target), key)
        if tied != key:
            raise PackedFormatError(
                f"the file stores {tied!r} and {key!r} as two tensors (the exported model's were not tied), but"
                f" {type(model).__name__} ties them (one tensor under both names): build the model untied, as the"
                " exported one was (transformers: tie_word_embeddings=False in its config)"
            )


def measured_kernels(packed: PackedModel) -> Dict[str, str]:
    """``{layer: kernel}`` the export's parity check chose (``parity.kernels`` in its
    metadata); empty for an export that measured none."""
    parity = packed.metadata.get("parity")
    kernels = parity.get("kernels") if isinstance(parity, dict) else None
    if kernels is None:
        return {}
    units = {module_name(key, grid.param) for key, grid in packed.grids.items()}
    if not isinstance(kernels, dict) or any(
            name not in units or kernel not in MEASURED_KERNELS for name, kernel in kernels.items()):
        raise PackedFormatError(
            f"{METADATA_FILE}: `parity.kernels` must map packed layers to one of {MEASURED_KERNELS}, got"
            f" {str(kernels)[:200]}; the file was edited or damaged: export the model again"
        )
    return kernels


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise PackedFormatError(
            f"layer {name!r} of the packed model is not in {type(model).__name__}; load it into the module"
            " that was exported"
        ) from None


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in ``model`` under the dotted ``name`` (``"encoder.0.fc"``), replacing
    the layer there; its parent must exist."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _to_device(module: nn.Module, device: torch.device) -> nn.Module:
    """``module.to(device)``, leaving tensors on the meta device where they are: a packed
    attention layer holds its ``out_proj``, which a model built on the meta device gets
    only when the loop reaches it (it is packed on its own, after its parent)."""
    return module._apply(lambda tensor: tensor if tensor.is_meta else tensor.to(device))


def replace_module(model: nn.Module, name: str, module: nn.Module, shared: Optional[Mapping[str, str]] = None) -> None:
    """Put ``module`` in ``model`` under ``name`` and under every other name the module now
    at ``name`` is registered under (a layer shared by reference, as in
    ``nn.ModuleList([block] * n)``), so every use of it computes with ``module``.
    ``shared``: :func:`~lightning_compress.core.targeting.shared_module_names` of ``model``,
    if already computed (replacing every name of a module leaves it unchanged)."""
    for registered in names_of(name, shared_module_names(model) if shared is None else shared):
        set_submodule(model, registered, module)

