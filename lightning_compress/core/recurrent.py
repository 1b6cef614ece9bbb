"""The cached weight list of a transformed recurrent layer (``nn.RNNBase``).

Recurrent layers compute from ``_flat_weights``, a list of their weights cached at
construction and after ``.to()``. The transformed class (see
:mod:`~lightning_compress.core.transforms`) fills it with the effective weights for the
duration of each forward and keeps the raw parameters there otherwise, so copies and
pickles hold leaf tensors.
"""

from __future__ import annotations

import weakref

from torch import nn


def raw_flat_weights(self: nn.RNNBase) -> list:
    """The layer's raw parameters, in ``_flat_weights`` order."""
    return [self._parameters.get(name) for name in self._flat_weights_names]


def raw_init_flat_weights(self: nn.RNNBase) -> None:
    """``_init_flat_weights`` of a transformed recurrent layer."""
    # RNNBase calls this after `.to()`/`.half()` and on construction: keep the raw leaves.
    self._flat_weights = raw_flat_weights(self)
    self._flat_weight_refs = [None if w is None else weakref.ref(w) for w in self._flat_weights]
    self.flatten_parameters()


def effective_flat_weights(self: nn.RNNBase) -> None:
    """``_update_flat_weights`` of a transformed recurrent layer."""
    # RNNBase.forward calls this first: its cached weight list becomes the effective
    # weights, each stack run once (the base version would run them up to four times).
    self._flat_weights = [getattr(self, name) for name in self._flat_weights_names]


def recurrent_getstate(self: nn.RNNBase) -> dict:
    """``__getstate__`` of a transformed recurrent layer."""
    # Copies and pickles hold the raw (leaf) parameters, never a forward's effective ones.
    self._flat_weights = raw_flat_weights(self)
    state = self.__dict__.copy()
    state.pop("_flat_weight_refs", None)
    return state
