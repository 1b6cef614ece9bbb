"""MagnitudePruning: gradual magnitude pruning as a Lightning callback."""

from __future__ import annotations

import math
import uuid
from typing import Any, Dict, List, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_compress.core.compatibility import prepare_stack
from lightning_compress.core.distributed import broadcast_from_rank_zero, is_distributed
from lightning_compress.core.reporting import expect_layer_table, report_layer_table
from lightning_compress.core.schedule import StepLike, resolve_step, steps_are_ordered, validate_step
from lightning_compress.core.state import STATE_VERSION, check_state_version
from lightning_compress.core.tracking import log_line_chart
from lightning_compress.core.targeting import Target, select_layers, validate_name, validate_targets
from lightning_compress.core.transforms import (
    Stage,
    bind_owner,
    install_weight_transform,
    is_bound,
    owner_tokens,
    raw_weight,
    remove_weight_transform,
    stages,
    weight_before,
)
from lightning_compress.sparsity.masks import (
    MaskedWeight,
    SparsityPattern,
    check_nm_compatible,
    global_masks,
    layer_mask,
    pack_mask,
    unpack_mask,
)
from lightning_compress.sparsity.schedules import SCHEDULES, scheduled_sparsity

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
DEFAULT_TARGET_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# With `update_every=None` the masks change this many times over the schedule.
_DEFAULT_UPDATES = 20


class MagnitudePruning(Callback):
    r"""Prune the smallest weights gradually while the model trains.

    The sparsity target follows Zhu & Gupta's cubic schedule (or a linear or one-shot
    one) in optimizer steps, and at each update the lowest-magnitude weights are masked.
    Masked weights are exactly zero from then on: the mask multiplies the weight in the
    forward pass (so their gradients and optimizer state are zero) and the stored weight
    is zeroed after every optimizer step, so the checkpoint and the trained module hold
    the sparse weights and load into your unmodified class.

    Example::

        trainer = Trainer(callbacks=[MagnitudePruning(0.8, end_step=0.7)])

    Logged with ``pl_module.log`` every step: ``pruning/sparsity_scheduled``,
    ``pruning/sparsity_actual`` (what the masks prune) and ``pruning/sparsity/<group>``
    for each group of layers (the first part of their names after the prefix all targeted
    layers share: ``encoder`` for ``model.encoder.layer.0.fc`` next to ``model.pooler.fc``).
    With a ``WandbLogger``, the whole scheduled curve is logged
    at fit start as a chart, ``pruning/schedule``; at fit end one table,
    ``compression/layers``, describes every compressed layer (also printed).

    Args:
        final_sparsity: fraction of the targeted weights pruned at ``end_step``, in
            ``[0, 1)``. Defaults to 0.5, or to ``(M - N) / M`` for an N:M ``pattern``
            (which fixes it).
        initial_sparsity: the sparsity at ``start_step``.
        schedule: ``"cubic"`` (Zhu & Gupta), ``"linear"`` or ``"one_shot"`` (prune to
            ``final_sparsity`` at ``start_step``).
        start_step: first pruning step: an int optimizer step, or a float in ``[0, 1]``
            read as a fraction of ``trainer.estimated_stepping_batches``.
        end_step: step at which ``final_sparsity`` is reached (same forms). Masks stay
            applied after it.
        update_every: optimizer steps between mask updates; ``None`` spreads 20 updates
            over the schedule.
        pattern: ``"unstructured"`` (single weights), ``"structured"`` (whole output
            channels / filters by ``norm``) or ``"N:M"`` such as ``"2:4"`` (N kept in
            every M consecutive weights along the input dimension).
        scope: ``"layer"`` (every layer reaches the target) or ``"global"`` (one
            threshold over all targeted layers).
        norm: 1 or 2: the norm that ranks channels for ``pattern="structured"``.
        targets: layer types and/or name globs to prune; ``None`` prunes every Linear
            and Conv layer. Biases and norm layers are never pruned.
        exclude: layer types and/or name globs to leave dense.
        name: distinguishes the checkpoint state of several pruning callbacks in one
            Trainer (e.g. different sparsities for different layers).
    """

    def __init__(
        self,
        final_sparsity: float | None = None,
        *,
        initial_sparsity: float = 0.0,
        schedule: str = "cubic",
        start_step: StepLike = 0,
        end_step: StepLike = 0.75,
        update_every: int | None = None,
        pattern: str = "unstructured",
        scope: str = "layer",
        norm: int = 1,
        targets: Sequence[Target] | None = None,
        exclude: Sequence[Target] | None = None,
        name: str | None = None,
    ) -> None:
        self.pattern = SparsityPattern.parse(pattern)
        fixed = self.pattern.fixed_sparsity
        if final_sparsity is None:
            final_sparsity = 0.5 if fixed is None else fixed
        _check_fraction("final_sparsity", final_sparsity)
        _check_fraction("initial_sparsity", initial_sparsity)
        if fixed is not None and abs(final_sparsity - fixed) > 1e-12:
            raise ValueError(
                f"`pattern`='{self.pattern}' fixes the sparsity at {fixed}; leave"
                f" `final_sparsity` unset (got {final_sparsity})"
            )
        if initial_sparsity > final_sparsity:
            raise ValueError(
                f"`initial_sparsity`={initial_sparsity} exceeds `final_sparsity`={final_sparsity};"
                " sparsity only grows during pruning"
            )
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown `schedule` {schedule!r}; choose one of {SCHEDULES}")
        validate_step("start_step", start_step)
        validate_step("end_step", end_step)
        if schedule != "one_shot" and steps_are_ordered(start_step, end_step) is False:
            raise ValueError(
                f"`end_step`={end_step} must come after `start_step`={start_step}"
            )
        if update_every is not None and (
            isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1
        ):
            raise ValueError(f"`update_every` must be a positive int or None, got {update_every!r}")
        if scope not in ("layer", "global"):
            raise ValueError(f"unknown `scope` {scope!r}; choose 'layer' or 'global'")
        if scope == "global" and self.pattern.kind == "n:m":
            raise ValueError(
                f"`scope`='global' cannot be combined with `pattern`='{self.pattern}': N:M fixes"
                " every group's sparsity. Use scope='layer'."
            )
        if norm not in (1, 2):
            raise ValueError(f"`norm` must be 1 or 2, got {norm!r}")

        self.final_sparsity = float(final_sparsity)
        self.initial_sparsity = float(initial_sparsity)
        self.schedule = schedule
        self.start_step = start_step
        self.end_step = end_step
        self.update_every = update_every
        self.scope = scope
        self.norm = norm
        self.targets = validate_targets("targets", targets, PRUNABLE_TYPES)
        self.exclude = validate_targets("exclude", exclude, PRUNABLE_TYPES)
        self.name = validate_name(name)
        self.owner_token = uuid.uuid4().hex

        self._layers: Dict[str, nn.Module] = {}
        self._masks: Dict[str, MaskedWeight] = {}
        self._restored: Dict[str, Any] | None = None
        self._applied_sparsity = 0.0
        self._actual_sparsity = 0.0
        self._group_sparsity: Dict[str, float] = {}
        self._window: tuple[int, int, int] | None = None
        self._hook_handles: List[Any] = []
        self._last_logged_step = -1

    # ------------------------------------------------------------------ identity
    @property
    def state_key(self) -> str:
        # Stable across changed settings, so a resume with another pattern or other
        # targets finds the state and `load_state_dict` says what changed.
        return self._generate_state_key(name=self.name)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        prepare_stack(trainer, pl_module, stage)
        # Every stage, not only fit: `validate`/`test` with `ckpt_path` must see the masks,
        # because a LoRA layer's weight W + B·A is not sparse unless the mask multiplies it
        # (and an adapter-only checkpoint does not even hold the zeroed W).
        if not is_bound(pl_module, self.owner_token):
            self._forget()  # reused for another model: start from its dense weights
        layers = select_layers(
            pl_module,
            targets=self.targets,
            exclude=self.exclude,
            supported=PRUNABLE_TYPES,
            default=DEFAULT_TARGET_TYPES,
        )
        for name, layer in layers.items():  # check everything before changing anything
            check_nm_compatible(name, raw_weight(layer), self.pattern)
        rivals = owner_tokens(trainer.callbacks) - {self.owner_token}
        for name, layer in layers.items():
            transform = MaskedWeight()
            install_weight_transform(layer, Stage.MASK, transform, owner=self.owner_token, active_owners=rivals)
            self._masks[name] = transform
        self._layers = layers
        self._measure()  # logged from the first step, before any mask exists
        bind_owner(pl_module, self.owner_token)
        if self._restored is not None:
            self._apply_restored()

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        expect_layer_table(trainer)
        for optimizer in trainer.optimizers:
            # After every optimizer step, not every batch: right under gradient
            # accumulation and manual optimization alike.
            self._hook_handles.append(optimizer.register_step_post_hook(self._zero_pruned_weights))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Not in on_fit_start: `estimated_stepping_batches` builds the train dataloader,
        # and before the checkpoint's loop state is restored that makes Lightning drop a
        # resumable dataloader's saved position (a mid-epoch resume would replay data).
        total = trainer.estimated_stepping_batches
        self._window = self._resolve_window(total)
        if math.isfinite(total):
            log_line_chart(
                trainer, "pruning/schedule", range(int(total) + 1), lambda step: self._scheduled(step) or 0.0,
                x="step", y="sparsity", title="scheduled sparsity",
            )

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        target = self._follow_schedule(step)  # first batch of a run or of a resume
        if step != self._last_logged_step:
            self._last_logged_step = step
            metrics = {
                "pruning/sparsity_scheduled": 0.0 if target is None else target,
                "pruning/sparsity_actual": self._actual_sparsity,
            }
            metrics.update({f"pruning/sparsity/{group}": value for group, value in self._group_sparsity.items()})
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Right after the optimizer step that reaches an update point, so checkpoints
        # written at this batch or epoch end (ModelCheckpoint runs after us) hold the new
        # masks, and a schedule ending on the run's last step (`end_step=1.0`) is applied.
        self._follow_schedule(trainer.global_step)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        report_layer_table(trainer, pl_module)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        # The stored weights are zero where masked, so the user gets back their own layer
        # classes holding the sparse weights; a later fit re-attaches the masks. A layer
        # whose weight is still W + B·A (LoRA, not merged) keeps its mask: zeros in W
        # alone would not make the effective weight sparse.
        self._restored = self._state_of_masks()
        for name, layer in self._layers.items():
            if _mask_sees_raw(layer):
                self._zero_raw(name)
                remove_weight_transform(layer, Stage.MASK)
        self._masks.clear()
        self._layers.clear()

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> Dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "pattern": str(self.pattern),
            "applied_sparsity": self._applied_sparsity,
            "actual_sparsity": self._actual_sparsity,
            "masks": self._state_of_masks() if self._masks else (self._restored or {}),
        }

    def _forget(self) -> None:
        self._restored = None
        self._applied_sparsity = 0.0
        self._actual_sparsity = 0.0
        self._group_sparsity = {}
        self._last_logged_step = -1

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        check_state_version("MagnitudePruning", state_dict)
        if state_dict["pattern"] != str(self.pattern):
            raise ValueError(
                f"the checkpoint was pruned with pattern '{state_dict['pattern']}' but this"
                f" MagnitudePruning uses `pattern`='{self.pattern}'; resume with the same pattern"
            )
        self._applied_sparsity = float(state_dict["applied_sparsity"])
        self._actual_sparsity = float(state_dict["actual_sparsity"])
        self._restored = dict(state_dict["masks"])
        if self._masks:  # restored after setup (the usual order): apply now
            self._apply_restored()

    # ------------------------------------------------------------------ public helpers
    @property
    def sparsity(self) -> float:
        """Fraction of the targeted weights the masks prune now."""
        return self._actual_sparsity

    # ------------------------------------------------------------------ internals
    def _scheduled(self, step: int) -> float | None:
        """The schedule's target at ``step`` in this run (``None`` before it starts)."""
        start, end, every = self._window
        return scheduled_sparsity(
            step,
            initial=self.initial_sparsity,
            final=self.final_sparsity,
            start=start,
            end=end,
            update_every=every,
            kind=self.schedule,
        )

    def _follow_schedule(self, step: int) -> float | None:
        """Update the masks if the schedule's target at ``step`` differs from the applied one."""
        target = self._scheduled(step)
        if target is not None and target != self._applied_sparsity:
            self._update_masks(target)
        return target

    def _resolve_window(self, total_steps: float) -> tuple[int, int, int]:
        start = resolve_step("start_step", self.start_step, total_steps)
        end = resolve_step("end_step", self.end_step, total_steps)
        if self.schedule == "one_shot":
            end = start
        elif end <= start:
            raise ValueError(
                f"`end_step` resolves to step {end}, not after `start_step` (step {start}) in this"
                f" run of {total_steps} steps; move `end_step` later"
            )
        elif end > total_steps:
            rank_zero_warn(
                f"MagnitudePruning: `end_step` is step {end} but the run has {total_steps}"
                f" optimizer steps; `final_sparsity`={self.final_sparsity} will not be reached."
            )
        every = self.update_every or max(1, (end - start) // _DEFAULT_UPDATES)
        return start, end, every

    @torch.no_grad()
    def _update_masks(self, sparsity: float) -> None:
        # Score what the MASK stage sees: the merged weight when adapters sit below it.
        weights = {name: weight_before(layer, Stage.MASK) for name, layer in self._layers.items()}
        if self.scope == "global":
            keeps = global_masks(weights, sparsity, self.pattern, self.norm)
        else:
            keeps = {n: layer_mask(w, sparsity, self.pattern, self.norm) for n, w in weights.items()}
        if is_distributed():  # every rank takes rank 0's masks, sent as bits
            names = list(keeps)
            packed = broadcast_from_rank_zero([pack_mask(keeps[n]) for n in names])
            keeps = {name: unpack_mask(bits, keeps[name].shape) for name, bits in zip(names, packed)}
        for name, keep in keeps.items():
            self._set_mask(name, keep)
        self._applied_sparsity = sparsity
        self._measure()

    def _set_mask(self, name: str, keep: torch.Tensor) -> None:
        self._masks[name].set(keep, like=raw_weight(self._layers[name]))
        self._zero_raw(name)

    @torch.no_grad()
    def _zero_raw(self, name: str) -> None:
        # Only where the mask acts on the raw parameter itself: under a LoRA adapter the
        # mask acts on W + B·A (and W is frozen, perhaps NF4), so the MASK stage alone
        # keeps the effective weight sparse.
        layer, transform = self._layers[name], self._masks[name]
        if transform.mask is not None and _mask_sees_raw(layer):
            raw_weight(layer).mul_(transform.mask)

    def _measure(self) -> None:
        """The fraction of the targeted weights the masks prune: overall, and per group of
        layers (see :func:`_layer_groups`)."""
        pruned: Dict[str, int] = {}
        total: Dict[str, int] = {}
        groups = _layer_groups(list(self._layers))
        for name, layer in self._layers.items():
            group, mask = groups[name], self._masks[name].mask
            pruned[group] = pruned.get(group, 0) + (0 if mask is None else int((mask == 0).sum()))
            total[group] = total.get(group, 0) + raw_weight(layer).numel()
        self._actual_sparsity = sum(pruned.values()) / sum(total.values())
        self._group_sparsity = {group: pruned[group] / total[group] for group in total}

    def _zero_pruned_weights(self, *_: Any) -> None:
        for name in self._masks:
            self._zero_raw(name)

    def _state_of_masks(self) -> Dict[str, Any]:
        state = {}
        for name, transform in self._masks.items():
            if transform.mask is not None:
                keep = transform.keep
                state[name] = {"packed": pack_mask(keep).cpu(), "shape": list(keep.shape)}
        return state

    def _apply_restored(self) -> None:
        restored, self._restored = self._restored or {}, None
        unknown = sorted(set(restored) - set(self._layers))
        missing = sorted(set(self._layers) - set(restored)) if restored else []
        if unknown or missing:
            raise ValueError(
                f"the checkpoint's pruning masks cover other layers than this MagnitudePruning"
                f" targets (only in the checkpoint: {unknown}; only targeted now: {missing})."
                " Resume with the same `targets` and `exclude`."
            )
        for name, entry in restored.items():
            self._set_mask(name, unpack_mask(entry["packed"], tuple(entry["shape"])))
        self._measure()


def _layer_groups(names: List[str]) -> Dict[str, str]:
    """Layer name -> group: the first name component after the prefix all targeted layers
    share, so a model kept in ``self.model`` (``model.encoder.layer.3.output.dense``) is
    grouped by block (``3``) rather than all in ``model``."""
    parts = [name.split(".") for name in names]
    shared = 0
    while parts and all(len(p) > shared + 1 for p in parts) and len({p[shared] for p in parts}) == 1:
        shared += 1
    return {name: p[shared] for name, p in zip(names, parts)}


def _mask_sees_raw(layer: nn.Module) -> bool:
    return not any(stage < Stage.MASK for stage in stages(layer))


def _check_fraction(argument: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{argument}` must be a number in [0, 1), got {value!r}")

