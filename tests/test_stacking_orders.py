"""Stacking: every order of a 4-callback stack trains and exports the same model, bit for bit.

Each stack runs in all 24 orders from the same initial weights and seeds; the final
parameters and buffers, the effective (masked, fake-quantized) weights, the integer codes,
every callback's checkpoint state and the exported files must be identical.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from lightning_compress import (
    CompressedExport,
    KnowledgeDistillation,
    LoRA,
    MagnitudePruning,
    QuantizationAwareTraining,
    quantized_weights,
)
from lightning_compress.formats.packed import METADATA_FILE, WEIGHTS_FILE
from lightning_compress.quant.nf4 import dequantize_nf4, is_nf4
from tests.conftest import TinyRegressor, make_trainer, tiny_loader

STEPS = 6
LAYERS = ("conv", "fc1", "fc2")


def _pruning():
    return MagnitudePruning(0.5, start_step=1, end_step=4, update_every=1)


def _full_finetuning():
    return {
        "distill": KnowledgeDistillation(teacher="self", loss="mse", alpha=0.5),
        "prune": _pruning(),
        "qat": QuantizationAwareTraining("int4", group_size=4, start_step=2, learn_ranges=True, range_lr=1e-2),
    }


def _lora(**options):
    def build():
        return {
            "lora": LoRA(r=2, target_modules=["fc1", "fc2"], merge_on_fit_end=True, **options),
            "prune": _pruning(),
            "qat": QuantizationAwareTraining("int4", group_size=8, start_step=2, overrides={"conv": {"granularity": "channel"}}),
        }

    return build


# TinyRegressor's fc1 (32x64) and fc2 (8x32) split into NF4 blocks of 32 and scale blocks of 8.
STACKS = {
    "full": _full_finetuning,
    "lora": _lora(),
    "qlora": _lora(base="nf4", nf4_block_size=32, nf4_scaler_block_size=8),
}


def _plain(value):
    """A callback state as comparable plain values (tensors cloned to CPU)."""
    if isinstance(value, torch.Tensor):
        return dequantize_nf4(value) if is_nf4(value) else value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _assert_same(a, b, where):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{index}]")
    else:
        assert a == b, where


def _fit(stack: str, order, directory):
    torch.manual_seed(0)
    model = TinyRegressor()
    built = STACKS[stack]()
    built["export"] = CompressedExport(directory, parity_batches=1)
    callbacks = [built[name] for name in order]
    torch.manual_seed(1)  # LoRA's initialisation and dropout seed draw from here, whatever the order
    trainer = make_trainer(callbacks=callbacks, max_steps=STEPS)
    trainer.fit(model, tiny_loader(batches=STEPS), tiny_loader(batches=1, seed=1))
    assert trainer.global_step == STEPS
    with torch.no_grad():
        effective = {name: model.get_submodule(name).weight.detach().clone() for name in LAYERS}
    metadata = json.loads((directory / METADATA_FILE).read_text())
    return {
        "state_dict": _plain(model.state_dict()),
        "effective": effective,
        "codes": {name: _plain(vars(q)) for name, q in quantized_weights(model).items()},
        "callbacks": {name: _plain(cb.state_dict()) for name, cb in built.items()},
        "weights_sha256": metadata["weights_sha256"],
        "metadata": {k: v for k, v in metadata.items() if k != "library_versions"},
        "safetensors": (directory / WEIGHTS_FILE).read_bytes(),
    }


@pytest.mark.parametrize("stack", list(STACKS))
def test_every_order_of_a_four_callback_stack_gives_the_same_model(stack, tmp_path):
    names = [name for name in STACKS[stack]()] + ["export"]
    orders = list(itertools.permutations(names))
    assert len(orders) == 24
    reference = _fit(stack, orders[0], tmp_path / "0")
    # The stack did something: pruned, quantized and exported.
    assert set(reference["codes"]) == set(LAYERS)
    for name in ("fc1", "fc2"):
        assert (reference["effective"][name] == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    for index, order in enumerate(orders[1:], start=1):
        result = _fit(stack, order, tmp_path / str(index))
        for key in reference:
            _assert_same(reference[key], result[key], f"order {order}: {key}")


# ---------------------------------------------------------------------- pairs that depended on the order
NF4 = dict(base="nf4", nf4_block_size=32, nf4_scaler_block_size=8)


def _fit_pair(order, build):
    torch.manual_seed(0)
    model = TinyRegressor()
    built = build()
    torch.manual_seed(1)
    trainer = make_trainer(callbacks=[built[name] for name in order], max_steps=4)
    trainer.fit(model, tiny_loader(batches=4))
    return model, built


def test_self_distillation_teacher_is_the_float_student_whatever_the_qlora_order():
    """Listed after QLoRA, the teacher used to be copied from the NF4 student (and the copy
    failed for these block sizes); it is now copied before any callback changes the model."""
    torch.manual_seed(0)
    initial = TinyRegressor().state_dict()

    def build():
        return {
            "distill": KnowledgeDistillation(teacher="self", loss="mse", alpha=0.0),
            "lora": LoRA(r=2, target_modules=["fc1", "fc2"], **NF4),
        }

    results = [_fit_pair(order, build) for order in itertools.permutations(["distill", "lora"])]
    for _, built in results:
        teacher = built["distill"].teacher
        assert sorted(teacher.state_dict()) == sorted(initial)  # no adapters, no NF4 bases
        for key, value in initial.items():
            assert not is_nf4(teacher.state_dict()[key]) and torch.equal(teacher.state_dict()[key], value), key
    (first, _), (second, _) = results
    _assert_same(_plain(first.state_dict()), _plain(second.state_dict()), "state_dict")


def test_learned_ranges_on_a_qlora_base_train_the_same_in_either_order():
    """Listed after QLoRA, QAT used to read an NF4 weight to shape its learned scales and
    failed; they are now shaped from the weight's shape and set from the weight entering
    the stage on first use."""

    def build():
        return {
            "lora": LoRA(r=2, target_modules=["fc1", "fc2"], **NF4),
            "qat": QuantizationAwareTraining("int4", group_size=8, learn_ranges=True, start_step=1, targets=["fc1", "fc2"]),
        }

    results = [_fit_pair(order, build) for order in itertools.permutations(["lora", "qat"])]
    (first, first_built), (second, second_built) = results
    _assert_same(_plain(first.state_dict()), _plain(second.state_dict()), "state_dict")
    _assert_same(_plain(first_built["qat"].state_dict()), _plain(second_built["qat"].state_dict()), "qat state")
    assert first_built["qat"].state_dict()["layers"]["fc1"]["initialized"]


def test_qlora_exports_to_onnx_with_its_nf4_bases_copied_exactly(tmp_path):
    """The ONNX export works on a copy of the model; torchao's clone re-quantized NF4
    bases with its default block sizes (failing for these), so they are copied exactly."""
    import onnxruntime  # noqa: F401  (a dev dependency: a missing one fails, never skips)
    from lightning_compress.quant.nf4 import copy_nf4, to_nf4

    weight = torch.randn(32, 64)
    base = to_nf4(weight, 32, 8)
    copied = copy_nf4(base)
    assert (copied.block_size, copied.scaler_block_size) == (32, 8)
    assert torch.equal(dequantize_nf4(copied), dequantize_nf4(base))
    assert copied.quantized_data.data_ptr() != base.quantized_data.data_ptr()

    torch.manual_seed(0)
    model = TinyRegressor()
    export = CompressedExport(tmp_path / "out", formats=["safetensors", "onnx"], parity_batches=1)
    callbacks = [
        LoRA(r=2, target_modules=["fc1", "fc2"], **NF4),
        QuantizationAwareTraining("int4", group_size=32, start_step=1, targets=["fc1", "fc2"]),
        export,
    ]
    make_trainer(callbacks=callbacks, max_steps=3).fit(model, tiny_loader(batches=3), tiny_loader(batches=1, seed=1))
    assert (tmp_path / "out" / "model.onnx").is_file()
    assert export.report.parity.weights_exact
    assert is_nf4(model.fc1._parameters["weight"])  # the user's model keeps its NF4 bases
