"""Pruning settings, validated once: the arguments of :class:`lightning_compress.MagnitudePruning`."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from typing import ClassVar, Sequence, Tuple

from torch import nn

from lightning_compress.core.incompatible import LayerIssue, check_on_incompatible, compressed_weight
from lightning_compress.core.schedule import StepLike, steps_are_ordered, validate_step
from lightning_compress.core.targeting import RECURRENT_TYPES, Target, validate_name, validate_targets
from lightning_compress.core.validate import ArgumentError, check_choice, check_fraction, check_int
from lightning_compress.sparsity.activation_norms import SCORES, wanda_issue, wanda_start_message
from lightning_compress.sparsity.masks import SparsityPattern, check_nm_compatible
from lightning_compress.sparsity.schedules import SCHEDULES

# nn.MultiheadAttention: its `in_proj_weight` (its `out_proj` is a Linear of its own).
PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.MultiheadAttention, *RECURRENT_TYPES)
DEFAULT_TARGET_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, *RECURRENT_TYPES)
SCOPES = ("layer", "global")
NORMS = (1, 2)


@dataclass(frozen=True)
class PruningConfig:
    """What to prune, how much and when. See :class:`lightning_compress.MagnitudePruning`
    for the meaning of each field; every field is checked when the config is built.

    Raises:
        ArgumentError: naming the bad field.
    """

    final_sparsity: float | None = None
    _: KW_ONLY
    initial_sparsity: float = 0.0
    schedule: str = "cubic"
    start_step: StepLike = 0
    end_step: StepLike = 0.75
    update_every: int | None = None
    pattern: str = "unstructured"
    scope: str = "layer"
    norm: int = 1
    score: str = "magnitude"
    targets: Sequence[Target] | None = None
    exclude: Sequence[Target] | None = None
    on_incompatible: str = "error"
    name: str | None = None
    sparsity_pattern: SparsityPattern = field(init=False, repr=False, compare=False)
    supported_types: ClassVar[Tuple[type, ...]] = PRUNABLE_TYPES  # what `targets` may name
    default_types: ClassVar[Tuple[type, ...]] = DEFAULT_TARGET_TYPES  # what no `targets` means

    def layer_issue(self, key: str, layer: nn.Module) -> LayerIssue | None:
        """Why these settings cannot prune the selected layer ``key``, or ``None``: a layer
        ``score="wanda"`` cannot rank (its input is not a float feature matrix), or N:M
        blocks that do not fit its inputs (per group, for a grouped convolution)."""
        if self.score == "wanda" and (why := wanda_issue(key, layer)) is not None:
            return LayerIssue("score", self.score, why)
        try:
            check_nm_compatible(key, compressed_weight(key, layer), self.sparsity_pattern)
        except ValueError as err:
            return LayerIssue("pattern", str(self.sparsity_pattern), str(err))
        return None

    def __post_init__(self) -> None:
        pattern = SparsityPattern.parse(self.pattern)
        fixed = pattern.fixed_sparsity
        final = self.final_sparsity
        if final is None:
            final = 0.5 if fixed is None else fixed
        final = check_fraction("final_sparsity", final)
        initial = check_fraction("initial_sparsity", self.initial_sparsity)
        if fixed is not None and abs(final - fixed) > 1e-12:
            raise ArgumentError(
                "final_sparsity",
                f"`pattern`='{pattern}' fixes the sparsity at {fixed}; leave `final_sparsity` unset (got {final})",
            )
        if initial > final:
            raise ArgumentError(
                "initial_sparsity",
                f"`initial_sparsity`={initial} exceeds `final_sparsity`={final}; sparsity only grows during pruning",
            )
        check_choice("schedule", self.schedule, SCHEDULES)
        validate_step("start_step", self.start_step)
        validate_step("end_step", self.end_step)
        if self.schedule != "one_shot" and steps_are_ordered(self.start_step, self.end_step) is False:
            raise ArgumentError(
                "end_step", f"`end_step`={self.end_step} must come after `start_step`={self.start_step}"
            )
        if self.update_every is not None:
            check_int("update_every", self.update_every, what="a positive int or None")
        if self.scope not in SCOPES:
            raise ArgumentError("scope", f"unknown `scope` {self.scope!r}; choose 'layer' or 'global'")
        if self.scope == "global" and pattern.kind == "n:m":
            raise ArgumentError(
                "scope",
                f"`scope`='global' cannot be combined with `pattern`='{pattern}': N:M fixes every group's"
                " sparsity. Use scope='layer'.",
            )
        if self.norm not in NORMS or isinstance(self.norm, bool):
            raise ArgumentError("norm", f"`norm` must be 1 or 2, got {self.norm!r}")
        check_choice("score", self.score, SCORES)
        # The first update at step 0 (one-shot, or a non-zero `initial_sparsity`) comes
        # before any training forward; a float start resolving to 0 is caught at fit start.
        if self.score == "wanda" and self.start_step == 0 and (self.schedule == "one_shot" or initial > 0):
            raise ArgumentError("start_step", wanda_start_message(self.start_step))
        object.__setattr__(self, "final_sparsity", final)
        object.__setattr__(self, "initial_sparsity", initial)
        object.__setattr__(self, "targets", validate_targets("targets", self.targets, PRUNABLE_TYPES))
        object.__setattr__(self, "exclude", validate_targets("exclude", self.exclude, PRUNABLE_TYPES))
        check_on_incompatible(self.on_incompatible)
        object.__setattr__(self, "name", validate_name(self.name))
        object.__setattr__(self, "sparsity_pattern", pattern)


__all__ = ["PruningConfig", "PRUNABLE_TYPES", "DEFAULT_TARGET_TYPES"]
