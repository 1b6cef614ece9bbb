"""The teacher: argument checks, loading from a checkpoint, a frozen copy of the student,
and running it without gradients in its own dtype. Pure torch, no Lightning import."""

from __future__ import annotations

import copy
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Tuple

import torch
from torch import nn

from lightning_compress.core.notes import add_note
from lightning_compress.core.sharding import is_sharded_model
from lightning_compress.core.transforms import detach_all
from lightning_compress.core.validate import ArgumentError
from lightning_compress.quant.nf4 import nf4_deepcopy_memo


def is_self(teacher: Any) -> bool:
    """Whether ``teacher`` is ``"self"``: a frozen copy of the student's starting weights."""
    return isinstance(teacher, str) and teacher == "self"


def check_teacher(teacher: Any, teacher_class: Any) -> Path | None:
    """Validate the teacher arguments; return the checkpoint path when one is given.

    Raises:
        ArgumentError: naming ``teacher`` or ``teacher_class``.
    """
    usage = (
        "pass the teacher model (an nn.Module or LightningModule), a Lightning checkpoint path with"
        " `teacher_class=YourModule`, or 'self' (a frozen copy of the student's starting weights)"
    )
    if teacher is None:
        raise ArgumentError("teacher", f"`teacher` is required: {usage}")
    if isinstance(teacher, nn.Module) or is_self(teacher):
        if teacher_class is not None:
            raise ArgumentError("teacher_class", "`teacher_class` is only used when `teacher` is a checkpoint path; remove it")
        return None
    if not isinstance(teacher, (str, os.PathLike)):
        raise ArgumentError("teacher", f"`teacher` must be a model, a checkpoint path or 'self', got {type(teacher).__name__}: {usage}")
    path = Path(teacher)
    if not path.is_file():
        problem = "is a directory, not a checkpoint file" if path.is_dir() else "does not exist"
        raise ArgumentError("teacher", f"`teacher` checkpoint path {str(path)!r} {problem}; {usage}")
    if teacher_class is None:
        raise ArgumentError(
            "teacher_class",
            f"`teacher` is a checkpoint path ({str(path)!r}); also pass `teacher_class=`, the"
            " LightningModule class it was saved from"
        )
    if not (isinstance(teacher_class, type) and issubclass(teacher_class, nn.Module)):
        raise ArgumentError("teacher_class", f"`teacher_class` must be the teacher's nn.Module/LightningModule class, got {teacher_class!r}")
    return path


def check_not_shared(teacher: nn.Module, student: nn.Module) -> None:
    """Refuse a teacher holding any of the student's parameters: freezing it would freeze them."""
    student_parameters = {id(p) for p in student.parameters()}
    if any(id(p) in student_parameters for p in teacher.parameters()):
        raise ValueError(
            "`teacher` shares parameters with the student (it is the student, one of its"
            " submodules, or holds one of them), so freezing the teacher would freeze the"
            " student; pass a separate model, or teacher='self' for a frozen copy"
        )


def load_teacher(path: Path, cls: type) -> nn.Module:
    """Build ``cls`` from a Lightning checkpoint's ``hyper_parameters`` and load its ``state_dict``.

    Raises:
        ArgumentError: naming ``teacher`` when the file is not a weights-only Lightning
            checkpoint, or ``teacher_class`` when its weights or hyperparameters do not fit
            ``cls``.
    """
    # weights_only: tensors and plain containers only; nothing is unpickled.
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle's and torch's many error types; the reason goes in the message
        # Never pass on torch's advice to retry with weights_only=False: that would run code from the file.
        raise ArgumentError(
            "teacher",
            f"`teacher` checkpoint {str(path)!r} is not a weights-only Lightning checkpoint ({type(error).__name__});"
            " it holds Python objects that would have to be unpickled, or is not a checkpoint at all. Save the"
            " teacher with Lightning's Trainer.save_checkpoint (tensors and plain values only), or pass the"
            " teacher model itself",
        ) from None
    state_dict = checkpoint.get("state_dict") if isinstance(checkpoint, Mapping) else None
    if not isinstance(state_dict, Mapping):
        raise ArgumentError(
            "teacher", f"`teacher` checkpoint {str(path)!r} has no 'state_dict' mapping; pass a Lightning checkpoint"
        )
    hparams = checkpoint.get("hyper_parameters") or {}
    if not isinstance(hparams, Mapping) or not all(isinstance(key, str) for key in hparams):
        raise ArgumentError(
            "teacher", f"`teacher` checkpoint {str(path)!r}: 'hyper_parameters' is not a mapping of argument names"
        )
    hparams = dict(hparams)
    parameters = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        hparams = {k: v for k, v in hparams.items() if k in parameters}
    try:
        teacher = cls(**hparams)
    except TypeError as error:
        raise ArgumentError(
            "teacher_class",
            f"`teacher_class` {cls.__name__} cannot be built from the hyperparameters of {str(path)!r}"
            f" ({sorted(hparams)}): {error}; pass the class the checkpoint was saved from",
        ) from None
    try:
        teacher.load_state_dict(state_dict)
    except (RuntimeError, TypeError, ValueError, AttributeError) as error:
        raise ArgumentError(
            "teacher_class",
            f"`teacher` checkpoint {str(path)!r} does not fit `teacher_class` {cls.__name__}: {error}",
        ) from None
    return teacher


def frozen_copy(module: nn.Module, leave_out: Iterable[Any] = ()) -> nn.Module:
    """A frozen deep copy of ``module``'s raw weights, without compression transforms or hooks.

    References to the objects in ``leave_out`` (the Trainer) become ``None`` in the copy
    instead of being copied with it.
    """
    memo = {id(obj): None for obj in leave_out}
    teacher = copy.deepcopy(module, {**memo, **nf4_deepcopy_memo(module)})
    # Taken before the other callbacks of this fit set up (see `before_compression_setup`),
    # but transforms and hooks of an earlier fit (QAT stays attached) may be on the
    # student; the raw weights are the starting ones, so strip them all.
    detach_all(teacher)
    for submodule in teacher.modules():
        for hooks in (
            submodule._forward_pre_hooks,
            submodule._forward_pre_hooks_with_kwargs,
            submodule._forward_hooks,
            submodule._forward_hooks_with_kwargs,
            submodule._forward_hooks_always_called,
        ):
            hooks.clear()
        for key in [k for k in submodule.__dict__ if k.startswith("_lc_")]:
            del submodule.__dict__[key]
        _no_kv_cache(submodule)
    teacher.__dict__.pop("training_step", None)
    return freeze(teacher)


def _no_kv_cache(module: nn.Module) -> None:
    """A transformers model in eval mode fills a key/value cache in every forward (for
    generation); a teacher only scores, so its copy does not keep one (0.07x of a 134M
    LLaMA at the teacher's peak, 8 x 64 tokens)."""
    transformers = sys.modules.get("transformers")  # a transformers model means it is imported
    config = getattr(module, "config", None)
    if transformers is not None and isinstance(config, transformers.PretrainedConfig) and config.use_cache:
        config.use_cache = False


def freeze(teacher: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Put ``teacher`` in eval mode without gradients (and in ``dtype``), in place; return it."""
    teacher.eval()
    teacher.requires_grad_(False)
    if dtype is not None:
        teacher.to(dtype)
    return teacher


def floating_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of ``module``'s first floating parameter (``None`` without one)."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return None


def cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating tensor in it (through tuples, lists, dicts) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(cast_floats(v, dtype) for v in value)
    if isinstance(value, list):
        return [cast_floats(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: cast_floats(v, dtype) for k, v in value.items()}
    return value


def run_teacher(teacher: nn.Module, args: Tuple[Any, ...], kwargs: dict, dtype: torch.dtype | None = None) -> Any:
    """``teacher(*args, **kwargs)`` without gradients, its floating inputs cast to ``dtype``
    (by default the teacher's own parameter dtype)."""
    # The teacher computes in its own dtype: a bf16-true student's inputs are cast up
    # for a float32 teacher (or down to `teacher_dtype`).
    dtype = dtype or floating_dtype(teacher)
    if dtype is not None:
        args, kwargs = cast_floats((args, kwargs), dtype)
    # no_grad, not inference_mode: autograd may save what no_grad makes (the loss keeps the
    # logits for its backward), while an inference tensor would need a copy first: a
    # 32000-token vocabulary's logits, 0.13x of a 134M LLaMA at the step's peak.
    with torch.no_grad():
        try:
            return teacher(*args, **kwargs)
        except (TypeError, AttributeError) as error:  # e.g. a student's forward(batch) handed on a dict
            given = [type(a).__name__ for a in args] + [f"{k}={type(v).__name__}" for k, v in kwargs.items()]
            add_note(
                error,
                f"lightning_compress: the teacher ({type(teacher).__name__}) was called with ({', '.join(given)}): what"
                " the student's forward received, or `teacher_inputs(batch)`; if the teacher takes other inputs, pass"
                " KnowledgeDistillation(teacher_inputs=...), a function from the batch to its positional inputs"
                " (a tuple, or one tensor: e.g. lambda batch: (batch['input_ids'], batch['attention_mask']))"
            )
            raise


def load_self_teacher(teacher: nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """Give a ``teacher="self"`` copy the weights of the checkpoint ``fit(ckpt_path=...)``
    fine-tunes (its start).

    Raises:
        ValueError: the checkpoint lacks some of its weights, they do not fit, or the
            teacher is sharded; naming the fix.
    """
    weights = checkpoint.get("state_dict")
    own = teacher.state_dict()
    missing = [key for key in own if not isinstance(weights, Mapping) or key not in weights]
    try:
        if missing or is_sharded_model(teacher):
            raise RuntimeError(f"it lacks {missing[:4]}" if missing else "a sharded teacher")
        teacher.load_state_dict({key: weights[key] for key in own})
    except RuntimeError as error:
        raise ValueError(
            f"teacher='self' copies the weights of the checkpoint `ckpt_path` fine-tunes, but cannot take them ({error});"
            " load them before fit (`YourModule.load_from_checkpoint`) and drop `ckpt_path`, or pass the teacher"
        ) from None


def to_host(teacher: nn.Module | None) -> None:
    """The frozen ``teacher`` to the CPU at the end of a fit, finished or failed, as
    Lightning moves the student: off the GPU, whose memory it would hold. A sharded teacher
    stays (its shards are the mesh's). Not the feature projections: they are small, and
    their optimizer's state stays where they trained."""
    if teacher is not None and not is_sharded_model(teacher):
        teacher.cpu()


def other_teacher_error(from_self: bool) -> ValueError:
    """The refusal of a resume whose teacher's weights differ from the checkpoint's
    (``teacher_fingerprint``): the resumed run would distil from another teacher."""
    if from_self:
        return ValueError(
            "the checkpoint was distilled from teacher='self' with other starting weights than the teacher this run"
            " has (the model is built differently, or that run fine-tuned a checkpoint's weights), so the resumed run"
            " would distil from another teacher; build the model with the weights that run started from, or pass"
            " them as `teacher` (a model, or that checkpoint with `teacher_class`)"
        )
    return ValueError(
        "the checkpoint was distilled from a teacher with other weights than this run's `teacher` (another checkpoint"
        " file or model), so the resumed run would distil from another teacher; resume with the teacher that run"
        " used (its weights are compared, by SHA-256), or start a new run"
    )


__all__ = [
    "other_teacher_error",
    "to_host",
    "cast_floats",
    "check_not_shared",
    "check_teacher",
    "floating_dtype",
    "freeze",
    "frozen_copy",
    "is_self",
    "load_self_teacher",
    "load_teacher",
    "run_teacher",
]


def shard_teacher(teacher: nn.Module, mesh: Any) -> None:
    """Shard the frozen ``teacher`` on its own with FSDP2 over ``mesh``: each block (an
    element of an ``nn.ModuleList`` that holds parameters) and the rest at the root, so a
    rank keeps its share of the teacher and gathers one block at a time for the forward."""
    from torch.distributed.fsdp import fully_shard

    for module_list in [m for m in teacher.modules() if isinstance(m, nn.ModuleList)]:
        for block in module_list:
            if any(True for _ in block.parameters()):
                fully_shard(block, mesh=mesh, reshard_after_forward=True)
    # The root too frees its parameters after each forward: the teacher has no backward.
    fully_shard(teacher, mesh=mesh, reshard_after_forward=True)
