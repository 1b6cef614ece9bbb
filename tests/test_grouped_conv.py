"""Grouped and depthwise convolutions (``nn.Conv2d(groups > 1)``), method by method.

A grouped convolution's weight is ``[out, in / groups, kh, kw]``: each output channel sees
``in / groups * kh * kw`` inputs, so it is a weight like any other for fake quantization
(its quantization groups run along those inputs), unstructured and structured pruning,
N:M pruning (blocks along ``in / groups``), the packed export, its loader and the ONNX
export. What a method cannot do (N:M blocks or quantization groups wider than a depthwise
kernel, a LoRA adapter, which has no grouped form) leaves the layer out with a warning
when a layer type selected it, and is an error when a name glob did. Each cell trains
with a real Trainer and reads the weights back.
"""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress import (
    CompressedExport,
    IncompatibleLayersSkipped,
    IncompatibleSettings,
    LoRA,
    MagnitudePruning,
    QuantizationAwareTraining,
    load_packed,
    quantized_weights,
)
from lightning_compress.formats.export import ONNX_FILE
from lightning_compress.formats.onnx import run_onnx
from tests.conftest import make_trainer

# Inputs per output channel: stem 4, dw 1 x 3x3 = 9 (depthwise), gc 4 x 3x3 = 36 (groups=2), head 16.
CONVS = ("dw", "gc")


class GroupedNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(4, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.gc = nn.Conv2d(8, 16, 3, padding=1, groups=2)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = F.relu(self.gc(F.relu(self.dw(F.relu(self.stem(x))))))
        return self.head(h.mean((2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader(batches: int = 4, batch_size: int = 4):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batches * batch_size, 4, 6, 6, generator=generator)
    y = torch.randn(batches * batch_size, 4, generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


EXAMPLE = torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(1))


def fit(*callbacks, steps=4):
    pl.seed_everything(0, verbose=False)
    model = GroupedNet()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(callbacks=list(callbacks), max_steps=steps).fit(model, loader())
    skipped = [str(w.message) for w in caught if issubclass(w.category, IncompatibleLayersSkipped)]
    return model, skipped


def refused(*callbacks) -> str:
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(callbacks=list(callbacks), max_steps=2)
    with pytest.raises(IncompatibleSettings) as info:
        trainer.fit(GroupedNet(), loader())
    assert trainer.global_step == 0
    return str(info.value)


def loads_with_the_same_numbers(model, directory):
    """The packed model computes exactly what the fake-quant model computes."""
    packed = load_packed(directory, GroupedNet, backend="dequantize")
    model.eval()
    with torch.no_grad():
        assert torch.equal(packed(EXAMPLE), model(EXAMPLE))
    assert packed.gc.groups == 2 and packed.dw.groups == 8
    return packed


def raw(model, name):
    return model.get_submodule(name)._parameters["weight"].detach()


# ---------------------------------------------------------------------- QAT
def test_int8_per_channel_qat_quantizes_grouped_convs_and_every_export_computes_the_same(tmp_path):
    export = CompressedExport(tmp_path / "out", formats=["safetensors", "onnx"])
    model, skipped = fit(QuantizationAwareTraining("int8", activations="int8_dynamic"), export)
    assert skipped == []
    codes = quantized_weights(model)
    assert sorted(codes) == ["dw", "gc", "head", "stem"]
    for name in CONVS:  # one scale per output channel over its in/groups x kernel inputs
        weight = model.get_submodule(name).weight
        assert codes[name].codes.shape == (weight.shape[0], math.prod(weight.shape[1:]))
        assert codes[name].scale.shape == (weight.shape[0], 1)
        assert torch.equal(codes[name].dequantize(), weight.detach())
    loads_with_the_same_numbers(model, tmp_path / "out")
    assert export.report.parity.passed
    # The ONNX file computes grouped convolutions with the trained (dequantized) weights.
    (onnx_out,) = run_onnx(tmp_path / "out" / ONNX_FILE, (EXAMPLE,))
    with torch.no_grad():
        reference = model(EXAMPLE)
    assert torch.allclose(torch.from_numpy(onnx_out), reference, rtol=1e-4, atol=1e-5)


def test_int4_groups_run_along_the_inputs_of_each_group_and_a_depthwise_kernel_is_left_out(tmp_path):
    qat = QuantizationAwareTraining("int4", group_size=4, start_step=1)
    model, skipped = fit(qat, CompressedExport(tmp_path / "out"))
    # gc: 36 inputs per output channel -> 9 groups of 4; dw: 9 inputs, which 4 does not divide.
    assert qat.skipped_layers.keys() == {"dw"}
    assert "`group_size`=4 does not divide the input size 9 of layer 'dw'" in skipped[0]
    assert "(a grouped convolution selected by its type)" in skipped[0]
    codes = quantized_weights(model)
    assert sorted(codes) == ["gc", "head", "stem"]
    assert codes["gc"].scale.shape == (16, 9)
    assert codes["gc"].codes.min() >= -8 and codes["gc"].codes.max() <= 7
    assert raw(model, "dw").flatten().unique().numel() == raw(model, "dw").numel()  # float, off any grid
    loads_with_the_same_numbers(model, tmp_path / "out")


def test_a_grouped_conv_a_name_selects_stays_an_error_even_with_skip():
    message = refused(QuantizationAwareTraining("int4", group_size=4, targets=["dw", "head"], on_incompatible="skip"))
    assert message.startswith("QuantizationAwareTraining(group_size=4) cannot quantize layer 'dw' (Conv2d, depthwise):")
    assert "a grouped convolution that a name in `targets` selects is an error even with on_incompatible='skip'" \
           in message
    assert "Fix: add exclude=['dw'] to QuantizationAwareTraining (recipe key qat.exclude)." in message
    assert "pass on_incompatible='skip'" not in message  # it would not help


# ---------------------------------------------------------------------- pruning
@pytest.mark.parametrize("pattern", ["unstructured", "structured"])
def test_unstructured_and_structured_pruning_prune_grouped_convs(tmp_path, pattern):
    pruning = MagnitudePruning(0.5, pattern=pattern, end_step=2)
    model, skipped = fit(pruning, CompressedExport(tmp_path / "out"))
    assert skipped == [] and pruning.skipped_layers == {}
    for name in ("stem", *CONVS, "head"):
        weight = raw(model, name)
        assert int((weight == 0).sum()) == weight.numel() // 2, name
        if pattern == "structured":  # whole output channels (filters) of the grouped conv
            zero_rows = (weight.flatten(1) == 0).all(dim=1)
            assert int(zero_rows.sum()) == weight.shape[0] // 2
    loads_with_the_same_numbers(model, tmp_path / "out")


def test_two_four_pruning_runs_along_each_groups_inputs_and_leaves_a_depthwise_conv_out(tmp_path):
    pruning = MagnitudePruning(pattern="2:4", end_step=2)
    model, skipped = fit(pruning, CompressedExport(tmp_path / "out"))
    assert pruning.skipped_layers.keys() == {"dw"}
    assert "layer 'dw' has input size 1, not divisible by M=4 of pattern '2:4'" in skipped[0]
    blocks = raw(model, "gc").movedim(1, -1).reshape(-1, 4)  # 4 inputs of one group, per kernel position
    assert bool(((blocks == 0).sum(dim=1) == 2).all())
    assert int((raw(model, "dw") == 0).sum()) == 0
    loads_with_the_same_numbers(model, tmp_path / "out")
    assert "dw" in refused(MagnitudePruning(pattern="2:4", targets=["dw", "gc"]))


# ---------------------------------------------------------------------- LoRA
def test_lora_leaves_grouped_convs_a_type_selects_out_and_refuses_a_named_one():
    lora = LoRA(r=2, target_modules=[nn.Conv2d, nn.Linear])
    model, skipped = fit(lora)
    assert sorted(lora.adapters) == ["head", "stem"] and sorted(lora.skipped_layers) == ["dw", "gc"]
    assert "LoRA leaves 2 layers without an adapter" in skipped[0]
    assert "layer 'gc' is a grouped convolution (groups=2); LoRA adapts only groups=1 convolutions" in skipped[0]
    assert not hasattr(model.gc, "lora_A") and not raw(model, "gc").requires_grad
    message = refused(LoRA(r=2, target_modules=["gc", "head"], on_incompatible="skip"))
    assert "LoRA(target_modules=['gc', 'head']) cannot adapt layer 'gc' (Conv2d, groups=2)" in message
    assert "a name in `target_modules` selects is an error" in message
    assert "exclude_modules=['gc'] to LoRA (recipe key lora.exclude_modules)" in message


# ---------------------------------------------------------------------- the stack
def test_pruning_and_qat_stack_on_grouped_convs_and_export_exactly(tmp_path):
    pruning = MagnitudePruning(0.5, end_step=2)
    qat = QuantizationAwareTraining("int8", granularity="channel", start_step=2)
    model, skipped = fit(pruning, qat, CompressedExport(tmp_path / "out"))
    assert skipped == []
    for name in CONVS:
        q = quantized_weights(model)[name]
        assert torch.equal(q.dequantize(), model.get_submodule(name).weight.detach())
        assert int((q.codes == 0).sum()) >= q.codes.numel() // 2  # pruned weights stay exactly zero
    loads_with_the_same_numbers(model, tmp_path / "out")


class BuiltInConfigureModel(GroupedNet):
    """Layers that exist only from ``configure_model`` on (after the stack check)."""

    def __init__(self) -> None:
        pl.LightningModule.__init__(self)

    def configure_model(self):
        if not hasattr(self, "gc"):
            built = GroupedNet()
            self.stem, self.dw, self.gc, self.head = built.stem, built.dw, built.gc, built.head


def test_lora_on_layers_built_in_configure_model_decides_them_when_they_exist():
    lora = LoRA(r=2, target_modules=[nn.Conv2d])
    pl.seed_everything(0, verbose=False)
    model = BuiltInConfigureModel()
    with pytest.warns(IncompatibleLayersSkipped, match=r"LoRA leaves 2 layers without an adapter"):
        make_trainer(callbacks=[lora], max_steps=2).fit(model, loader())
    assert sorted(lora.adapters) == ["stem"] and sorted(lora.skipped_layers) == ["dw", "gc"]
    trainer = make_trainer(callbacks=[LoRA(r=2, target_modules=["dw", "stem"])], max_steps=2)
    with pytest.raises(IncompatibleSettings, match=r"cannot adapt layer 'dw' \(Conv2d, depthwise\)"):
        trainer.fit(BuiltInConfigureModel(), loader())
    assert trainer.global_step == 0
