"""KnowledgeDistillation: train the student on a frozen teacher's outputs as well as its task."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Size, Tensor, nn
from typing_extensions import override

from lightning_compress.callbacks.base import CompressionCallback
from lightning_compress.core.memory import parameter_bytes, release_after
from lightning_compress.core.sharding import has_collective_forward, is_sharded_model
from lightning_compress.core.validate import is_number
from lightning_compress.distill.cache import (TeacherOutputCache, cached_top_k, check_cache_dir, sample_keys,
                                             weights_fingerprint)
from lightning_compress.distill.cache_ranks import CacheRankAgreement
from lightning_compress.distill.capture import OutputCapture, StepCapture, submodule
from lightning_compress.distill.config import CACHES, DistillationConfig
from lightning_compress.distill.losses import (
    SOFTMAX_LOSSES, TopKTargets, distillation_loss, kept_positions, top1_agreement)
from lightning_compress.distill.projections import FeatureProjections, match_features
from lightning_compress.distill.teacher import (
    check_not_shared, freeze, frozen_copy, is_self, load_self_teacher, load_teacher, other_teacher_error, shard_teacher,
    to_host)

CACHE_FILE = "teacher_outputs.safetensors"


class KnowledgeDistillation(CompressionCallback):
    r"""Distil a frozen teacher into the model you train, without editing its code.

    Your ``training_step`` still computes its own (task) loss; the callback adds the
    distillation loss to what it returns, so the optimized loss is::

        alpha * task_loss + (1 - alpha) * (distill_loss + feature_weight * feature_loss)

    The student output is captured with forward hooks on the LightningModule (or on
    ``student_layer``) during ``training_step``; the last call wins when there are several.
    The teacher receives the same inputs that module received (or
    ``teacher_inputs(batch)``), runs under ``torch.no_grad()`` in eval mode, and is
    kept in this callback: it is never a submodule of your model, never in its optimizer,
    never wrapped in DDP and never in its checkpoint.

    Example::

        kd = KnowledgeDistillation(teacher=big_model, temperature=4.0, alpha=0.5)
        trainer = Trainer(callbacks=[MagnitudePruning(0.8), kd])   # any order

    Under manual optimization (``automatic_optimization = False``) the callback cannot add
    the loss for you: read ``kd.loss`` (``(1 - alpha) * distill_loss`` for this step, with
    its graph) inside ``training_step`` after the student's forward and add it before
    ``manual_backward``, e.g. ``self.manual_backward(kd.task_weight * task + kd.loss)``.
    A step that does not read it raises an error.

    Logged with ``pl_module.log`` every step: ``distill/task_loss``, ``distill/kd_loss``,
    ``distill/alpha`` and ``distill/top1_agreement`` (argmax agreement of the outputs).

    Args:
        teacher: the teacher: an ``nn.Module`` or LightningModule instance; a Lightning
            checkpoint path (with ``teacher_class``), loaded with ``weights_only=True``;
            or ``"self"``: a frozen copy of the student's own weights at the start of fit
            (without the compression transforms other callbacks attach), for distilling a
            compressed student from its float self. With ``fit(ckpt_path=...)`` of a
            checkpoint this callback did not write (fine-tuning a float checkpoint), the
            copy takes the checkpoint's weights; resuming a run this callback
            checkpointed keeps the weights that run started from, and is refused when the
            model is built with other starting weights (checked by fingerprint). An
            instance is frozen, moved and (with ``teacher_dtype``) converted in place.
        teacher_class: the LightningModule class the checkpoint path was saved from; it
            is built with the checkpoint's ``hyper_parameters``.
        temperature: softmax temperature ``T`` of the ``"kl"``/``"reverse_kl"`` losses
            (which are multiplied by ``T**2``); must be > 0.
        alpha: weight of the task loss, in ``[0, 1]``, or a schedule
            ``alpha(global_step) -> float``.
        loss: ``"kl"`` (soft-target KL(teacher || student), Hinton et al.),
            ``"reverse_kl"``, ``"mse"`` (on logits) or ``"cosine"`` (for embeddings).
        student_layer: name of the submodule whose output is distilled (and whose inputs
            the teacher receives); ``None`` is the LightningModule's own forward. With
            ``teacher="self"`` the teacher runs the same submodule of its copy.
        teacher_inputs: ``callable(batch) -> args tuple or tensor`` giving the teacher's
            inputs, when they differ from the student's.
        mask_fn: ``callable(batch) -> bool tensor`` of the output positions the loss counts
            (``[..., C]`` outputs: a mask of their ``[...]`` shape, e.g. ``lambda b:
            b["attention_mask"].bool()``); default every position, padding included.
        teacher_dtype: run the teacher in this dtype (e.g. ``torch.bfloat16`` or ``"bfloat16"``); its
            outputs are compared in float32.
        teacher_strategy: under FSDP2 (``ModelParallelStrategy``): ``"replicate"`` (a
            whole frozen teacher on every rank) or ``"fsdp2"`` (the teacher sharded on
            its own, never with the student: each rank keeps its share and gathers one
            block at a time for the teacher's forward).
        features: ``[(student layer, teacher layer), ...]``: also match these
            intermediate outputs with MSE, through a learned ``nn.Linear`` projection of
            the student feature when the widths differ. The projections train with their
            own Adam (``projection_lr``), stepped right after your optimizer, and are
            checkpointed with this callback.
        feature_weight: weight of the feature loss inside the distillation loss.
        projection_lr: learning rate of the projections' Adam.
        cache: ``None``, ``"memory"`` or ``"disk"``: compute each sample's teacher output
            once and reuse it in later epochs (needs ``index_fn``). ``"disk"`` keeps it in
            ``cache_dir/teacher_outputs.safetensors`` (format in
            :mod:`lightning_compress.distill.cache`; one file per rank under DDP),
            written atomically at every epoch end and read at the start of fit.
        cache_dir: folder of the disk cache.
        cache_top_k: cache only the teacher's ``k`` largest logits per position (and
            the log of the remaining mass at ``temperature``), not its full ``[..., vocab]``
            outputs. The ``"kl"``/``"reverse_kl"`` loss is then, from the first epoch on,
            the exact KL of the two distributions coarsened to ``k + 1`` outcomes (the
            top-k entries and one "rest" bucket): at most the full KL, equal to it when
            ``k`` is the vocabulary size. Not for ``"mse"``/``"cosine"``.
        index_fn: ``callable(batch) -> LongTensor`` of the batch's sample indices.
        name: distinguishes the checkpoint state of several distillation callbacks;
            each needs its own (Lightning refuses two of one class without: "Found more than one stateful callback").
        config: a built :class:`~lightning_compress.distill.config.DistillationConfig`
            instead of the arguments above.

    Raises:
        ArgumentError: (a ``ValueError``) at construction, naming a bad argument.
        ValueError: at setup, for a ``student_layer`` or ``features`` layer that does not
            exist, a teacher sharing parameters with the student or a checkpoint that does not
            fit ``teacher_class``; while training, for outputs of different shapes, a mask of
            another shape, a ``cache_top_k`` above the outputs per position or an ``alpha``
            schedule outside ``[0, 1]``; when resuming, for a checkpoint distilled with other
            ``features``/``cache_top_k``, other starting weights (``teacher="self"``), or a
            disk cache of another ``cache_top_k`` or ``temperature``.
        RuntimeError: under manual optimization, for a step that did not read ``kd.loss``.
    """

    section = "distillation"
    config_class = DistillationConfig
    # (`features` has its own check; a function `alpha` is compared by where it is defined;
    # the teacher by its weights: `teacher_fingerprint`.)
    resume_settings = ("temperature", "alpha", "loss", "student_layer", "feature_weight", "teacher_dtype")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._teacher: nn.Module | None = None  # the whole frozen teacher
        self._self_copy: nn.Module | None = None  # teacher="self", copied before other callbacks' setup
        self._teacher_entry: nn.Module | None = None  # the module the teacher's inputs go to
        self._loaded_teacher: nn.Module | None = None
        self._student: LightningModule | None = None
        self._capture = OutputCapture()
        self._projections = FeatureProjections(self.features, self.projection_lr)
        self._steps = 0
        self._cache = TeacherOutputCache(self.cache_top_k, self.temperature) if self.cache else None
        self._cache_file: Path | None = None
        self._ranks = CacheRankAgreement()
        self._fingerprint: str | None = None  # of the teacher's weights, checked on resume

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher (built at setup for a checkpoint path or ``"self"``)."""
        return self._teacher

    @property
    def task_weight(self) -> float:
        """``alpha`` at the current step: scale your task loss by it under manual optimization."""
        return self._alpha_at(self._require_step("task_weight").global_step)

    @property
    def loss(self) -> Tensor:
        """``(1 - alpha) * distill_loss`` of the current training step, with its graph.

        For manual optimization: read it inside ``training_step``, after the student's
        forward, and add it to your loss before ``manual_backward``.
        """
        step = self._require_step("loss")
        if self._student is not None and self._student.automatic_optimization:
            raise RuntimeError(
                "`kd.loss` is for manual optimization: under automatic optimization the callback"
                " already adds it to what training_step returns, so adding it yourself counts it twice"
            )
        step.read = True
        return self._weighted(step)

    # ------------------------------------------------------------------ hooks
    def before_compression_setup(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Called by the first compression callback to set up (see ``callbacks.compatibility``):
        ``teacher="self"`` copies the student here, before LoRA (NF4 bases) or any other
        callback listed before this one has changed it."""
        if is_self(self.config.teacher) and self._self_copy is None and not self._capture.attached:
            self._self_copy = frozen_copy(pl_module, leave_out=[trainer])

    @override
    def install(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.teacher_strategy == "fsdp2" and not isinstance(trainer.strategy, ModelParallelStrategy):
            raise ValueError(
                f"`teacher_strategy`='fsdp2' shards the teacher over ModelParallelStrategy's device mesh, but this"
                f" Trainer uses {type(trainer.strategy).__name__}; use teacher_strategy='replicate'"
            )
        self_copy, self._self_copy = self._self_copy, None
        self._detach()  # a previous fit of this callback
        if self.teacher_path is not None:
            if self._loaded_teacher is None:
                self._loaded_teacher = load_teacher(self.teacher_path, self.teacher_class)
            teacher = self._loaded_teacher
        elif is_self(self.config.teacher):
            teacher = self_copy if self_copy is not None else frozen_copy(pl_module, leave_out=[trainer])
        else:
            teacher = self.config.teacher
            check_not_shared(teacher, pl_module)
        student_module = submodule(pl_module, "student_layer", self.student_layer or "")
        teacher_entry = teacher
        if is_self(self.config.teacher) and self.student_layer:
            teacher_entry = teacher.get_submodule(self.student_layer)
            if self.teacher_strategy == "fsdp2":  # FSDP2 gathers for a forward of the whole teacher only
                raise ValueError(
                    "`teacher_strategy`='fsdp2' runs the sharded teacher whole, but `student_layer` with teacher='self'"
                    " runs one submodule of it; use teacher_strategy='replicate'"
                )
        feature_modules = [
            (submodule(pl_module, "features", s), submodule(teacher, "features", t, owner="teacher"))
            for s, t in self.features
        ]

        self._teacher = freeze(teacher, self.teacher_dtype)
        self._teacher_entry, self._student, self._fingerprint = teacher_entry, pl_module, None
        self._teacher_bytes = parameter_bytes(self._teacher)  # see _teacher_outputs
        self._capture.attach(student_module, feature_modules)
        self._capture.wrap_training_step(pl_module, lambda: pl_module.trainer.global_step, self._finish_step)
        self.finish_install(pl_module)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._teacher.to(pl_module.device)
        if self.teacher_strategy == "fsdp2" and not is_sharded_model(self._teacher):
            shard_teacher(self._teacher, trainer.strategy.device_mesh["data_parallel"])
        if self._projections.layers is not None:
            self._projections.layers.to(pl_module.device)
        if self.features:
            self._projections.optimizer.follow(trainer, "`features` (projections)")
        if self.cache == "disk":
            suffix = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
            self._cache_file = self.cache_dir / CACHE_FILE.replace(".safetensors", f"{suffix}.safetensors")
            failure, self._cache = None, TeacherOutputCache(self.cache_top_k, self.temperature)  # the file or nothing
            try:
                check_cache_dir(self.cache_dir)
                if self._cache_file.exists():
                    self._cache = TeacherOutputCache.load(self._cache_file, self.cache_top_k, self.temperature)
            except Exception as error:  # noqa: BLE001 - every rank stops, not only the one whose file it is
                failure = error
            self._ranks.agree(failure)
        if self._cache is not None:  # a batch it held before is checked against the teacher (other data, teacher)
            self._cache.start_fit(self._cache_file if self.cache == "disk" else None)
            self._cache.softmax_targets = self.config.loss in SOFTMAX_LOSSES  # MSE/cosine targets: not shifted
            self._ranks.sharded_teacher = has_collective_forward(self._teacher)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = self._capture.take_step()
        if step is not None and not pl_module.automatic_optimization and not step.read:
            raise RuntimeError(
                "KnowledgeDistillation: training_step did not read `kd.loss` in this step, so the"
                " distillation loss was not trained. Under manual optimization the callback cannot add"
                " it for you: read `kd.loss` in training_step after the student's forward and add it"
                " to your loss before manual_backward, e.g."
                " `self.manual_backward(kd.task_weight * loss + kd.loss)`."
            )

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush_cache()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._flush_cache()
            self._detach()
            to_host(self._teacher)
            if self._cache is not None and len(self._cache):
                whose = "rank 0's " if trainer.world_size > 1 else ""
                rank_zero_info(f"KnowledgeDistillation: {whose}{self._cache.report()}")

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: Dict[str, Any]) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        # Lightning restores `ckpt_path`'s weights after setup copied teacher="self". A checkpoint of
        # this callback resumes its run (teacher: that run's start, checked in `restore`); any other
        # is fine-tuned, so its weights are the start.
        resuming = self.state_key in (checkpoint.get("callbacks") or {})
        if is_self(self.config.teacher) and getattr(trainer.state, "fn", None) == "fit" and not resuming:
            self._teacher_from(checkpoint)

    @property
    def output_cache(self) -> TeacherOutputCache | None:
        """The teacher-output cache (``report()`` gives its size against full outputs)."""
        return self._cache

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._detach()  # give the user back their own training_step
        self._self_copy = None
        to_host(self._teacher)

    # ------------------------------------------------------------------ base-class hooks
    @override
    def is_set_up(self) -> bool:
        return self._capture.attached

    @override
    def method_state(self) -> Dict[str, Any]:
        pending = self._projections.pending  # as it was loaded, until the projections are built
        projections = self._projections.state_dict() if pending is None else {
            key: value for key, value in pending.items()
            if key not in ("version", "features", "steps", "cache_top_k", "teacher_fingerprint")
        }
        state = {"features": [list(pair) for pair in self.features], "steps": self._steps, **projections}
        if self.cache_top_k is not None:
            state["cache_top_k"] = self.cache_top_k
        fingerprint = self._teacher_fingerprint()
        if fingerprint is not None:
            state["teacher_fingerprint"] = fingerprint
        return state

    @override
    def check_state(self, state: Mapping[str, Any]) -> None:
        saved = [tuple(pair) for pair in state.get("features", [])]
        if saved != list(self.features):
            raise ValueError(
                f"the checkpoint was distilled with `features`={saved} but this callback has"
                f" {list(self.features)}; resume with the same `features`"
            )
        if state.get("cache_top_k") != self.cache_top_k:  # another loss: the run would not continue
            raise ValueError(
                f"the checkpoint was distilled with `cache_top_k`={state.get('cache_top_k')!r} but this callback has"
                f" {self.cache_top_k!r}; resume with the same `cache_top_k`"
            )

    @override
    def restore(self, state: Mapping[str, Any]) -> None:
        self._steps = state.get("steps", 0)
        if self.features:
            self._projections.load_state_dict(state)
        saved = state.get("teacher_fingerprint")
        if saved is not None and self._teacher_fingerprint() not in (None, saved):
            raise other_teacher_error(is_self(self.config.teacher))

    # ------------------------------------------------------------------ training_step
    def _finish_step(self, output: Any) -> Any:
        """What the wrapped training_step returns: the user's output with the distillation loss added."""
        pl_module = self._student
        task = output.get("loss") if isinstance(output, Mapping) else output
        if isinstance(task, Tensor):
            self._log("distill/task_loss", task.detach())
        if not pl_module.automatic_optimization:
            return output  # the user added `kd.loss`; checked at the batch end
        step = self._capture.take_step()
        if task is None:
            return output  # a skipped step
        total = self._alpha_at(step.global_step) * task + self._weighted(step)
        if isinstance(output, Mapping):
            return {**output, "loss": total}
        return total

    # ------------------------------------------------------------------ distillation
    def _require_step(self, what: str) -> StepCapture:
        if not self._capture.capturing or self._capture.step is None:
            raise RuntimeError(
                f"`KnowledgeDistillation.{what}` belongs to a training step: read it inside"
                " training_step, after the student's forward"
            )
        return self._capture.step

    def _alpha_at(self, global_step: int) -> float:
        if not callable(self.alpha):
            return self.alpha
        value = self.alpha(global_step)
        if not is_number(value) or not 0.0 <= value <= 1.0:
            raise ValueError(
                f"the `alpha` schedule returned {value!r} at step {global_step}; it must return a float in [0, 1]"
            )
        return float(value)

    def _weighted(self, step: StepCapture) -> Tensor:
        if step.result is None:
            step.result = (1.0 - self._alpha_at(step.global_step)) * self._distill(step)
        return step.result

    def _distill(self, step: StepCapture) -> Tensor:
        student = step.student_output(self.student_layer)
        teacher = self._teacher_outputs(step, student.shape)
        if teacher.shape != student.shape:
            raise ValueError(
                f"teacher output shape {tuple(teacher.shape)} differs from the student output shape"
                f" {tuple(student.shape)}; give a teacher with the same outputs, or choose"
                " `student_layer`/`teacher_inputs` so both produce the same shape"
            )
        teacher = teacher.to(student.device)
        if self.mask_fn is not None:  # the positions the loss counts (no padding)
            student, teacher = kept_positions(self.mask_fn(step.batch), student, teacher)
        kd = distillation_loss(self.config.loss, student, teacher, self.temperature)
        if self.features:
            pairs = match_features(self.features, step.features, self._capture.take_teacher_features())
            kd = kd + self.feature_weight * self._projections.loss(pairs)
        self._steps += 1
        self._log("distill/kd_loss", kd.detach())
        self._log("distill/alpha", self._alpha_at(step.global_step))
        if student.numel():  # a batch of only padding has no agreement to log (the mean of none is NaN)
            self._log("distill/top1_agreement", top1_agreement(student, teacher))
        return kd

    def _teacher_outputs(self, step: StepCapture, shape: Size) -> Tensor | TopKTargets:
        args = lambda: step.teacher_args(self.teacher_inputs)  # noqa: E731
        if self._cache is None:
            return self._run_teacher(args())
        return self._ranks.outputs(self._cache, lambda: sample_keys(self.index_fn(step.batch)), shape, args,
                                   self._run_teacher, lambda: self._capture.teacher_dtype)

    def _run_teacher(self, args_and_kwargs: Tuple[tuple, dict]) -> Tensor | TopKTargets:
        logits = self._capture.run_teacher(self._teacher_entry, *args_and_kwargs, self.teacher_dtype)
        # glibc keeps the teacher's freed activations resident on top of the student's
        # backward (0.21x of a 134M LLaMA taught by itself); its size stands for theirs.
        release_after(self._teacher_bytes, logits.device)
        return logits if self.cache_top_k is None else cached_top_k(logits, self.cache_top_k, self.temperature)

    # ------------------------------------------------------------------ internals
    def _log(self, name: str, value: Any) -> None:
        self._student.log(name, value, on_step=True, on_epoch=False, batch_size=1)

    def _flush_cache(self) -> None:
        if self.cache == "disk" and self._cache.dirty and self._cache_file is not None:
            self._cache.save(self._cache_file)

    def _teacher_fingerprint(self) -> str | None:
        """Of the teacher's weights, once per fit (``None`` before setup, or when sharded)."""
        if self._fingerprint is None and self._teacher is not None and not is_sharded_model(self._teacher):
            self._fingerprint = weights_fingerprint(self._teacher)
        return self._fingerprint

    def _teacher_from(self, checkpoint: Mapping[str, Any]) -> None:
        """Load teacher="self" with the weights of the checkpoint being fine-tuned."""
        load_self_teacher(self._teacher, checkpoint)
        self._fingerprint = None

    def _detach(self) -> None:
        self._capture.detach()
        self._projections.optimizer.stop()


__all__ = ["KnowledgeDistillation", "CACHES", "CACHE_FILE"]
