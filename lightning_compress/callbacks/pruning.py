"""MagnitudePruning: gradual magnitude (or activation-aware) pruning as a Lightning callback."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress.callbacks.base import LayerCompressionCallback
from lightning_compress.core.distributed import broadcast_from_rank_zero, is_distributed
from lightning_compress.core.memory import release_after
from lightning_compress.core.schedule import fractional_steps
from lightning_compress.core.sharding import local, resharded, shard_like
from lightning_compress.core.targeting import weight_param
from lightning_compress.core.tracking import log_line_chart
from lightning_compress.core.transforms import (
    Stage,
    install_weight_transform,
    is_bound,
    raw_weight,
    remove_weight_transform,
    stages,
    weight_before,
)
from lightning_compress.core.validate import ArgumentError
from lightning_compress.sparsity.activation_norms import InputNorms, wanda_start_message
from lightning_compress.sparsity.config import PruningConfig
from lightning_compress.sparsity.masks import (
    MaskedWeight,
    check_nm_compatible,
    global_masks,
    layer_mask,
    pack_mask,
    unpack_mask,
)
from lightning_compress.sparsity.schedules import schedule_window, scheduled_sparsity

# With `update_every=None` the masks change this many times over the schedule.
_DEFAULT_UPDATES = 20


class MagnitudePruning(LayerCompressionCallback):
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
        score: what ranks the weights at every update: ``"magnitude"`` (``|W_ij|``) or
            ``"wanda"`` (Sun et al. 2023: ``|W_ij| · ‖X_j‖₂``, ``X_j`` the ``j``-th input
            feature of the layer, per input channel for a convolution, over the training
            forwards since the previous update, summed over DDP/FSDP2 ranks; not
            validation). Same patterns and scopes. Linear and Conv layers only: others
            (Embedding, ``nn.MultiheadAttention`` and its ``out_proj``, recurrent layers)
            are reported by ``on_incompatible``. Needs ``start_step`` >= 1 when the first
            update prunes (one-shot, or ``initial_sparsity`` > 0).
        targets: layer types and/or name globs to prune; ``None`` prunes every Linear,
            Conv and ``nn.MultiheadAttention`` layer (its ``in_proj_weight``; its
            ``out_proj`` is a Linear). Biases and norm layers are never pruned.
        exclude: layer types and/or name globs to leave dense.
        on_incompatible: ``"error"`` (default): targeted layers the ``pattern`` cannot
            prune (N:M blocks that do not fit their inputs, per group for a grouped
            convolution) stop the run before training, all named in one
            ``IncompatibleSettings``; ``"skip"``: they stay dense, named in one warning at
            setup and counted in the report (``pruning/skipped_layers``, the layer table's
            ``skipped`` column). A grouped or depthwise convolution selected by type that
            the pattern cannot prune is left out either way; one a name glob selects stays
            an error.
        name: distinguishes the checkpoint state of several pruning callbacks in one Trainer (e.g. different
            sparsities for different layers); each needs its own (Lightning refuses two of one class without).
        config: a built :class:`~lightning_compress.sparsity.config.PruningConfig`
            instead of the arguments above.

    Raises:
        ArgumentError: (a ``ValueError``) at construction, naming a bad argument.
        IncompatibleSettings: (a ``ValueError``) at setup, naming every targeted layer
            whose input size an N:M pattern cannot hold, or that ``score="wanda"`` cannot
            rank (with ``on_incompatible="error"``).
        ValueError: at setup, for targets that match no prunable layer; when resuming, for a checkpoint
            pruned with another pattern, score or other layers. With ``score="wanda"``: at fit start, for
            a first update at step 0; at an update, for a layer no training forward reached.
    """

    section = "pruning"
    config_class = PruningConfig
    # (`pattern` has its own check, with its own message.)
    resume_settings = ("final_sparsity", "initial_sparsity", "schedule", "start_step", "end_step", "update_every",
                       "scope", "norm")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._masks: Dict[str, MaskedWeight] = {}
        self._applied_sparsity = 0.0
        self._actual_sparsity = 0.0
        self._group_sparsity: Dict[str, float] = {}
        self._window: tuple[int, int, int] | None = None
        self._hook_handles: List[Any] = []
        self._norms: InputNorms | None = None  # score="wanda": the layers' input statistics

    # ------------------------------------------------------------------ hooks
    @override
    def install(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Every stage, not only fit: `validate`/`test` with `ckpt_path` must see the masks,
        # because a LoRA layer's weight W + B·A is not sparse unless the mask multiplies it
        # (and an adapter-only checkpoint does not even hold the zeroed W).
        if not is_bound(pl_module, self.owner_token):
            self._forget()  # reused for another model: start from its dense weights
        elif self.is_set_up() and self._restored is None:
            # Set up by an earlier validate/test: its masks, not empty ones (W + B·A went dense).
            self._restored = self.state_dict()
        layers = self.select(pl_module)
        for name, layer in layers.items():  # check everything before changing anything
            check_nm_compatible(name, _raw(layer, name), self.sparsity_pattern)
        rivals = self.rivals(trainer)
        for name, layer in layers.items():
            transform = MaskedWeight()
            install_weight_transform(layer, Stage.MASK, transform, owner=self.owner_token, active_owners=rivals,
                                     param=weight_param(name, layer))
            self._masks[name] = transform
        self._layers, self._model = layers, pl_module
        self._norms = InputNorms(layers, warn=rank_zero_warn) if self.score == "wanda" else None
        self._measure()  # logged from the first step, before any mask exists
        self.finish_install(pl_module)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        for optimizer in trainer.optimizers:
            # After every optimizer step, not every batch: right under gradient
            # accumulation and manual optimization alike.
            self._hook_handles.append(optimizer.register_step_post_hook(self._zero_pruned_weights))
        if self._norms is not None:
            self._norms.attach()

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Not in on_fit_start: `estimated_stepping_batches` builds the train dataloader, and before the checkpoint's
        # loop state is restored Lightning then drops a resumable loader's position (a mid-epoch resume would replay).
        total = trainer.estimated_stepping_batches
        fractions = fractional_steps(self.config, ("start_step", "end_step"))  # resumed: the run's length kept
        self._window = self._resolve_window(total, self.run_length.resolve(trainer, type(self).__name__, fractions))
        if self._norms is not None and trainer.global_step == 0 and self._scheduled(0):
            raise ArgumentError("start_step", wanda_start_message(self.start_step))
        if math.isfinite(total):
            log_line_chart(
                trainer, "pruning/schedule", range(int(total) + 1), lambda step: self._scheduled(step) or 0.0,
                x="step", y="sparsity", title="scheduled sparsity",
            )

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        target = self._follow_schedule(step)  # first batch of a run or of a resume
        metrics = {
            "pruning/sparsity_scheduled": 0.0 if target is None else target,
            "pruning/sparsity_actual": self._actual_sparsity,
        }
        metrics.update({f"pruning/sparsity/{group}": value for group, value in self._group_sparsity.items()})
        self.log_once(pl_module, step, metrics)
        if self._norms is not None:  # statistics for the updates still to come
            self._norms.start_batch(collect=step < self._window[1])

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Right after the optimizer step that reaches an update point, so checkpoints
        # written at this batch or epoch end (ModelCheckpoint runs after us) hold the new
        # masks, and a schedule ending on the run's last step (`end_step=1.0`) is applied.
        if self._norms is not None:
            self._norms.end_batch()  # before the update it may feed
        self._follow_schedule(trainer.global_step)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # No teardown follows: wanda's hooks would count every later forward, and the step
        # hook would zero weights in a later optimizer's steps. The masks stay, as the
        # model was when the exception came.
        self._remove_hooks()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._remove_hooks()
        # The stored weights are zero where masked, so the user gets back their own layer
        # classes holding the sparse weights; a later fit re-attaches the masks. A layer
        # whose weight is still W + B·A (LoRA, not merged) keeps its mask: zeros in W
        # alone would not make the effective weight sparse.
        self._restored = self.state_dict()
        resharded(pl_module)  # the zeros go into the shards FSDP2 keeps (after a validation too)
        for name, layer in self._layers.items():
            if _mask_sees_raw(layer, name):
                self._zero_raw(name)
                remove_weight_transform(layer, Stage.MASK, weight_param(name, layer))
        self._masks.clear()
        self._layers.clear()

    # ------------------------------------------------------------------ base-class hooks
    @override
    def method_state(self) -> Dict[str, Any]:
        return {
            "pattern": str(self.sparsity_pattern),
            "applied_sparsity": self._applied_sparsity,
            "actual_sparsity": self._actual_sparsity,
            "masks": self._state_of_masks(),
            "score": self.score,
            **({"activation_norms": self._norms.state()} if self._norms is not None else {}),
        }

    @override
    def check_state(self, state: Mapping[str, Any]) -> None:
        if state["pattern"] != str(self.sparsity_pattern):
            raise ValueError(
                f"the checkpoint was pruned with pattern '{state['pattern']}' but this"
                f" MagnitudePruning uses `pattern`='{self.sparsity_pattern}'; resume with the same pattern"
            )
        if state.get("score", "magnitude") != self.score:  # written before `score` existed: magnitude
            raise ValueError(
                f"the checkpoint was pruned with score '{state.get('score', 'magnitude')}' but this"
                f" MagnitudePruning uses `score`='{self.score}'; resume with the same score"
            )

    @override
    def restore(self, state: Mapping[str, Any]) -> None:
        self._applied_sparsity = float(state["applied_sparsity"])
        recorded = float(state["actual_sparsity"])
        masks = dict(state["masks"])
        unknown = sorted(set(masks) - set(self._layers))
        missing = sorted(set(self._layers) - set(masks)) if masks else []
        if unknown or missing:
            raise ValueError(
                f"the checkpoint's pruning masks cover other layers than this MagnitudePruning"
                f" targets (only in the checkpoint: {unknown}; only targeted now: {missing})."
                " Resume with the same `targets` and `exclude`."
            )
        keeps = {name: self._checked_mask(name, entry) for name, entry in masks.items()}
        if self._norms is not None:
            self._norms.load(state["activation_norms"])
        for name, keep in keeps.items():
            self._set_mask(name, keep)
        self._measure()
        # The masks must prune what the state says they pruned when it was written: an
        # emptied, all-pruned or edited mask set would resume at another sparsity.
        if self._actual_sparsity != recorded:
            raise ValueError(
                f"the checkpoint's pruning masks prune {self._actual_sparsity:.4f} of the targeted weights but its"
                f" state records {recorded:.4f}; the masks were edited or lost. Resume from a"
                " checkpoint this run wrote"
            )

    def _checked_mask(self, name: str, entry: Mapping[str, Any]) -> torch.Tensor:
        shape = tuple(_raw(self._layers[name], name).shape)
        packed = entry["packed"]
        if tuple(entry["shape"]) != shape or not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 \
                or packed.numel() != -(-math.prod(shape) // 8):
            raise ValueError(
                f"the checkpoint's pruning mask of layer {name!r} has shape {list(entry['shape'])} but the layer's weight"
                f" is {list(shape)} (or its bits do not fill it); resume with the model the run trained"
            )
        return unpack_mask(packed, shape)

    def _forget(self) -> None:
        self._restored = None
        self._applied_sparsity = 0.0
        self._actual_sparsity = 0.0
        self._group_sparsity = {}
        self._last_logged_step = -1

    # ------------------------------------------------------------------ public helpers
    @property
    def sparsity(self) -> float:
        """Fraction of the targeted weights the masks prune now."""
        return self._actual_sparsity

    # ------------------------------------------------------------------ internals
    def _remove_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        if self._norms is not None:
            self._norms.detach()

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

    def _resolve_window(self, total_steps: float, length: float) -> tuple[int, int, int]:
        start, end = schedule_window(self.start_step, self.end_step, total_steps, one_shot=self.schedule == "one_shot",
                                     final_sparsity=self.final_sparsity, warn=rank_zero_warn, length=length)
        every = self.update_every or max(1, (end - start) // _DEFAULT_UPDATES)
        return start, end, every

    @torch.no_grad()
    def _update_masks(self, sparsity: float) -> None:
        resharded(self._model)  # see `teardown`: the mask update may follow the sanity check's validation
        # Score what the MASK stage sees: the merged weight when adapters sit below it;
        # with wanda, times its input norms (all ranks' since the last update).
        weights = _WeightsBeforeMask(self._layers, self._norms.take_scales() if self._norms is not None else {})
        if self.scope == "global":
            keeps = global_masks(weights, sparsity, self.sparsity_pattern, self.norm)
        else:
            keeps = {n: layer_mask(w, sparsity, self.sparsity_pattern, self.norm) for n, w in weights.items()}
        if is_distributed():  # every rank takes rank 0's masks, sent as bits
            names = list(keeps)
            packed = broadcast_from_rank_zero([pack_mask(keeps[n]) for n in names])
            keeps = {name: unpack_mask(bits, keeps[name].shape) for name, bits in zip(names, packed)}
        while keeps:  # each keep-mask freed once its layer holds its own: one set of masks at a time
            name, keep = keeps.popitem()
            self._set_mask(name, keep)
        self._applied_sparsity = sparsity
        self._measure()
        # glibc keeps the freed keep-masks (a byte a weight) resident
        release_after(sum(_raw(layer, name).numel() for name, layer in self._layers.items()), self._model.device)

    def _set_mask(self, name: str, keep: torch.Tensor) -> None:
        self._masks[name].set(keep, like=_raw(self._layers[name], name))
        self._zero_raw(name)

    @torch.no_grad()
    def _zero_raw(self, name: str) -> None:
        # Only where the mask acts on the raw parameter itself: under a LoRA adapter the
        # mask acts on W + B·A (and W is frozen, perhaps NF4), so the MASK stage alone
        # keeps the effective weight sparse.
        layer, transform = self._layers[name], self._masks[name]
        if transform.bits is not None and _mask_sees_raw(layer, name):
            raw = _raw(layer, name)
            local(raw).masked_fill_(shard_like(transform.pruned, raw), 0)  # under FSDP2, this rank's shard

    def _measure(self) -> None:
        """The fraction of the targeted weights the masks prune: overall, and per group of
        layers (see :func:`_layer_groups`)."""
        pruned: Dict[str, int] = {}
        total: Dict[str, int] = {}
        groups = _layer_groups(list(self._layers))
        for name, layer in self._layers.items():
            group, mask = groups[name], self._masks[name].pruned
            pruned[group] = pruned.get(group, 0) + (0 if mask is None else int(mask.sum()))
            total[group] = total.get(group, 0) + _raw(layer, name).numel()
        self._actual_sparsity = sum(pruned.values()) / sum(total.values())
        self._group_sparsity = {group: pruned[group] / total[group] for group in total}

    def _zero_pruned_weights(self, *_: Any) -> None:
        for name in self._masks:
            self._zero_raw(name)

    def _state_of_masks(self) -> Dict[str, Any]:
        state = {}
        for name, transform in self._masks.items():
            keep = transform.keep
            if keep is not None:
                state[name] = {"packed": pack_mask(keep).cpu(), "shape": list(keep.shape)}
        return state


class _WeightsBeforeMask(Mapping):
    """``{layer name: the weight its MASK stage sees}`` (times its ``scales``, when given:
    wanda's input norms, so ``|scores|`` are ``|W|·‖X‖``), computed on each access: the
    scores hold one layer's weight at a time (gathered whole under FSDP2), not a copy of
    every targeted weight."""

    def __init__(self, layers: Dict[str, nn.Module], scales: Mapping[str, torch.Tensor]) -> None:
        self._layers, self._scales = layers, scales

    def __getitem__(self, name: str) -> torch.Tensor:
        layer = self._layers[name]
        weight = weight_before(layer, Stage.MASK, weight_param(name, layer))
        scale = self._scales.get(name)
        return weight if scale is None else weight * scale.to(weight.device)

    def __iter__(self):
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)


def _layer_groups(names: List[str]) -> Dict[str, str]:
    """Layer name -> group: the first name component after the prefix all targeted layers
    share, so a model kept in ``self.model`` (``model.encoder.layer.3.output.dense``) is
    grouped by block (``3``) rather than all in ``model``."""
    parts = [name.split(".") for name in names]
    shared = 0
    while parts and all(len(p) > shared + 1 for p in parts) and len({p[shared] for p in parts}) == 1:
        shared += 1
    return {name: p[shared] for name, p in zip(names, parts)}


def _mask_sees_raw(layer: nn.Module, key: str) -> bool:
    return not any(stage < Stage.MASK for stage in stages(layer, weight_param(key, layer)))


def _raw(layer: nn.Module, key: str) -> torch.Tensor:
    """The parameter the mask of weight key ``key`` prunes on ``layer`` (``in_proj_weight``
    of an attention layer, one weight matrix of a recurrent one)."""
    return raw_weight(layer, weight_param(key, layer))
