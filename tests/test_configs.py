"""Method configs and the callback base: every bad argument is an ArgumentError that names
it, the callback's signature is its config's, and the config stays the source of truth."""

import copy
import dataclasses
import inspect
import math
import pickle

import pytest
import torch
from torch import nn

from lightning_compress import (
    ArgumentError,
    CompressedExport,
    KnowledgeDistillation,
    LoRA,
    MagnitudePruning,
    PruningConfig,
    QATConfig,
    QuantizationAwareTraining,
)

TEACHER = nn.Linear(2, 2)

BAD = [
    (MagnitudePruning, dict(start_step=math.inf), "start_step", "must be an int"),
    (MagnitudePruning, dict(end_step=math.nan), "end_step", "must be an int"),
    (MagnitudePruning, dict(final_sparsty=0.5), "final_sparsty", "did you mean `final_sparsity`"),
    (MagnitudePruning, dict(norm=True), "norm", "`norm` must be 1 or 2"),
    (MagnitudePruning, dict(update_every=0), "update_every", "a positive int or None"),
    (QuantizationAwareTraining, dict(weights="int9"), "weights", "'int2'..'int8'"),
    (QuantizationAwareTraining, dict(group_size=1), "group_size", "int >= 2"),
    (QuantizationAwareTraining, dict(range_lr=math.inf), "range_lr", "positive number"),
    (QuantizationAwareTraining, dict(ewgs_delta=2.0), "ewgs_delta", r"a number in \[0, 2\) \(0: the plain"),
    (QuantizationAwareTraining, dict(ewgs_delta=-0.1), "ewgs_delta", r"in \[0, 2\).*got -0\.1"),
    (QuantizationAwareTraining, dict(ewgs_delta="0.2"), "ewgs_delta", r"in \[0, 2\).*got '0\.2'"),
    (QuantizationAwareTraining, dict(freeze_bn_step=-1), "freeze_bn_step", ">= 0"),
    (QuantizationAwareTraining, dict(overrides={1: {"bits": 4}}), "overrides", "keys must be layer name globs"),
    (QuantizationAwareTraining, dict(overrides={"x": {"bits": 4, "weights": "int8"}}), "overrides", "both `weights` and `bits`"),
    (QuantizationAwareTraining, dict(overrides={"x": {"bits": 9}}), "overrides", "from 2 to 8"),
    (LoRA, dict(r=0), "r", "adapter rank"),
    (LoRA, dict(lora_alpha=math.inf), "lora_alpha", "positive number"),
    (LoRA, dict(adapter_dir=""), "adapter_dir", "directory path"),
    (LoRA, dict(compute_dtype="float64", base="nf4"), "compute_dtype", "unknown `compute_dtype`"),
    (QuantizationAwareTraining, dict(scale_dtype=torch.float64), "scale_dtype", "unknown `scale_dtype` 'float64'"),
    (KnowledgeDistillation, dict(teacher=TEACHER, teacher_dtype="int8"), "teacher_dtype", "floating torch dtype"),
    (KnowledgeDistillation, dict(teacher=TEACHER, teacher_dtype="bfloat61"), "teacher_dtype", "got 'bfloat61'"),
    (KnowledgeDistillation, dict(teacher=TEACHER, feature_weight=math.inf), "feature_weight", "number >= 0"),
    (KnowledgeDistillation, dict(teacher=TEACHER, projection_lr=math.nan), "projection_lr", "positive number"),
    (KnowledgeDistillation, dict(teacher=TEACHER, cache="disk", index_fn=len, cache_dir=5), "cache_dir", "folder path"),
    (KnowledgeDistillation, dict(teacher="/", teacher_class=nn.Linear), "teacher", "is a directory, not a checkpoint file"),
    (KnowledgeDistillation, dict(teacher=TEACHER, cache="memory"), "index_fn", "needs `index_fn`"),
    (CompressedExport, dict(dirpath="x", formats=5), "formats", "must be a list"),
    (CompressedExport, dict(dirpath="x", formats=[["onnx"]]), "formats", "must be a list"),
    (CompressedExport, dict(dirpath="x", max_relative_error=math.nan), "max_relative_error", "number >= 0"),
    (CompressedExport, dict(), "dirpath", "missing a required argument: 'dirpath'"),
    (CompressedExport, dict(dirpath="x", parity_batches=True), "parity_batches", "positive int"),
]


@pytest.mark.parametrize("callback, kwargs, argument, message", BAD, ids=lambda v: getattr(v, "__name__", None))
def test_bad_arguments_are_argument_errors_naming_the_argument(callback, kwargs, argument, message):
    with pytest.raises(ArgumentError, match=message) as raised:
        callback(**kwargs)
    assert raised.value.argument == argument
    assert isinstance(raised.value, ValueError)  # code that catches ValueError keeps working


def test_too_many_positional_arguments_name_the_callback():
    with pytest.raises(ArgumentError, match="MagnitudePruning: too many positional arguments"):
        MagnitudePruning(0.5, 0.1)


def test_the_signature_is_the_configs_and_a_subclass_keeps_its_own_arguments():
    config_fields = [f.name for f in dataclasses.fields(QATConfig) if f.init]
    assert list(inspect.signature(QuantizationAwareTraining).parameters) == config_fields
    assert inspect.signature(QuantizationAwareTraining).parameters["weights"].default == "int8"

    class WithExtra(QuantizationAwareTraining):
        def __init__(self, *args, extra: int = 3, **kwargs):
            super().__init__(*args, **kwargs)
            self.extra = extra

    parameters = inspect.signature(WithExtra).parameters
    assert list(parameters) == [*config_fields, "extra"] and parameters["extra"].default == 3
    built = WithExtra("int4", group_size=32, extra=5)
    assert (built.extra, built.spec.bits, built.spec.group_size) == (5, 4, 32)

    class Spelled(MagnitudePruning):
        def __init__(self, final_sparsity=0.9, *, warmup: int = 2):
            super().__init__(final_sparsity)

    assert list(inspect.signature(Spelled).parameters) == ["final_sparsity", "warmup"]


def test_config_fields_read_as_attributes_and_cannot_be_shadowed():
    pruning = MagnitudePruning(0.5, end_step=3)
    assert (pruning.final_sparsity, pruning.end_step) == (0.5, 3)
    with pytest.raises(AttributeError, match="comes from its frozen config"):
        pruning.final_sparsity = 0.9
    assert pruning.config.final_sparsity == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        pruning.config.final_sparsity = 0.9
    # Copies and pickles rebuild the callback with the same config.
    for clone in (copy.deepcopy(pruning), pickle.loads(pickle.dumps(pruning))):
        assert clone.config == pruning.config and clone.owner_token == pruning.owner_token


def test_config_keeps_its_own_copy_of_mutable_arguments():
    overrides = {"head": {"bits": 4}}
    qat = QuantizationAwareTraining("int8", overrides=overrides)
    overrides["head"]["bits"] = 2
    assert qat.overrides == {"head": {"bits": 4}} and qat.config.layer_overrides["head"].bits == 4
    assert qat.config.spec_for("model.head") == (qat.config.layer_overrides["head"], "head")
    assert qat.config.spec_for("model.body") == (qat.spec, None)


def test_a_built_config_is_accepted_and_validated_once():
    config = PruningConfig(pattern="2:4")  # N:M fixes the sparsity at (M - N) / M
    assert config.final_sparsity == 0.5 and config.sparsity_pattern.m == 4
    assert MagnitudePruning(config=config).config is config
    assert LoRA(config=LoRA(4, 8.0, ["fc"]).config).config.target_modules == ("fc",)
    assert torch.float16 is LoRA(base="nf4", compute_dtype="float16").config.compute_dtype


def test_dtypes_are_taken_as_torch_dtypes_or_their_names():
    """scale_dtype refused torch.float16 and teacher_dtype refused "bfloat16" (LoRA's
    compute_dtype took both): one argument, two spellings, each accepted by one callback."""
    by_dtype = QuantizationAwareTraining("int4", group_size=32, scale_dtype=torch.float16)
    for spelling in ("float16", "torch.float16"):
        assert by_dtype.config == QuantizationAwareTraining("int4", group_size=32, scale_dtype=spelling).config
    assert by_dtype.config.spec.scale_dtype == "float16"
    for spelling in ("bfloat16", "torch.bfloat16", torch.bfloat16):
        assert KnowledgeDistillation(TEACHER, teacher_dtype=spelling).teacher_dtype is torch.bfloat16
        assert LoRA(base="nf4", compute_dtype=spelling).config.compute_dtype is torch.bfloat16
    with pytest.raises(ArgumentError, match=r"unknown `compute_dtype` torch.float64; choose one of \['bfloat16',"
                                            r" 'float16', 'float32'\] \(or the torch dtype\)"):
        LoRA(base="nf4", compute_dtype=torch.float64)  # it said "must be a float dtype", which float64 is
