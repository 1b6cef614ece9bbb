"""KnowledgeDistillation: train the student on a frozen teacher's outputs as well as its task."""

from __future__ import annotations

import copy
import functools
import inspect
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

from lightning_compress.core.compatibility import prepare_stack
from lightning_compress.core.side_optimizer import SideOptimizer
from lightning_compress.core.state import STATE_VERSION, check_state_version
from lightning_compress.core.targeting import close_names_hint, validate_name
from lightning_compress.core.transforms import detach_all
from lightning_compress.distill.cache import TeacherOutputCache
from lightning_compress.distill.losses import LOSSES, distillation_loss, top1_agreement
from lightning_compress.quant.nf4 import nf4_deepcopy_memo

CACHES = ("memory", "disk")
CACHE_FILE = "teacher_outputs.safetensors"


class KnowledgeDistillation(Callback):
    r"""Distil a frozen teacher into the model you train, without editing its code.

    Your ``training_step`` still computes its own (task) loss; the callback adds the
    distillation loss to what it returns, so the optimized loss is::

        alpha * task_loss + (1 - alpha) * (distill_loss + feature_weight * feature_loss)

    The student output is captured with forward hooks on the LightningModule (or on
    ``student_layer``) during ``training_step``; the last call wins when there are several.
    The teacher receives the same inputs that module received (or
    ``teacher_inputs(batch)``), runs under ``torch.inference_mode()`` in eval mode, and is
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
            compressed student from its float self. An instance is frozen, moved and
            (with ``teacher_dtype``) converted in place.
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
        teacher_dtype: run the teacher in this dtype (e.g. ``torch.bfloat16``); its
            outputs are compared in float32.
        features: ``[(student layer, teacher layer), ...]``: also match these
            intermediate outputs with MSE, through a learned ``nn.Linear`` projection of
            the student feature when the widths differ. The projections train with their
            own Adam (``projection_lr``), stepped right after your optimizer, and are
            checkpointed with this callback.
        feature_weight: weight of the feature loss inside the distillation loss.
        projection_lr: learning rate of the projections' Adam.
        cache: ``None``, ``"memory"`` or ``"disk"``: compute each sample's teacher output
            once and reuse it in later epochs (needs ``index_fn``). ``"disk"`` keeps it in
            ``cache_dir/teacher_outputs.safetensors`` (``indices`` and ``outputs``; one file
            per rank under DDP),
            written at every epoch end and read at the start of fit.
        cache_dir: folder of the disk cache.
        index_fn: ``callable(batch) -> LongTensor`` of the batch's sample indices.
        name: distinguishes the checkpoint state of several distillation callbacks.
    """

    def __init__(
        self,
        teacher: nn.Module | str | os.PathLike | None = None,
        *,
        teacher_class: type | None = None,
        temperature: float = 4.0,
        alpha: float | Callable[[int], float] = 0.5,
        loss: str = "kl",
        student_layer: str | None = None,
        teacher_inputs: Callable[[Any], Any] | None = None,
        teacher_dtype: torch.dtype | None = None,
        features: Sequence[Tuple[str, str]] | None = None,
        feature_weight: float = 1.0,
        projection_lr: float = 1e-3,
        cache: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        index_fn: Callable[[Any], Tensor] | None = None,
        name: str | None = None,
    ) -> None:
        self._teacher_path = _check_teacher(teacher, teacher_class)
        if not _is_number(temperature) or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"`temperature` must be a positive number (e.g. 4.0), got {temperature!r}")
        if not callable(alpha):
            if not _is_number(alpha) or not 0.0 <= alpha <= 1.0:
                raise ValueError(
                    f"`alpha` must be a float in [0, 1] (the task loss weight) or a callable"
                    f" alpha(step) -> float, got {alpha!r}"
                )
            alpha = float(alpha)
        if loss not in LOSSES:
            raise ValueError(f"unknown `loss` {loss!r}; choose one of {tuple(LOSSES)}")
        if student_layer is not None and not isinstance(student_layer, str):
            raise ValueError(f"`student_layer` must be a module name such as 'model.classifier', got {student_layer!r}")
        if teacher_inputs is not None and not callable(teacher_inputs):
            raise ValueError("`teacher_inputs` must be a callable batch -> args tuple (or tensor), or None")
        if teacher_dtype is not None and not (isinstance(teacher_dtype, torch.dtype) and teacher_dtype.is_floating_point):
            raise ValueError(
                f"`teacher_dtype` must be a floating torch dtype such as torch.bfloat16, got {teacher_dtype!r}"
            )
        self.features = _check_features(features)
        if not _is_number(feature_weight) or not feature_weight >= 0:
            raise ValueError(f"`feature_weight` must be a number >= 0, got {feature_weight!r}")
        if not _is_number(projection_lr) or not projection_lr > 0:
            raise ValueError(f"`projection_lr` must be a positive number, got {projection_lr!r}")
        if cache is not None and cache not in CACHES:
            raise ValueError(f"unknown `cache` {cache!r}; choose None or one of {CACHES}")
        if cache is not None and index_fn is None:
            raise ValueError(
                f"`cache`={cache!r} needs `index_fn`: a callable batch -> LongTensor of sample indices,"
                " so teacher outputs can be reused per sample"
            )
        if index_fn is not None and (cache is None or not callable(index_fn)):
            raise ValueError("`index_fn` (a callable batch -> sample indices) is only used with `cache`; set both")
        if cache == "disk" and cache_dir is None:
            raise ValueError("`cache`='disk' needs `cache_dir`, the folder for teacher_outputs.safetensors")
        if cache_dir is not None and cache != "disk":
            raise ValueError("`cache_dir` is only used with `cache`='disk'; set both")
        if cache is not None and self.features:
            raise ValueError(
                "`features` cannot be combined with `cache`: intermediate teacher features are not"
                " cached. Drop `cache`, or distil outputs only."
            )

        self._teacher_arg = None if self._teacher_path is not None else teacher
        self.teacher_class = teacher_class
        self.temperature = float(temperature)
        self.alpha = alpha
        self.loss_name = loss
        self.student_layer = student_layer
        self.teacher_inputs = teacher_inputs
        self.teacher_dtype = teacher_dtype
        self.feature_weight = float(feature_weight)
        self.projection_lr = float(projection_lr)
        self.cache = cache
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.index_fn = index_fn
        self.name = validate_name(name)

        self._teacher: nn.Module | None = None  # the whole frozen teacher
        self._self_copy: nn.Module | None = None  # teacher="self", copied before other callbacks' setup
        self._teacher_entry: nn.Module | None = None  # the module the teacher's inputs go to
        self._loaded_teacher: nn.Module | None = None
        self._student: LightningModule | None = None
        self._restore_step: Tuple[LightningModule, Any] | None = None
        self._hooks: List[Any] = []
        self._capturing = False
        self._teacher_running = False
        self._step: _Step | None = None
        self._teacher_features: Dict[int, Tensor] = {}
        self._projections: nn.ModuleDict | None = None
        self._projection_optimizer = SideOptimizer(self.projection_lr)
        self._restored: Dict[str, Any] | None = None
        self._steps = 0
        self._cache: TeacherOutputCache | None = TeacherOutputCache() if cache else None
        self._cache_file: Path | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

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
        return step.weighted(self)

    # ------------------------------------------------------------------ hooks
    def before_compression_setup(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Called by the first compression callback to set up (see ``core.compatibility``):
        ``teacher="self"`` copies the student here, before LoRA (NF4 bases) or any other
        callback listed before this one has changed it."""
        if _is_self(self._teacher_arg) and self._self_copy is None and not self._hooks:
            self._self_copy = _frozen_copy(pl_module, trainer)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        prepare_stack(trainer, pl_module, stage)
        if stage != "fit":
            return
        self_copy, self._self_copy = self._self_copy, None
        self._detach()  # a previous fit of this callback
        if self._teacher_path is not None:
            if self._loaded_teacher is None:
                self._loaded_teacher = _load_teacher(self._teacher_path, self.teacher_class)
            teacher = self._loaded_teacher
        elif _is_self(self._teacher_arg):
            teacher = self_copy if self_copy is not None else _frozen_copy(pl_module, trainer)
        else:
            teacher = self._teacher_arg
            student_parameters = {id(p) for p in pl_module.parameters()}
            if any(id(p) in student_parameters for p in teacher.parameters()):
                raise ValueError(
                    "`teacher` shares parameters with the student (it is the student, one of its"
                    " submodules, or holds one of them), so freezing the teacher would freeze the"
                    " student; pass a separate model, or teacher='self' for a frozen copy"
                )
        student_module = _submodule(pl_module, "student_layer", self.student_layer or "")
        teacher_entry = teacher
        if _is_self(self._teacher_arg) and self.student_layer:
            teacher_entry = teacher.get_submodule(self.student_layer)
        feature_modules = [
            (_submodule(pl_module, "features", s), _submodule(teacher, "features", t, owner="teacher"))
            for s, t in self.features
        ]

        teacher.eval()
        teacher.requires_grad_(False)
        if self.teacher_dtype is not None:
            teacher.to(self.teacher_dtype)
        self._teacher, self._teacher_entry, self._student = teacher, teacher_entry, pl_module
        # prepend: the inputs as the module receives them, before other callbacks' pre-hooks.
        self._hooks.append(
            student_module.register_forward_pre_hook(self._capture_inputs, with_kwargs=True, prepend=True)
        )
        self._hooks.append(student_module.register_forward_hook(self._capture_output))
        for index, (student_layer, teacher_layer) in enumerate(feature_modules):
            self._hooks.append(student_layer.register_forward_hook(functools.partial(self._capture_feature, index)))
            self._hooks.append(teacher_layer.register_forward_hook(functools.partial(self._capture_teacher_feature, index)))
        self._wrap_training_step(pl_module)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._teacher.to(pl_module.device)
        if self._projections is not None:
            self._projections.to(pl_module.device)
        if self.features:
            self._projection_optimizer.follow(trainer, "`features` (projections)")
        if self.cache == "disk":
            suffix = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
            self._cache_file = self.cache_dir / CACHE_FILE.replace(".safetensors", f"{suffix}.safetensors")
            if self._cache_file.exists():
                self._cache = TeacherOutputCache.load(self._cache_file)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step, self._step = self._step, None
        if step is not None and not pl_module.automatic_optimization and not step.read:
            raise RuntimeError(
                "KnowledgeDistillation: training_step did not read `kd.loss` in this step, so the"
                " distillation loss was not trained. Under manual optimization the callback cannot add"
                " it for you: read `kd.loss` in training_step after the student's forward and add it"
                " to your loss before manual_backward, e.g."
                " `self.manual_backward(kd.task_weight * loss + kd.loss)`."
            )

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush_cache()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._flush_cache()
            self._detach()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._detach()  # give the user back their own training_step
        self._self_copy = None

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> Dict[str, Any]:
        if self._projections is None and self._restored is not None:
            return self._restored
        state: Dict[str, Any] = {
            "version": STATE_VERSION,
            "features": [list(pair) for pair in self.features],
            "steps": self._steps,
            "projections": {},
        }
        if self._projections is not None:
            state["projections"] = {
                key: {k: v.detach().cpu().clone() for k, v in layer.state_dict().items()}
                for key, layer in self._projections.items()
            }
            state["projection_optimizer"] = self._projection_optimizer.state_dict()
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        check_state_version("KnowledgeDistillation", state_dict)
        saved = [tuple(pair) for pair in state_dict.get("features", [])]
        if saved != list(self.features):
            raise ValueError(
                f"the checkpoint was distilled with `features`={saved} but this callback has"
                f" {list(self.features)}; resume with the same `features`"
            )
        self._steps = state_dict.get("steps", 0)
        self._restored = state_dict if self.features else None  # only projections wait for it
        if self._projections is not None:
            self._apply_restored()

    # ------------------------------------------------------------------ capture
    def _capture_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._capturing:
            self._step.inputs = (args, kwargs)

    def _capture_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._capturing:
            self._step.output = output
            tensor = output if isinstance(output, Tensor) else None
            self._step.output_version = None if tensor is None else tensor._version
            self._step.result = None  # a new forward: recompute on the next read

    def _capture_feature(self, index: int, module: nn.Module, args: tuple, output: Any) -> None:
        if self._capturing and not self._teacher_running:
            self._step.features[index] = _first_tensor(output, "features")

    def _capture_teacher_feature(self, index: int, module: nn.Module, args: tuple, output: Any) -> None:
        if self._teacher_running:
            self._teacher_features[index] = _first_tensor(output, "features")

    def _wrap_training_step(self, pl_module: LightningModule) -> None:
        if getattr(pl_module.__dict__.get("training_step"), "_lc_distillation", False):
            raise ValueError(
                "another KnowledgeDistillation already distils this model; use one callback per"
                " model (several teachers can be averaged into one teacher module)"
            )
        original = pl_module.training_step
        own = pl_module.__dict__.get("training_step")

        # functools.wraps: Lightning reads the signature (batch_idx or not) through __wrapped__.
        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            return self._training_step(pl_module, original, args, kwargs)

        training_step._lc_distillation = True
        pl_module.training_step = training_step
        self._restore_step = (pl_module, own)

    def _training_step(self, pl_module: LightningModule, original: Callable, args: tuple, kwargs: dict) -> Any:
        batch = args[0] if args else kwargs.get("batch")
        self._step = _Step(pl_module.trainer.global_step, batch)
        self._capturing = True
        try:
            output = original(*args, **kwargs)
        finally:
            self._capturing = False
        task = output.get("loss") if isinstance(output, Mapping) else output
        if isinstance(task, Tensor):
            pl_module.log("distill/task_loss", task.detach(), on_step=True, on_epoch=False, batch_size=1)
        if not pl_module.automatic_optimization:
            return output  # the user added `kd.loss`; checked at the batch end
        if task is None:
            self._step = None
            return output  # a skipped step
        step, self._step = self._step, None
        alpha = step.alpha(self)
        total = alpha * task + step.weighted(self)
        if isinstance(output, Mapping):
            return {**output, "loss": total}
        return total

    # ------------------------------------------------------------------ distillation
    def _require_step(self, what: str) -> "_Step":
        if not self._capturing or self._step is None:
            raise RuntimeError(
                f"`KnowledgeDistillation.{what}` belongs to a training step: read it inside"
                " training_step, after the student's forward"
            )
        return self._step

    def _alpha_at(self, global_step: int) -> float:
        if not callable(self.alpha):
            return self.alpha
        value = self.alpha(global_step)
        if not _is_number(value) or not 0.0 <= value <= 1.0:
            raise ValueError(
                f"the `alpha` schedule returned {value!r} at step {global_step}; it must return a float in [0, 1]"
            )
        return float(value)

    def _distill(self, step: "_Step") -> Tensor:
        if step.output is None:
            where = f"`student_layer` {self.student_layer!r}" if self.student_layer else "the LightningModule's forward"
            raise RuntimeError(
                f"KnowledgeDistillation saw no call of {where} in this training_step; call the model"
                " (self(x)) in training_step, or set `student_layer` to the module that computes the outputs"
            )
        student = _first_tensor(step.output, "student_layer")
        if step.output_version is not None and student._version != step.output_version:
            where = repr(self.student_layer) if self.student_layer else "the LightningModule's forward"
            raise RuntimeError(
                f"the output of {where} was modified in place after it was computed (e.g. by a"
                " following nn.ReLU(inplace=True)), so it is not the output to distil; choose the"
                " module after that operation as `student_layer`, or make it not in place"
            )
        teacher = self._teacher_outputs(step)
        if teacher.shape != student.shape:
            raise ValueError(
                f"teacher output shape {tuple(teacher.shape)} differs from the student output shape"
                f" {tuple(student.shape)}; give a teacher with the same outputs, or choose"
                " `student_layer`/`teacher_inputs` so both produce the same shape"
            )
        teacher = teacher.to(student.device)
        kd = distillation_loss(self.loss_name, student, teacher, self.temperature)
        if self.features:
            kd = kd + self.feature_weight * self._feature_loss(step)
        self._steps += 1
        module = self._student
        module.log("distill/kd_loss", kd.detach(), on_step=True, on_epoch=False, batch_size=1)
        module.log("distill/alpha", step.alpha(self), on_step=True, on_epoch=False, batch_size=1)
        module.log("distill/top1_agreement", top1_agreement(student, teacher), on_step=True, on_epoch=False, batch_size=1)
        return kd

    def _teacher_outputs(self, step: "_Step") -> Tensor:
        keys = None
        if self._cache is not None:
            indices = self.index_fn(step.batch)
            keys = [int(i) for i in torch.as_tensor(indices).flatten().tolist()]
            cached = self._cache.lookup(keys)
            if cached is not None:
                return cached
        if self.teacher_inputs is not None:
            inputs = self.teacher_inputs(step.batch)
            args, kwargs = (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), {}
        else:
            args, kwargs = step.inputs
        # The teacher computes in its own dtype: a bf16-true student's inputs are cast up
        # for a float32 teacher (or down to `teacher_dtype`).
        teacher_dtype = self.teacher_dtype or _floating_dtype(self._teacher_entry)
        if teacher_dtype is not None:
            args, kwargs = _cast_floats((args, kwargs), teacher_dtype)
        self._teacher_features = {}
        self._teacher_running = True
        try:
            with torch.inference_mode():
                output = self._teacher_entry(*args, **kwargs)
        finally:
            self._teacher_running = False
        logits = _as_float(_first_tensor(output, "teacher"))
        self._teacher_features = {i: _as_float(f) for i, f in self._teacher_features.items()}
        if keys is not None:
            if logits.shape[0] != len(keys):
                raise ValueError(
                    f"`index_fn` returned {len(keys)} indices for a batch of {logits.shape[0]} teacher"
                    " outputs; it must return one index per sample"
                )
            self._cache.store(keys, logits)
        return logits

    def _feature_loss(self, step: "_Step") -> Tensor:
        pairs = []
        for index, (student_name, teacher_name) in enumerate(self.features):
            if index not in step.features:
                raise RuntimeError(f"`features` student layer {student_name!r} was not called in this training_step")
            if index not in self._teacher_features:
                raise RuntimeError(f"`features` teacher layer {teacher_name!r} was not called by the teacher's forward")
            student, teacher = step.features[index], self._teacher_features[index]
            if student.shape[:-1] != teacher.shape[:-1]:
                raise ValueError(
                    f"`features` pair ({student_name!r}, {teacher_name!r}): student shape"
                    f" {tuple(student.shape)} and teacher shape {tuple(teacher.shape)} differ before the"
                    " last dimension; only the width may differ"
                )
            pairs.append((student, teacher))
        projections = self._ensure_projections([(s.shape[-1], t.shape[-1]) for s, t in pairs], pairs[0][0])
        loss = pairs[0][0].new_zeros((), dtype=torch.float32)
        for index, (student, teacher) in enumerate(pairs):
            key = str(index)
            if key in projections:
                student = projections[key](student.to(projections[key].weight.dtype))
            loss = loss + torch.nn.functional.mse_loss(student.float(), teacher.float().to(student.device))
        self._teacher_features = {}  # not kept alive through the next forward
        return loss

    def _ensure_projections(self, widths: List[Tuple[int, int]], like: Tensor) -> nn.ModuleDict:
        if self._projections is None:
            projections = nn.ModuleDict()
            for index, (student_width, teacher_width) in enumerate(widths):
                if student_width != teacher_width:
                    projections[str(index)] = _projection(student_width, teacher_width, seed=index)
            self._projections = projections.to(device=like.device, dtype=torch.promote_types(like.dtype, torch.float32))
            self._projection_optimizer.track(list(self._projections.parameters()))
            if self._restored is not None:
                self._apply_restored()
        for key, layer in self._projections.items():
            student_width, teacher_width = widths[int(key)]
            if (layer.in_features, layer.out_features) != (student_width, teacher_width):
                raise ValueError(
                    f"`features` pair {self.features[int(key)]} has widths {student_width} -> {teacher_width}"
                    f" but its projection maps {layer.in_features} -> {layer.out_features}"
                )
        return self._projections

    def _apply_restored(self) -> None:
        state, self._restored = self._restored, None
        saved = state.get("projections", {})
        if set(saved) != set(self._projections.keys()):
            raise ValueError(
                f"the checkpoint holds feature projections {sorted(saved)} but this run needs"
                f" {sorted(self._projections.keys())}; resume with the same models and `features`"
            )
        for key, weights in saved.items():
            self._projections[key].load_state_dict(weights)
        if state.get("projection_optimizer") is not None:
            self._projection_optimizer.load_state_dict(state["projection_optimizer"])

    # ------------------------------------------------------------------ internals
    def _flush_cache(self) -> None:
        if self.cache == "disk" and self._cache.dirty and self._cache_file is not None:
            self._cache.save(self._cache_file)

    def _detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._projection_optimizer.stop()
        if self._restore_step is not None:
            module, own = self._restore_step
            if own is None:
                module.__dict__.pop("training_step", None)
            else:
                module.training_step = own
            self._restore_step = None
        self._capturing = self._teacher_running = False
        self._step = None
        self._teacher_features = {}


class _Step:
    """What one training step captured, and its distillation loss once computed."""

    def __init__(self, global_step: int, batch: Any) -> None:
        self.global_step = global_step
        self.batch = batch
        self.inputs: Tuple[tuple, dict] = ((), {})
        self.output: Any = None
        self.output_version: int | None = None
        self.features: Dict[int, Tensor] = {}
        self.result: Tensor | None = None
        self.read = False

    def alpha(self, kd: KnowledgeDistillation) -> float:
        return kd._alpha_at(self.global_step)

    def weighted(self, kd: KnowledgeDistillation) -> Tensor:
        if self.result is None:
            self.result = (1.0 - self.alpha(kd)) * kd._distill(self)
        return self.result


# ---------------------------------------------------------------------- helpers
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_self(teacher: Any) -> bool:
    return isinstance(teacher, str) and teacher == "self"


def _check_teacher(teacher: Any, teacher_class: Any) -> Path | None:
    """Validate the teacher arguments; return the checkpoint path when one is given."""
    usage = (
        "pass the teacher model (an nn.Module or LightningModule), a Lightning checkpoint path with"
        " `teacher_class=YourModule`, or 'self' (a frozen copy of the student's starting weights)"
    )
    if teacher is None:
        raise ValueError(f"`teacher` is required: {usage}")
    if isinstance(teacher, nn.Module) or _is_self(teacher):
        if teacher_class is not None:
            raise ValueError("`teacher_class` is only used when `teacher` is a checkpoint path; remove it")
        return None
    if not isinstance(teacher, (str, os.PathLike)):
        raise ValueError(f"`teacher` must be a model, a checkpoint path or 'self', got {type(teacher).__name__}: {usage}")
    path = Path(teacher)
    if not path.is_file():
        raise ValueError(f"`teacher` checkpoint path {str(path)!r} does not exist; {usage}")
    if teacher_class is None:
        raise ValueError(
            f"`teacher` is a checkpoint path ({str(path)!r}); also pass `teacher_class=`, the"
            " LightningModule class it was saved from"
        )
    if not (isinstance(teacher_class, type) and issubclass(teacher_class, nn.Module)):
        raise ValueError(f"`teacher_class` must be the teacher's nn.Module/LightningModule class, got {teacher_class!r}")
    return path


def _check_features(features: Any) -> Tuple[Tuple[str, str], ...]:
    if features is None:
        return ()
    example = "e.g. [('model.layer3', 'model.layer3')]"
    if not isinstance(features, (list, tuple)):
        raise ValueError(f"`features` must be a list of (student layer, teacher layer) name pairs, {example}")
    pairs = []
    for pair in features:
        if not (
            isinstance(pair, (list, tuple))
            and len(pair) == 2
            and all(isinstance(n, str) and n for n in pair)
        ):
            raise ValueError(
                f"`features` entries must be (student layer, teacher layer) pairs of names, got {pair!r}; {example}"
            )
        pairs.append((pair[0], pair[1]))
    return tuple(pairs)


def _submodule(root: nn.Module, argument: str, name: str, owner: str = "student") -> nn.Module:
    modules = dict(root.named_modules())
    if name in modules:
        return modules[name]
    raise ValueError(
        f"`{argument}` layer {name!r} does not exist in the {owner} ({type(root).__name__})."
        + close_names_hint(name, [n for n in modules if n])
    )


def _frozen_copy(pl_module: LightningModule, trainer: Trainer) -> nn.Module:
    # The memo keeps the Trainer (and everything it holds) out of the copy.
    teacher = copy.deepcopy(pl_module, {id(trainer): None, **nf4_deepcopy_memo(pl_module)})
    # Taken before the other callbacks of this fit set up (see `before_compression_setup`),
    # but transforms and hooks of an earlier fit (QAT stays attached) may be on the
    # student; the raw weights are the starting ones, so strip them all.
    detach_all(teacher)
    for module in teacher.modules():
        for hooks in (
            module._forward_pre_hooks,
            module._forward_pre_hooks_with_kwargs,
            module._forward_hooks,
            module._forward_hooks_with_kwargs,
            module._forward_hooks_always_called,
        ):
            hooks.clear()
        for key in [k for k in module.__dict__ if k.startswith("_lc_")]:
            del module.__dict__[key]
    teacher.__dict__.pop("training_step", None)
    return teacher


def _load_teacher(path: Path, cls: type) -> nn.Module:
    # weights_only: tensors and plain containers only; nothing is unpickled.
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise ValueError(f"`teacher` checkpoint {str(path)!r} has no 'state_dict'; pass a Lightning checkpoint")
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    parameters = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        hparams = {k: v for k, v in hparams.items() if k in parameters}
    teacher = cls(**hparams)
    try:
        teacher.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise ValueError(
            f"`teacher` checkpoint {str(path)!r} does not fit `teacher_class` {cls.__name__}: {error}"
        ) from None
    return teacher


def _projection(student_width: int, teacher_width: int, seed: int) -> nn.Linear:
    # nn.Linear's own initialisation, from a fixed generator: every rank builds the same
    # projection, and the global RNG (dropout, shuffling) is left as it was.
    layer = nn.utils.skip_init(nn.Linear, student_width, teacher_width)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
        bound = 1 / math.sqrt(student_width)
        nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return layer


def _first_tensor(output: Any, argument: str) -> Tensor:
    """The logits of a module output: a tensor, ``.logits``/``["logits"]``, or the first element."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return _first_tensor(output["logits"], argument)
    if isinstance(getattr(output, "logits", None), Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output:
        return _first_tensor(output[0], argument)
    raise ValueError(
        f"cannot find a tensor in a module output of type {type(output).__name__}; set `{argument}` to a"
        " module that returns a tensor (or a tuple/dict with one first / under 'logits')"
    )


def _as_float(tensor: Tensor) -> Tensor:
    # A copy made outside inference mode is an ordinary tensor that autograd may save.
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32), copy=True)


def _floating_dtype(module: nn.Module) -> torch.dtype | None:
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return None


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_cast_floats(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast_floats(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value


__all__ = ["KnowledgeDistillation", "CACHES", "CACHE_FILE"]
