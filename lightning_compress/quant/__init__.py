"""Pure-torch quantization numerics (no Lightning import anywhere in here)."""

from lightning_compress.quant.fake_quant import QuantizedWeight
from lightning_compress.quant.spec import QuantSpec
from lightning_compress.quant.weights import quantized_weights, round_to_nearest

__all__ = ["QuantSpec", "QuantizedWeight", "quantized_weights", "round_to_nearest"]
