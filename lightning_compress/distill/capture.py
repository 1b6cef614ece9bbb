"""What the student and the teacher computed in a training step.

Pure torch, no Lightning import: a wrapper around the model's ``training_step`` marks the
step, and forward hooks record the student's inputs and output and both models'
intermediate features.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import torch
from torch import Tensor, nn

from lightning_compress.core.targeting import close_names_hint
from lightning_compress.core.validate import ArgumentError
from lightning_compress.distill.teacher import run_teacher


def check_features(features: Any) -> Tuple[Tuple[str, str], ...]:
    """Validate ``features``, a list of (student layer, teacher layer) name pairs; return it as a tuple."""
    if features is None:
        return ()
    example = "e.g. [('model.layer3', 'model.layer3')]"
    if not isinstance(features, (list, tuple)):
        raise ArgumentError("features", f"`features` must be a list of (student layer, teacher layer) name pairs, {example}")
    pairs = []
    for pair in features:
        if not (
            isinstance(pair, (list, tuple))
            and len(pair) == 2
            and all(isinstance(n, str) and n for n in pair)
        ):
            raise ArgumentError(
                "features",
                f"`features` entries must be (student layer, teacher layer) pairs of names, got {pair!r}; {example}"
            )
        pairs.append((pair[0], pair[1]))
    return tuple(pairs)


def submodule(root: nn.Module, argument: str, name: str, owner: str = "student") -> nn.Module:
    """The submodule ``name`` of ``root`` (``""`` is ``root``); the error names ``argument`` and close names."""
    modules = dict(root.named_modules())
    if name in modules:
        return modules[name]
    raise ValueError(
        f"`{argument}` layer {name!r} does not exist in the {owner} ({type(root).__name__})."
        + close_names_hint(name, [n for n in modules if n])
    )


def first_tensor(output: Any, argument: str) -> Tensor:
    """The logits of a module output: a tensor, ``.logits``/``["logits"]``, or the first element."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return first_tensor(output["logits"], argument)
    if isinstance(getattr(output, "logits", None), Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output:
        return first_tensor(output[0], argument)
    raise ValueError(
        f"cannot find a tensor in a module output of type {type(output).__name__}; set `{argument}` to a"
        " module that returns a tensor (or a tuple/dict with one first / under 'logits')"
    )


def as_float(tensor: Tensor) -> Tensor:
    """``tensor`` in float32 (or wider) that autograd may save: itself when it already is
    one, else a copy (an inference tensor, or another dtype)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32), copy=tensor.is_inference())


class StepCapture:
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

    def record_output(self, output: Any) -> None:
        """Keep the student's latest output; a new forward invalidates a computed loss."""
        self.output = output
        self.output_version = output._version if isinstance(output, Tensor) else None
        self.result = None  # recomputed on the next read

    def teacher_args(self, teacher_inputs: Callable[[Any], Any] | None) -> Tuple[tuple, dict]:
        """The teacher's ``(args, kwargs)``: ``teacher_inputs(batch)``, else what the student module received."""
        if teacher_inputs is None:
            return self.inputs
        inputs = teacher_inputs(self.batch)
        return (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), {}

    def student_output(self, student_layer: str | None) -> Tensor:
        """The captured output's logits.

        Raises:
            RuntimeError: the student module was not called in this step, or its output
                was modified in place after it was captured.
        """
        if self.output is None:
            where = f"`student_layer` {student_layer!r}" if student_layer else "the LightningModule's forward"
            raise RuntimeError(
                f"KnowledgeDistillation saw no call of {where} in this training_step; call the model"
                " (self(x)) in training_step, or set `student_layer` to the module that computes the outputs"
                " (e.g. 'model' for a training_step that calls self.model(**batch)); the teacher then receives"
                " that module's inputs, so a teacher whose forward takes others (a checkpoint of this"
                " LightningModule) needs `teacher_inputs`, a function from the batch to them"
            )
        student = first_tensor(self.output, "student_layer")
        if self.output_version is not None and student._version != self.output_version:
            where = repr(student_layer) if student_layer else "the LightningModule's forward"
            raise RuntimeError(
                f"the output of {where} was modified in place after it was computed (e.g. by a"
                " following nn.ReLU(inplace=True)), so it is not the output to distil; choose the"
                " module after that operation as `student_layer`, or make it not in place"
            )
        return student


class OutputCapture:
    """What the student and the teacher compute in a training step.

    The student module's inputs and output, and the student's feature layers, are recorded
    into ``step`` while the wrapped ``training_step`` runs (``capturing``); the teacher's
    feature layers into ``teacher_features`` during :meth:`run_teacher`.
    """

    def __init__(self) -> None:
        self._handles: List[Any] = []
        self._unwrap: Callable[[], None] | None = None
        self.step: StepCapture | None = None
        self.capturing = False  # inside the user's training_step
        self.teacher_running = False
        self.teacher_features: Dict[int, Tensor] = {}
        self.teacher_dtype: torch.dtype | None = None  # of the teacher's last outputs, before float32

    @property
    def attached(self) -> bool:
        """Whether the forward hooks are on the models."""
        return bool(self._handles)

    def attach(self, student: nn.Module, features: Sequence[Tuple[nn.Module, nn.Module]]) -> None:
        """Hook the ``student`` module and each (student layer, teacher layer) feature pair."""
        # prepend: the inputs as the module receives them, before other callbacks' pre-hooks.
        self._handles.append(student.register_forward_pre_hook(self._capture_inputs, with_kwargs=True, prepend=True))
        self._handles.append(student.register_forward_hook(self._capture_output))
        for index, (student_layer, teacher_layer) in enumerate(features):
            self._handles.append(student_layer.register_forward_hook(functools.partial(self._capture_feature, index)))
            self._handles.append(
                teacher_layer.register_forward_hook(functools.partial(self._capture_teacher_feature, index))
            )

    def wrap_training_step(
        self, module: nn.Module, global_step: Callable[[], int], finish: Callable[[Any], Any]
    ) -> None:
        """Replace ``module.training_step`` (on the instance, until :meth:`detach`) by one that
        captures a new ``step`` while the original runs and returns ``finish(its output)``.

        Raises:
            ValueError: another distillation capture already wrapped it.
        """
        if getattr(module.__dict__.get("training_step"), "_lc_distillation", False):
            raise ValueError(
                "another KnowledgeDistillation already distils this model; use one callback per"
                " model (several teachers can be averaged into one teacher module)"
            )
        original = module.training_step
        own = module.__dict__.get("training_step")

        # functools.wraps: Lightning reads the signature (batch_idx or not) through __wrapped__.
        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            self.step = StepCapture(global_step(), args[0] if args else kwargs.get("batch"))
            self.capturing = True
            try:
                output = original(*args, **kwargs)
            finally:
                self.capturing = False
            return finish(output)

        def unwrap() -> None:
            if own is None:
                module.__dict__.pop("training_step", None)
            else:
                module.training_step = own

        training_step._lc_distillation = True
        module.training_step = training_step
        self._unwrap = unwrap

    def detach(self) -> None:
        """Remove the hooks, give the module its own ``training_step`` back, forget what was captured."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._unwrap is not None:
            self._unwrap()
            self._unwrap = None
        self.capturing = self.teacher_running = False
        self.step = None
        self.teacher_features = {}

    def take_step(self) -> StepCapture | None:
        """The current step's record, which this capture then forgets."""
        step, self.step = self.step, None
        return step

    def run_teacher(self, teacher: nn.Module, args: tuple, kwargs: dict, dtype: torch.dtype | None) -> Tensor:
        """The float logits of :func:`~lightning_compress.distill.teacher.run_teacher`, recording
        the teacher's features into ``teacher_features`` (as float copies) on the way."""
        self.teacher_features = {}
        self.teacher_running = True
        try:
            output = run_teacher(teacher, args, kwargs, dtype)
        finally:
            self.teacher_running = False
        # Made under no_grad (see run_teacher), so autograd may save them as they are: only
        # converted (a bfloat16 teacher's), not copied; unless the teacher's own forward
        # ran in inference mode, whose tensors autograd refuses to save.
        logits = first_tensor(output, "teacher")
        self.teacher_dtype = logits.dtype  # what a cache stores them in (exactly)
        logits = as_float(logits)
        self.teacher_features = {i: as_float(f) for i, f in self.teacher_features.items()}
        return logits

    def take_teacher_features(self) -> Dict[int, Tensor]:
        """The teacher's features of the last :meth:`run_teacher`, which this capture then forgets
        (so they are not kept alive through the next forward)."""
        features, self.teacher_features = self.teacher_features, {}
        return features

    def _capture_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.capturing:
            self.step.inputs = (args, kwargs)

    def _capture_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.capturing:
            self.step.record_output(output)

    def _capture_feature(self, index: int, module: nn.Module, args: tuple, output: Any) -> None:
        if self.capturing and not self.teacher_running:
            self.step.features[index] = first_tensor(output, "features")

    def _capture_teacher_feature(self, index: int, module: nn.Module, args: tuple, output: Any) -> None:
        if self.teacher_running:
            self.teacher_features[index] = first_tensor(output, "features")


__all__ = ["OutputCapture", "StepCapture", "as_float", "check_features", "first_tensor", "submodule"]
