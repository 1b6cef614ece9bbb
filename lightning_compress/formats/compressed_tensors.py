"""``config.json`` for a Hugging Face model exported in compressed-tensors' layout.

What vLLM and ``transformers`` (with the ``compressed-tensors`` package) read: the
``quantization_config`` below, and per quantized layer the tensors llm-compressor writes
for the same scheme (checked against llm-compressor 0.14's own output in
``tests/test_compressed_tensors_vllm.py``):

================================  ==============================================
weight-only (W4A16, W8A16, ...)   ``pack-quantized``: ``weight_packed`` int32, ``weight_shape``,
                                  ``weight_scale``; asymmetric: ``weight_zero_point`` int32,
                                  packed along the output dimension
int8 activations + int8 weights   ``int-quantized``: ``weight`` int8, ``weight_scale``;
(W8A8)                            static activations add ``input_scale`` (float32 ``[1]``)
                                  and ``input_zero_point`` (int8 ``[1]``)
int8 activations + other weights  ``pack-quantized`` with ``input_activations``
                                  (transformers runs it; vLLM has no scheme, see
                                  :func:`vllm_notes`)
================================  ==============================================

Each distinct scheme (weights and input activations) is one config group. The activation
quantizers QAT trains (:mod:`lightning_compress.quant.activations`) are int8 and asymmetric,
with zero on the grid: per token with ranges from each input (``strategy: token, dynamic:
true``), or per tensor with an observed range (``strategy: tensor``). The config says so:
``symmetric: false``, as compressed-tensors computes such ranges. ``observer`` is left
``null``: it names the calibration algorithm of a tool that recalibrates, and QAT's ranges
(min/max, MSE-clipped or learned) are stored, not recomputed.

A head model (``BertForSequenceClassification``) names its layers under its base model
(``bert.encoder...``), but ``AutoModel`` builds the base model alone (``encoder...``) and
compressed-tensors matches targets against the names of the model it builds (exactly,
or by ``re.match`` for ``re:`` targets). When one scheme holds every quantized Linear
layer the group targets the class (``["Linear"]``, as llm-compressor writes it); else each
layer of the base model is targeted by a regex with the prefix optional, which both
classes (and vLLM) match, and a layer of the head only (``classifier``, ``lm_head``)
keeps its name. ``ignore`` lists the Linear layers left in float, and a quantized layer
tied to another weight is written untied, as it computed.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from torch import nn

from lightning_compress.core.targeting import (
    embeddings_untied,
    input_and_output_embeddings,
    shared_module_names,
    tied_parameter_names,
)
from lightning_compress.core.transforms import is_transformed
from lightning_compress.formats.errors import ExportError
from lightning_compress.formats.packed import PackedLayer
from lightning_compress.quant.spec import QuantSpec

COMPATIBLE_MODULES = ("Linear", "Embedding")
# vLLM reads an asymmetric (zero-point) weight of these widths only (WNA16_ZP_SUPPORTED_TYPES_MAP).
ZERO_POINT_BITS = (4, 8)
TRANSFORMERS_ZERO_POINTS = (
    "transformers 5.24 (tested here) refuses packed zero points (a size mismatch on weight_zero_point; 5.17 loaded"
    " them), so only vLLM and lightning_compress.load_packed read such a directory"
)
TRANSFORMERS_EMBEDDING = (
    "transformers 5.24 with compressed-tensors 0.20 (tested here) cannot load a packed Embedding: compressed-tensors"
    " runs packed Linear layers only, so the load fails on the Embedding's missing weight (and decompressing on load"
    " gives wrong rows); lightning_compress.load_packed reads it, and an export with the embedding left in float"
    " (`exclude`) loads in transformers"
)


def is_transformers_model(module: nn.Module) -> bool:
    """A ``transformers`` ``PreTrainedModel`` (checked without importing transformers)."""
    return any(cls.__name__ == "PreTrainedModel" for cls in type(module).__mro__) and hasattr(module, "config")


def incompatibilities(layers: Mapping[str, PackedLayer]) -> Dict[str, str]:
    """``{layer: reason}`` for layers compressed-tensors cannot store for any reader."""
    reasons = {}
    for name, layer in layers.items():
        reason = incompatibility(layer.module, layer.weight.spec)
        if reason is not None:
            reasons[name] = reason
    return reasons


def incompatibility(module: str, spec: QuantSpec) -> Optional[str]:
    """Why no compressed-tensors reader can load a ``module`` layer (a class name) quantized
    with ``spec``, or ``None``. The export uses it on the packed layers, and the callbacks
    before training on what QAT will train."""
    if module not in COMPATIBLE_MODULES:
        return f"{module} layers are our extension"
    if packs_zero_point(spec) and spec.bits not in ZERO_POINT_BITS:
        return (f"asymmetric {spec.bits}-bit weights load nowhere in that format: vLLM reads zero points at 4 and 8"
                " bits only, and transformers refuses packed zero points")
    return None


def packs_zero_point(spec: QuantSpec) -> bool:
    """Whether compressed-tensors stores this grid's zero points packed into int32 (an
    asymmetric group or channel grid), which the tested transformers cannot load."""
    return not spec.symmetric and spec.granularity != "tensor"


def transformers_refusals(layers: Mapping[str, PackedLayer]) -> Dict[str, str]:
    """``{layer: reason}`` for layers stored in compressed-tensors' layout that transformers
    cannot load."""
    refusals = {}
    for name, layer in layers.items():
        if packs_zero_point(layer.weight.spec):
            refusals[name] = TRANSFORMERS_ZERO_POINTS
        elif layer.module == "Embedding":
            refusals[name] = TRANSFORMERS_EMBEDDING
    return refusals


def decide(model: nn.Module, layers: Mapping[str, PackedLayer], requested: Optional[bool], notes: List[str]) -> bool:
    """Whether the export writes ``config.json`` (``requested``: the export's
    ``compressed_tensors``; ``None`` writes it for a transformers model every layer of which
    transformers loads), adding to ``notes`` why not, or what will not load where.

    Raises:
        ExportError: ``requested`` is ``True`` for a model that is not a transformers model,
            or for a layer no compressed-tensors reader loads.
    """
    is_hf = is_transformers_model(model)
    problems = incompatibilities(layers)
    shared = shared_module_names(model)
    if shared:  # stored once under its first name; transformers would find the others missing
        alias, first = next(iter(shared.items()))
        problems[alias] = (f"{alias!r} is another name of {first!r} (one module registered under both), which the"
                           " packed format stores once but transformers reads under every name")
    refusals = transformers_refusals(layers)
    if requested is None:
        if not is_hf:
            return False
        if problems:
            notes.append(f"compressed-tensors config not written: {next(iter(problems.values()))}")
            return False
        if refusals:
            reasons = list(dict.fromkeys(refusals.values()))  # each kind once, in layer order
            hint = "; pass compressed_tensors=True to write it for vLLM" if reasons == [TRANSFORMERS_ZERO_POINTS] else ""
            notes.append(f"compressed-tensors config not written: {'; and '.join(reasons)}{hint}")
            return False
    elif not requested:
        return False
    if not is_hf:
        raise ExportError(
            f"compressed_tensors=True needs a transformers model (it writes its config.json), got"
            f" {type(model).__name__}; export its transformers submodule, e.g. export(module.model, ...)"
        )
    if problems:
        name, reason = next(iter(problems.items()))
        raise ExportError(f"compressed_tensors=True cannot store layer {name!r}: {reason}; pass compressed_tensors=False")
    asymmetric = [name for name, reason in refusals.items() if reason == TRANSFORMERS_ZERO_POINTS]
    if asymmetric:
        notes.append(f"compressed-tensors: {len(asymmetric)} layer(s) have asymmetric weights (e.g."
                     f" {asymmetric[0]!r}), written with packed zero points as vLLM reads them;"
                     f" {TRANSFORMERS_ZERO_POINTS}")
    embeddings = [name for name, reason in refusals.items() if reason == TRANSFORMERS_EMBEDDING]
    if embeddings:
        notes.append(f"compressed-tensors: {embeddings[0]!r} is a quantized Embedding; {TRANSFORMERS_EMBEDDING}")
    notes.extend(vllm_notes(quantization_config(layers, model), layers, model))
    return True


# ---------------------------------------------------------------------- schemes
def quantization_args(bits: int, symmetric: bool, strategy: str, group_size: Optional[int] = None,
                      dynamic: bool = False) -> Dict[str, Any]:
    """compressed-tensors' ``QuantizationArgs`` of an integer grid, every field written as
    llm-compressor writes it."""
    return {
        "num_bits": bits, "type": "int", "symmetric": symmetric, "group_size": group_size, "strategy": strategy,
        "block_structure": None, "dynamic": dynamic, "actorder": None, "scale_dtype": None,
        "zp_dtype": None if symmetric else "torch.int8", "observer": None, "observer_kwargs": {},
    }


def input_args(activations: Optional[str]) -> Optional[Dict[str, Any]]:
    """``input_activations`` of a layer trained with ``activations`` (see the module docstring)."""
    if activations is None:
        return None
    if activations == "int8_dynamic":
        return quantization_args(8, False, "token", dynamic=True)
    if activations == "int8_static":
        return quantization_args(8, False, "tensor")
    raise ValueError(f"unknown activations {activations!r}")


def layer_scheme(layer: PackedLayer) -> Dict[str, Any]:
    """The config group (without ``targets``) ``layer`` belongs to."""
    spec = layer.weight.spec
    inputs = input_args(layer.activations)
    return {
        "weights": quantization_args(spec.bits, spec.symmetric, spec.granularity, spec.group_size),
        "input_activations": inputs,
        "output_activations": None,
        "format": "int-quantized" if inputs is not None and spec.bits == 8 else "pack-quantized",
    }


def packs_codes(layer: PackedLayer) -> bool:
    """Whether the layer's codes are stored packed into int32 (``pack-quantized``; below
    8 bits they always are)."""
    return layer_scheme(layer)["format"] == "pack-quantized"


def quantization_config(layers: Mapping[str, PackedLayer], model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """The ``quantization_config`` of ``layers``; with the transformers ``model`` they come
    from, targets that its base and task classes both match and ``ignore`` for its float
    Linear layers (see the module docstring)."""
    target = layer_target_function(model) if model is not None else (lambda name: name)
    schemes: Dict[str, tuple] = {}
    for name, layer in layers.items():
        scheme = layer_scheme(layer)
        schemes.setdefault(json.dumps(scheme, sort_keys=True), (scheme, []))[1].append(name)
    with_linear = [key for key, (_, names) in schemes.items() if any(layers[n].module == "Linear" for n in names)]
    by_class = with_linear[0] if model is not None and len(with_linear) == 1 else None
    config_groups = {}
    for index, key in enumerate(sorted(schemes)):
        scheme, names = schemes[key]
        named = [n for n in names if key != by_class or layers[n].module != "Linear"]
        targets = (["Linear"] if key == by_class else []) + sorted(target(name) for name in named)
        config_groups[f"group_{index}"] = {"targets": targets, **scheme}
    formats = {group["format"] for group in config_groups.values()}
    floats = [] if model is None else sorted(
        name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name and name not in layers
    )
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": [target(name) for name in floats],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def vllm_scheme(group: Mapping[str, Any]) -> Optional[str]:
    """The vLLM scheme class a config group selects, or ``None`` where vLLM has none and
    refuses the checkpoint: the integer cases of ``CompressedTensorsConfig._get_scheme_from_parts``
    (``vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py``),
    read from its source; vLLM itself does not run here."""
    weights, inputs, layout = group["weights"], group["input_activations"], group["format"]
    static_weights = weights["type"] == "int" and not weights["dynamic"]
    if inputs is None:
        if (static_weights and layout == "pack-quantized" and weights["strategy"] in ("channel", "group")
                and weights["num_bits"] in (4, 8)):
            return "CompressedTensorsWNA16"
        return None
    w8a8 = (static_weights and layout == "int-quantized" and weights["symmetric"] and weights["num_bits"] == 8
            and inputs["num_bits"] == 8 and weights["strategy"] in ("tensor", "channel"))
    if w8a8 and ((inputs["strategy"] == "token" and inputs["dynamic"])
                 or (inputs["strategy"] == "tensor" and not inputs["dynamic"])):
        return "CompressedTensorsW8A8Int8"
    return None


def vllm_notes(config: Mapping[str, Any], layers: Mapping[str, PackedLayer], model: nn.Module) -> List[str]:
    """What in ``config`` vLLM would not serve (see :func:`vllm_scheme`), one line each."""
    notes = []
    for group_name, group in config["config_groups"].items():
        if vllm_scheme(group) is None:
            notes.append(
                f"vLLM has no scheme for compressed-tensors {group_name} ({_describe(group)}); it serves weight-only"
                " int4/int8 group or channel grids and W8A8 (int8 symmetric channel/tensor weights with int8"
                " per-token dynamic or per-tensor static inputs)"
            )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    modules = dict(model.named_modules())
    kept_float = [name for name, layer in layers.items()
                  if layer.module == "Embedding" or (head is not None and modules.get(name) is head)]
    if kept_float:
        notes.append(
            f"vLLM's compressed-tensors loader quantizes Linear layers only (LinearBase), not the output head or"
            f" embeddings: it expects a float weight for {', '.join(kept_float)}, which this directory does not hold;"
            " keep them out of QAT (exclude=[...]) to serve it with vLLM"
        )
    return notes


def _describe(group: Mapping[str, Any]) -> str:
    weights, inputs = group["weights"], group["input_activations"]
    grid = weights["strategy"] if weights["group_size"] is None else f"g{weights['group_size']}"
    text = f"int{weights['num_bits']} {grid} {'sym' if weights['symmetric'] else 'asym'} weights"
    if inputs is not None:
        text += f", int8 {'dynamic per-token' if inputs['dynamic'] else 'static per-tensor'} inputs"
    return text


# ---------------------------------------------------------------------- targets
def layer_target(name: str, base_prefix: str) -> str:
    """The compressed-tensors target of the base-model layer ``name`` (named without
    ``base_prefix``): it matches ``name`` in the base model and ``<base_prefix>.<name>``
    in a model with a head, and nothing else."""
    return f"re:^(?:{re.escape(base_prefix)}\\.)?{re.escape(name)}$"


def layer_target_function(model: nn.Module) -> Callable[[str], str]:
    """``name -> target`` for the layers of the transformers ``model``: a regex for layers
    of its base model (:func:`layer_target`), the plain name for those of its head."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix:
        return lambda name: name
    base = getattr(model, prefix, model)
    if base is model:  # the base model itself: every layer is a base-model layer
        return lambda name: layer_target(name, prefix)
    inside = prefix + "."
    return lambda name: layer_target(name[len(inside):], prefix) if name.startswith(inside) else name


def config_json(model: nn.Module, layers: Mapping[str, PackedLayer]) -> bytes:
    """The ``config.json`` ``save_pretrained`` writes (the model's config without its
    defaults, its class in ``architectures``), with the ``quantization_config`` added."""
    config = model.config.to_diff_dict()
    config["architectures"] = [type(model).__name__]
    config["quantization_config"] = quantization_config(layers, model)
    if model.config.to_dict().get("tie_word_embeddings") and (
        _quantizes_a_shared_weight(model, layers) or embeddings_untied(model) or _embeddings_transformed(model)
    ):
        # The quantized layer computes with its own codes while the weight it was tied to
        # stays float, or the head holds a weight of its own (an NF4 base, a LoRA merge), or
        # computes with W + B·A (an unmerged adapter): tied again on load, transformers would
        # find no `weight` to tie, or drop the head's.
        config["tie_word_embeddings"] = False
    if config.get("dtype") is None and config.get("torch_dtype") is None:
        # Without a dtype, transformers 4.x loads a compressed-tensors model in float16
        # (its quantizer's default): name the float dtype the model was exported in.
        config["dtype"] = _float_dtype_name(model)
    return json.dumps(config, indent=2, sort_keys=True).encode()


def _quantizes_a_shared_weight(model: nn.Module, layers: Mapping[str, PackedLayer]) -> bool:
    """Whether a quantized layer's weight is tied to another parameter (``lm_head`` to the
    input embedding)."""
    shared = {name for group in tied_parameter_names(model).values() for name in group}
    return any(f"{layer}.weight" in shared for layer in layers)


def _embeddings_transformed(model: nn.Module) -> bool:
    """Whether the head or the input embedding computes with a weight its stages change (an
    unmerged LoRA adapter): the export stores each one's effective weight."""
    pair = input_and_output_embeddings(model)
    return pair is not None and any(map(is_transformed, pair))


def _float_dtype_name(model: nn.Module) -> str:
    """``"float32"`` for a float32 model: the dtype of its first floating parameter."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return str(dtype).removeprefix("torch.")
