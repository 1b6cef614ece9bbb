"""Feature distillation: learned projections from the student's feature width to the
teacher's, and the MSE between the pairs. Pure torch, no Lightning import."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch
from torch import Tensor, nn

from lightning_compress.core.side_optimizer import SideOptimizer

FeaturePairs = List[Tuple[Tensor, Tensor]]


def projection(student_width: int, teacher_width: int, seed: int) -> nn.Linear:
    """An ``nn.Linear(student_width, teacher_width)`` with its usual initialisation, drawn from ``seed``."""
    # nn.Linear's own initialisation, from a fixed generator: every rank builds the same
    # projection, and the global RNG (dropout, shuffling) is left as it was.
    layer = nn.utils.skip_init(nn.Linear, student_width, teacher_width)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
        bound = 1 / math.sqrt(student_width)
        nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return layer


def match_features(
    names: Sequence[Tuple[str, str]], student: Mapping[int, Tensor], teacher: Mapping[int, Tensor]
) -> FeaturePairs:
    """The (student, teacher) feature tensors of each pair of layer ``names``, by index.

    Raises:
        RuntimeError: a layer of a pair was not called.
        ValueError: the two features of a pair differ in shape other than the last dimension.
    """
    pairs = []
    for index, (student_name, teacher_name) in enumerate(names):
        if index not in student:
            raise RuntimeError(f"`features` student layer {student_name!r} was not called in this training_step")
        if index not in teacher:
            raise RuntimeError(f"`features` teacher layer {teacher_name!r} was not called by the teacher's forward")
        s, t = student[index], teacher[index]
        if s.shape[:-1] != t.shape[:-1]:
            raise ValueError(
                f"`features` pair ({student_name!r}, {teacher_name!r}): student shape"
                f" {tuple(s.shape)} and teacher shape {tuple(t.shape)} differ before the"
                " last dimension; only the width may differ"
            )
        pairs.append((s, t))
    return pairs


def _widths(pairs: FeaturePairs) -> List[Tuple[int, int]]:
    return [(s.shape[-1], t.shape[-1]) for s, t in pairs]


def build_projections(pairs: FeaturePairs) -> nn.ModuleDict:
    """A projection (keyed by the pair's index) for each pair whose widths differ, on the
    student feature's device, in float32 or wider."""
    projections = nn.ModuleDict()
    for index, (student_width, teacher_width) in enumerate(_widths(pairs)):
        if student_width != teacher_width:
            projections[str(index)] = projection(student_width, teacher_width, seed=index)
    like = pairs[0][0]
    return projections.to(device=like.device, dtype=torch.promote_types(like.dtype, torch.float32))


def check_projections(projections: nn.ModuleDict, pairs: FeaturePairs, names: Sequence[Tuple[str, str]]) -> None:
    """Raise a ``ValueError`` when a projection does not map its pair's widths (the models changed)."""
    widths = _widths(pairs)
    for key, layer in projections.items():
        student_width, teacher_width = widths[int(key)]
        if (layer.in_features, layer.out_features) != (student_width, teacher_width):
            raise ValueError(
                f"`features` pair {names[int(key)]} has widths {student_width} -> {teacher_width}"
                f" but its projection maps {layer.in_features} -> {layer.out_features}"
            )


def feature_loss(pairs: FeaturePairs, projections: nn.ModuleDict) -> Tensor:
    """Sum over the pairs of the float32 MSE between the (projected) student and the teacher feature."""
    loss = pairs[0][0].new_zeros((), dtype=torch.float32)
    for index, (student, teacher) in enumerate(pairs):
        key = str(index)
        if key in projections:
            student = projections[key](student.to(projections[key].weight.dtype))
        loss = loss + torch.nn.functional.mse_loss(student.float(), teacher.float().to(student.device))
    return loss


class FeatureProjections:
    """The projections of the ``features`` pairs, trained by their own Adam (``lr``) and
    checkpointed by the callback that owns them.

    They are built at the first :meth:`loss`, when the feature widths are known; state
    loaded before then waits for them (and is what :attr:`pending` returns).
    """

    def __init__(self, names: Sequence[Tuple[str, str]], lr: float) -> None:
        self.names = tuple(names)
        self.layers: nn.ModuleDict | None = None
        self.optimizer = SideOptimizer(lr)
        self.pending: Mapping[str, Any] | None = None

    def loss(self, pairs: FeaturePairs) -> Tensor:
        """:func:`feature_loss` of ``pairs``, building the projections at the first call."""
        if self.layers is None:
            self.layers = build_projections(pairs)
            self.optimizer.track(list(self.layers.parameters()))
            if self.pending is not None:
                self._apply(self.pending)
        check_projections(self.layers, pairs, self.names)
        return feature_loss(pairs, self.layers)

    def state_dict(self) -> Dict[str, Any]:
        """``projections`` (CPU copies of each layer's weights, by pair index) and, once
        built, ``projection_optimizer``."""
        if self.layers is None:
            return {"projections": {}}
        return {
            "projections": {
                key: {k: v.detach().cpu().clone() for k, v in layer.state_dict().items()}
                for key, layer in self.layers.items()
            },
            "projection_optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load the ``projections`` and ``projection_optimizer`` entries of ``state`` now, or
        when the projections are built."""
        if self.layers is None:
            self.pending = state
        else:
            self._apply(state)

    def _apply(self, state: Mapping[str, Any]) -> None:
        self.pending = None
        saved = state.get("projections", {})
        if set(saved) != set(self.layers.keys()):
            raise ValueError(
                f"the checkpoint holds feature projections {sorted(saved)} but this run needs"
                f" {sorted(self.layers.keys())}; resume with the same models and `features`"
            )
        for key, weights in saved.items():
            self.layers[key].load_state_dict(weights)
        if state.get("projection_optimizer") is not None:
            self.optimizer.load_state_dict(state["projection_optimizer"])


__all__ = [
    "FeatureProjections",
    "build_projections",
    "check_projections",
    "feature_loss",
    "match_features",
    "projection",
]
