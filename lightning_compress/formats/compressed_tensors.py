"""``config.json`` for a Hugging Face model exported in compressed-tensors' layout.

``transformers`` (with the ``compressed-tensors`` package) reads the
``quantization_config`` below and decompresses ``weight_packed``/``weight`` +
``weight_scale`` (+ ``weight_zero_point``) of each listed layer. Layers sharing bits,
granularity, group size and symmetry form one config group that targets them by name;
8-bit groups use the ``int-quantized`` format (int8 ``weight``), the others
``pack-quantized``.

A head model (``BertForSequenceClassification``) names its layers under its base model
(``bert.encoder...``), but ``AutoModel`` builds the base model alone (``encoder...``) and
compressed-tensors matches targets against the names of the model it builds (exactly,
or by ``re.match`` for ``re:`` targets). A layer of the base model is therefore targeted
by a regex with the prefix optional, which both classes (and vLLM) match; a layer of the
head only (``classifier``, ``lm_head``) keeps its name. ``ignore`` lists the Linear
layers left in float, as vLLM needs for a layer no target matches, and a quantized
layer tied to another weight is written untied, as it computed.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Dict, Mapping, Optional

import torch
from torch import nn

from lightning_compress.formats.packed import PackedLayer
from lightning_compress.quant.spec import QuantSpec

COMPATIBLE_MODULES = ("Linear", "Embedding")


def is_transformers_model(module: nn.Module) -> bool:
    """A ``transformers`` ``PreTrainedModel`` (checked without importing transformers)."""
    return any(cls.__name__ == "PreTrainedModel" for cls in type(module).__mro__) and hasattr(module, "config")


def incompatibilities(layers: Mapping[str, PackedLayer]) -> Dict[str, str]:
    """``{layer: reason}`` for layers compressed-tensors cannot load."""
    reasons = {}
    for name, layer in layers.items():
        reason = incompatibility(layer.module, layer.weight.spec)
        if reason is not None:
            reasons[name] = reason
    return reasons


def incompatibility(module: str, spec: QuantSpec) -> Optional[str]:
    """Why compressed-tensors cannot load a ``module`` layer (a class name) quantized with
    ``spec``, or ``None``. The export uses it on the packed layers, and the callbacks
    before training on what QAT will train."""
    if module not in COMPATIBLE_MODULES:
        return f"{module} layers are our extension"
    if not spec.symmetric and spec.bits < 8 and spec.granularity != "tensor":
        # transformers 5.x allocates these unpacked and refuses the packed tensor
        # (checked with compressed-tensors 0.20): keep such exports to our loader.
        return "asymmetric sub-8-bit zero points do not load in transformers"
    return None


def quantization_config(layers: Mapping[str, PackedLayer], model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """The ``quantization_config`` of ``layers``; with the transformers ``model`` they come
    from, targets that its base and task classes both match and ``ignore`` for its float
    Linear layers (see the module docstring)."""
    target = layer_target_function(model) if model is not None else (lambda name: name)
    groups: Dict[tuple, list] = {}
    for name, layer in layers.items():
        spec = layer.weight.spec
        groups.setdefault((spec.bits, spec.granularity, spec.group_size, spec.symmetric), []).append(name)
    config_groups = {}
    formats = set()
    for index, ((bits, granularity, group_size, symmetric), names) in enumerate(sorted(groups.items(), key=str)):
        layout = "int-quantized" if bits == 8 else "pack-quantized"
        formats.add(layout)
        config_groups[f"group_{index}"] = {
            "targets": [target(name) for name in sorted(names)],
            "weights": {
                "num_bits": bits,
                "type": "int",
                "symmetric": symmetric,
                "strategy": granularity,
                "group_size": group_size,
                "dynamic": False,
                "observer": "minmax",
            },
            "input_activations": None,
            "output_activations": None,
            "format": layout,
        }
    floats = [] if model is None else sorted(
        name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name and name not in layers
    )
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": [target(name) for name in floats],
    }


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
    """The model's own ``config.json`` with the ``quantization_config`` added, naming the
    model's class in ``architectures`` as ``save_pretrained`` does."""
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config["quantization_config"] = quantization_config(layers, model)
    if config.get("tie_word_embeddings") and _quantizes_a_shared_weight(model, layers):
        # The quantized layer computes with its own codes while the weight it was tied to
        # stays float: tied again on load, transformers would find no `weight` to tie.
        config["tie_word_embeddings"] = False
    if config.get("dtype") is None and config.get("torch_dtype") is None:
        # Without a dtype, transformers 4.x loads a compressed-tensors model in float16
        # (its quantizer's default): name the float dtype the model was exported in.
        config["dtype"] = _float_dtype_name(model)
    return json.dumps(config, indent=2, sort_keys=True).encode()


def _quantizes_a_shared_weight(model: nn.Module, layers: Mapping[str, PackedLayer]) -> bool:
    """Whether a quantized layer's weight is tied to another parameter (``lm_head`` to the
    input embedding)."""
    names: Dict[int, list] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    shared = {name for group in names.values() if len(group) > 1 for name in group}
    return any(f"{layer}.weight" in shared for layer in layers)


def _float_dtype_name(model: nn.Module) -> str:
    """``"float32"`` for a float32 model: the dtype of its first floating parameter."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return str(dtype).removeprefix("torch.")
