"""Layers a method selected but cannot compress, and what a callback does about them.

A method's config answers, layer by layer, whether it can compress a layer its targets
select (:class:`LayerIssue`: the argument that stands in the way, and the message). What
happens then is one rule for every method (applied before training by
:mod:`lightning_compress.callbacks.compatibility`):

- ``on_incompatible="error"`` (the default): every such layer, of every callback, is
  named in one error before the first step, with the ``exclude`` entries that fix them;
- ``on_incompatible="skip"``: those layers are left out of that callback (in float,
  dense, without an adapter), named in one warning, and counted in its report;
- a grouped or depthwise convolution that a method cannot compress is left out with a
  warning whatever ``on_incompatible`` says when it was selected by its type (the default
  targets, or a type in ``targets``), and stays an error when a name glob selects it: a
  layer named on purpose is never dropped in silence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from torch import Tensor, nn

from lightning_compress.core.targeting import name_matches, weight_param
from lightning_compress.core.transforms import raw_weight
from lightning_compress.core.validate import ArgumentError

ON_INCOMPATIBLE = ("error", "skip")


@dataclass(frozen=True)
class LayerIssue:
    """Why a method cannot compress one layer: ``argument`` (a config field) with its
    ``value`` is what stands in the way; ``message`` names the layer, why, and a fix."""

    argument: str
    value: Any
    message: str


def check_on_incompatible(value: Any) -> str:
    """Validate an ``on_incompatible`` argument.

    Raises:
        ArgumentError: naming ``on_incompatible`` and the allowed values.
    """
    if not isinstance(value, str) or value not in ON_INCOMPATIBLE:
        raise ArgumentError(
            "on_incompatible",
            f"`on_incompatible` must be 'error' (stop before training, naming every layer the method cannot"
            f" compress) or 'skip' (leave those layers out, with a warning), got {value!r}",
        )
    return value


def grouped_convolution(layer: nn.Module) -> str | None:
    """``"depthwise"`` / ``"groups=G"`` for a convolution with ``groups > 1``, else ``None``."""
    groups = getattr(layer, "groups", 1)
    if not isinstance(layer, nn.modules.conv._ConvNd) or groups == 1:
        return None
    return "depthwise" if groups == layer.in_channels else f"groups={groups}"


def limited_by_type(layer: nn.Module) -> str | None:
    """What makes ``layer`` a form of its type that some methods cannot compress (they
    leave it out, with a warning, when a type selected it): a grouped convolution
    (``"depthwise"``, ``"groups=G"``), or an ``nn.MultiheadAttention`` with separate
    query/key/value weights (``"separate q/k/v weights"``); ``None`` otherwise."""
    grouped = grouped_convolution(layer)
    if grouped is not None:
        return grouped
    if isinstance(layer, nn.MultiheadAttention) and layer._parameters.get("in_proj_weight") is None:
        return "separate q/k/v weights"
    return None


def named_by(name: str, targets: Sequence[Any] | None) -> bool:
    """Whether a name glob of ``targets`` selects layer ``name`` (the targeting rule: the
    whole name or a trailing part of it), rather than only a layer type."""
    return any(isinstance(t, str) and name_matches(name, t) for t in targets or ())


def compressed_weight(key: str, layer: nn.Module) -> Tensor:
    """The raw parameter a method compresses for selection key ``key`` on ``layer``: one
    weight matrix of a recurrent layer (``rnn.weight_ih_l0``), else the layer's weight."""
    return raw_weight(layer, weight_param(key, layer))


def describe_layer(layer: nn.Module) -> str:
    """``Conv2d``, ``Conv2d, depthwise``, ``Conv2d, groups=2``: a layer in a message."""
    limited = limited_by_type(layer)
    return type(layer).__name__ + (f", {limited}" if limited else "")


__all__ = [
    "ON_INCOMPATIBLE",
    "LayerIssue",
    "check_on_incompatible",
    "compressed_weight",
    "describe_layer",
    "grouped_convolution",
    "limited_by_type",
    "named_by",
]
