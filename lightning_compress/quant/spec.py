"""What a quantized tensor looks like: bits, granularity, symmetry."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from lightning_compress.core.validate import ArgumentError, dtype_spelled

GRANULARITIES = ("tensor", "channel", "group")
SCALE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class QuantSpec:
    """An integer grid for a weight (or activation).

    Codes are signed, ``[-2**(bits-1), 2**(bits-1) - 1]``, as in torchao and
    compressed-tensors. Weights are seen as a matrix ``[out, in]`` (Conv kernels are
    flattened to ``[out, in * kernel]``); ``"channel"`` has one scale per output row,
    ``"group"`` one per ``group_size`` consecutive inputs of a row, ``"tensor"`` one.

    Args:
        bits: 2 to 8.
        granularity: ``"tensor"``, ``"channel"`` or ``"group"``; by default ``"group"``
            when ``group_size`` is given, else ``"channel"`` (as QAT's argument).
        group_size: inputs sharing a scale; required for (and only for) ``"group"``.
        symmetric: zero point fixed at 0 (else a per-scale integer zero point). Both
            keep 0.0 exactly representable, so pruned weights stay exactly zero.
        scale_dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``: the dtype scales are
            stored in after export. Scales are rounded to it while training, so the
            exported weights dequantize to exactly the trained ones.
    """

    bits: int = 8
    granularity: str | None = None
    group_size: int | None = None
    symmetric: bool = True
    scale_dtype: str = "float32"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ArgumentError("bits", f"`bits` must be an int from 2 to 8, got {self.bits!r}")
        if self.granularity is None:
            object.__setattr__(self, "granularity", "channel" if self.group_size is None else "group")
        if self.granularity not in GRANULARITIES:
            raise ArgumentError("granularity", f"unknown `granularity` {self.granularity!r}; choose one of {GRANULARITIES}")
        if self.granularity == "group":
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
                raise ArgumentError(
                    "group_size",
                    f"`group_size` must be an int >= 2 for granularity='group', got {self.group_size!r}"
                    + ("; for one scale per output channel instead, set granularity='channel'"
                       if self.group_size is None else "")
                )
        elif self.group_size is not None:
            raise ArgumentError(
                "group_size",
                f"`group_size`={self.group_size} only applies to granularity='group' (got"
                f" granularity={self.granularity!r}); drop group_size or use granularity='group'"
            )
        if not isinstance(self.symmetric, bool):
            raise ArgumentError("symmetric", f"`symmetric` must be True or False, got {self.symmetric!r}")
        object.__setattr__(self, "scale_dtype", dtype_spelled(self.scale_dtype))  # torch.float16 as "float16"
        if self.scale_dtype not in SCALE_DTYPES:
            raise ArgumentError("scale_dtype", f"unknown `scale_dtype` {self.scale_dtype!r}; choose one of {SCALE_DTYPES}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def granularity_label(self) -> str:
        """``"tensor"``, ``"channel"`` or ``"g<group_size>"``."""
        return f"g{self.group_size}" if self.granularity == "group" else self.granularity

    def describe(self) -> str:
        text = f"int{self.bits} {self.granularity_label} {'sym' if self.symmetric else 'asym'}"
        # float32 scales are left out so checkpoints written before `scale_dtype` still match.
        return text if self.scale_dtype == "float32" else f"{text} {self.scale_dtype} scales"

    def replace(self, **changes: Any) -> "QuantSpec":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        if values["granularity"] != "group" and "group_size" not in changes:
            values["group_size"] = None  # switching away from groups drops the group size
        return QuantSpec(**values)


def parse_bits(argument: str, value: Any) -> int:
    """``"int4"``, ``"int8"`` or an int from 2 to 8 → bits.

    Raises:
        ArgumentError: naming ``argument`` for anything else.
    """
    if isinstance(value, str) and value.lower().startswith("int") and value[3:].isdigit():
        value = int(value[3:])
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
        raise ArgumentError(
            argument,
            f"`{argument}` must be 'int2'..'int8' or an int from 2 to 8 (bits), got {value!r}"
        )
    return value


def spec_from_options(argument: str, options: Mapping[str, Any], base: QuantSpec) -> QuantSpec:
    """A spec from ``base`` with ``options`` (``bits``/``weights``, ``granularity``,
    ``group_size``, ``symmetric``) applied; used for per-layer overrides.

    Raises:
        ArgumentError: an unknown option key (with the allowed ones) or a bad value.
    """
    allowed = {"bits", "weights", "granularity", "group_size", "symmetric", "scale_dtype"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ArgumentError(argument, f"`{argument}` has unknown option(s) {unknown}; allowed: {sorted(allowed)}")
    changes = dict(options)
    if "weights" in changes and "bits" in changes:
        raise ArgumentError(argument, f"`{argument}` gives both `weights` and `bits`; keep one")
    if "weights" in changes:
        changes["bits"] = parse_bits(f"{argument}.weights", changes.pop("weights"))
    elif "bits" in changes:
        changes["bits"] = parse_bits(f"{argument}.bits", changes["bits"])
    if "group_size" in changes and changes["group_size"] is not None and "granularity" not in changes:
        changes["granularity"] = "group"
    try:
        return base.replace(**changes)
    except ValueError as err:
        raise ArgumentError(argument, f"`{argument}`: {err}") from None
