"""``config.json`` for a Hugging Face model exported in compressed-tensors' layout.

``transformers`` (with the ``compressed-tensors`` package) reads the
``quantization_config`` below and decompresses ``weight_packed``/``weight`` +
``weight_scale`` (+ ``weight_zero_point``) of each listed layer. Layers sharing bits,
granularity, group size and symmetry form one config group that targets them by name;
8-bit groups use the ``int-quantized`` format (int8 ``weight``), the others
``pack-quantized``.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Mapping, Optional

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


def quantization_config(layers: Mapping[str, PackedLayer]) -> Dict[str, Any]:
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
            "targets": sorted(names),
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
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": [],
    }


def config_json(model: nn.Module, layers: Mapping[str, PackedLayer]) -> bytes:
    """The model's own ``config.json`` with the ``quantization_config`` added."""
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(layers)
    if config.get("dtype") is None and config.get("torch_dtype") is None:
        # Without a dtype, transformers 4.x loads a compressed-tensors model in float16
        # (its quantizer's default): name the float dtype the model was exported in.
        config["dtype"] = _float_dtype_name(model)
    return json.dumps(config, indent=2, sort_keys=True).encode()


def _float_dtype_name(model: nn.Module) -> str:
    """``"float32"`` for a float32 model: the dtype of its first floating parameter."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return str(dtype).removeprefix("torch.")
