"""Model outputs compared: every floating-point tensor of an output flattened, and the
relative error and SQNR of one output against another, as running sums over batches."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, List, Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_compress.core.notes import add_note
from lightning_compress.formats.inputs import model_call_note


class OutputError:
    """Running sums of ``||a||^2`` and ``||a - b||^2`` (in float64) over pieces of two outputs,
    so a figure over many batches needs no concatenation of them."""

    CHUNK = 1 << 18
    """Elements compared at a time: two float64 copies of that many (4 MB) are the temporaries."""

    def __init__(self) -> None:
        self.reference = 0.0
        self.difference = 0.0

    def add(self, reference: Tensor, other: Tensor) -> "OutputError":
        reference, other = reference.detach().reshape(-1), other.detach().reshape(-1)
        if reference.numel() != other.numel():
            raise ValueError(f"outputs of {reference.numel()} and {other.numel()} elements cannot be compared")
        for start in range(0, reference.numel(), self.CHUNK):
            a = reference[start: start + self.CHUNK].double()
            b = other[start: start + self.CHUNK].to(a.device, torch.float64, copy=True).sub_(a)
            self.reference += float(torch.dot(a, a))
            self.difference += float(torch.dot(b, b))
        return self

    def add_unequal(self) -> "OutputError":
        """Count outputs that do not even hold the same number of values: an infinite error."""
        self.difference = math.inf
        return self

    @property
    def relative_error(self) -> float:
        """``||a - b|| / ||a||`` (``||a - b||`` when ``a`` is zero)."""
        if self.reference > 0:
            return math.sqrt(self.difference / self.reference)
        return math.sqrt(self.difference)

    @property
    def sqnr_db(self) -> float:
        """``20 log10(||a|| / ||a - b||)``: ``inf`` when they are equal."""
        if self.difference == 0:
            return math.inf
        ratio = self.reference / self.difference  # 0 for a zero reference or an infinite difference
        return 10 * math.log10(ratio) if ratio > 0 else (-math.inf if ratio == 0 else math.nan)


def relative_error(reference: Tensor, other: Tensor) -> float:
    return OutputError().add(reference, other).relative_error


def sqnr_db(reference: Tensor, other: Tensor) -> float:
    return OutputError().add(reference, other).sqnr_db


def flatten_outputs(output: Any) -> Tensor:
    """Every floating-point tensor in a (nested) model output, flattened and joined."""
    found: List[Tensor] = []
    _collect_floating(output, found)
    if not found:
        raise ValueError("the model's output holds no floating-point tensor to compare")
    return torch.cat(found)


def _collect_floating(value: Any, found: List[Tensor]) -> None:
    # A module-level function, not a closure calling itself: that closure is a reference cycle
    # that kept every output it visited alive until the garbage collector ran (80 MB of a
    # 134 MB model's layer outputs during the parity check).
    if isinstance(value, Tensor):
        if value.is_floating_point():
            found.append(value.detach().reshape(-1).float().cpu())
    elif isinstance(value, Mapping):
        for item in value.values():
            _collect_floating(item, found)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _collect_floating(item, found)


@contextlib.contextmanager
def trained_default_dtype(model: nn.Module) -> Iterator[None]:
    """Torch's default dtype as a model whose floating parameters are all bfloat16, float16
    or float64 trained under: Lightning's ``"bf16-true"``, ``"16-true"`` and ``"64-true"``
    set it around every step, so a tensor the forward makes (``torch.ones``, a positional
    table) is in the weights' dtype; the export's checks run the forward the same way."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    dtype = dtypes.pop() if len(dtypes) == 1 else None
    if dtype not in (torch.bfloat16, torch.float16, torch.float64):
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def call_model(model: nn.Module, inputs: Any, index: int | None = None, *, packed_failed: Sequence = ()) -> Any:
    """``model(*inputs)`` for a tuple/list, ``model(**inputs)`` for a dict, else ``model(inputs)``.

    With ``index`` (the position of ``inputs`` among the export's), an error the model's own
    forward raises (not a packed layer the check runs inside it: ``packed_failed`` names
    one then) goes on as it is, with a note saying how ``forward`` bound the inputs, and
    :func:`raised_by_the_model` tells it apart from a failure of the packed files.
    """
    try:
        with trained_default_dtype(model):
            if isinstance(inputs, Mapping):
                return model(**inputs)
            if isinstance(inputs, (tuple, list)):
                return model(*inputs)
            return model(inputs)
    except Exception as error:
        if index is not None and not packed_failed:
            add_note(error, model_call_note(model, inputs, index))
            error.lc_raised_by_the_model = True
        raise


def raised_by_the_model(error: BaseException) -> bool:
    """Whether ``error`` came from the model's own forward on the export's inputs."""
    return getattr(error, "lc_raised_by_the_model", False)


__all__ = ["OutputError", "call_model", "raised_by_the_model", "flatten_outputs", "relative_error", "sqnr_db"]
