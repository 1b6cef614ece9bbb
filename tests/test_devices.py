"""The paths a model trained on an accelerator takes, on every device this machine has:
the CPU always, and CUDA where there is one (`make test-gpu` runs the whole suite there).

Each test is one that failed on an H200 before its fix: learned ranges computed by
PyTorch's CUDA learnable fake-quant kernel (which the export's bit-for-bit weight check
refused), GGUF blocks read through numpy from CUDA tensors, an ONNX file compared with a
reference computed by cuDNN's TF32 kernels, and a teacher left on the GPU after fit.
"""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_compress import CompressedExport, KnowledgeDistillation, MagnitudePruning, QuantizationAwareTraining
from lightning_compress import load_packed
from lightning_compress.formats.devices import on_the_cpu
from lightning_compress.formats.gguf_blocks import encode
from lightning_compress.formats.packed import METADATA_FILE
from lightning_compress.quant.fake_quant import (
    QuantizedWeight,
    choose_qparams,
    dequantize_codes,
    fake_quantize_learned,
    quantize_codes,
)
from lightning_compress.quant.spec import QuantSpec
from tests.conftest import TinyRegressor, make_trainer, tiny_loader
from tests.test_distillation import WideTeacher

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ACCELERATOR = {"cpu": "cpu", "cuda": "gpu"}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", [QuantSpec(4, "group", 32), QuantSpec(3, "channel", symmetric=False)],
                         ids=lambda s: s.describe().replace(" ", "-"))
def test_learned_ranges_compute_codes_times_scale_bit_for_bit(device, spec):
    """The export packs ``quantize_codes`` and checks ``(codes - z) * s`` against the trained
    weight bit for bit: the learned (LSQ) forward must be that product on every device."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 128, generator=generator)
    scale, zero_point = choose_qparams(weight, spec)
    scale = torch.nn.Parameter(scale.to(device) * 0.8)  # some codes clamp
    out = fake_quantize_learned(weight.to(device), scale, zero_point.to(device), spec)
    codes = quantize_codes(weight.to(device), scale.detach(), zero_point.to(device), spec)
    expected = dequantize_codes(codes.cpu(), scale.detach().cpu(), zero_point, spec)
    assert torch.equal(out.detach().cpu(), expected)
    assert int((codes.cpu() == spec.qmax).sum()) > 0  # the clamp was exercised
    out.sum().backward()
    assert scale.grad is not None and scale.grad.device.type == device and bool(scale.grad.abs().sum() > 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", [QuantSpec(4, "group", 32), QuantSpec(8, "channel"), QuantSpec(8, "tensor", symmetric=False),
                                  QuantSpec(3, "group", 16, symmetric=False)], ids=lambda s: s.describe().replace(" ", "-"))
def test_a_grid_chosen_on_the_device_is_the_grid_chosen_on_the_cpu(device, spec):
    """CUDA divides a tensor by a Python number as a product with its reciprocal (a last-bit
    difference in most scales, and then a whole step for a weight on a rounding boundary):
    the export's and the ONNX check's CPU recomputation must find the trained grid."""
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    scale, zero_point = choose_qparams(weight.to(device), spec)
    reference = weight.reshape(-1, weight.numel() // scale.numel())
    levels = spec.qmax - spec.qmin
    if spec.symmetric:
        expected = reference.abs().amax(1) / (levels / 2)
    else:
        expected = (reference.amax(1).clamp(min=0) - reference.amin(1).clamp(max=0)) / levels
    assert torch.equal(scale.cpu(), expected) and torch.equal(zero_point.cpu(), choose_qparams(weight, spec)[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["Q4_0", "Q8_0", "Q4_1"])
def test_gguf_blocks_of_a_weight_on_the_device_equal_those_of_its_cpu_copy(device, kind):
    bits, symmetric = {"Q4_0": (4, True), "Q8_0": (8, True), "Q4_1": (4, False)}[kind]
    spec = QuantSpec(bits, "group", 32, symmetric=symmetric)
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    scale, zero_point = choose_qparams(weight, spec)
    codes = quantize_codes(weight, scale, zero_point, spec)

    def quantized(on):
        return QuantizedWeight(codes.to(on), scale.reshape(8, -1).to(on), zero_point.reshape(8, -1).to(on), spec,
                               tuple(weight.shape))

    rows = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6])
    on_device, written = encode(quantized(device), kind, rows.to(device))
    on_cpu, written_on_cpu = encode(quantized("cpu"), kind, rows)
    assert written == written_on_cpu and on_device.tobytes() == on_cpu.tobytes()
    if kind != "Q4_1":  # (which may be written as Q5_0)
        # Row 0 of the blocks is weight row 1: its first block's float16 scale leads it.
        assert written == kind and on_device[0, :2].view("<f2")[0] == scale.reshape(8, -1)[1, 0].half().item()


class _DistilledRegressor(TinyRegressor):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)


@pytest.mark.parametrize("device", DEVICES)
def test_a_stacked_run_on_the_device_exports_onnx_and_leaves_the_teacher_beside_the_student(tmp_path, device):
    """Learned int4 ranges, static int8 activations, pruning and distillation trained on
    ``device``: the export's weights are exact, its ONNX file (checked against a CPU
    reference) passes, the loaded model computes the trained one, and after fit the
    teacher is where Lightning leaves the student (the CPU), not holding GPU memory."""
    torch.manual_seed(0)
    teacher = TinyRegressor()
    model = _DistilledRegressor()
    qat = QuantizationAwareTraining("int4", group_size=16, learn_ranges=True, activations="int8_static",
                                    calibration_steps=2, start_step=1, overrides={"conv": {"granularity": "channel"}})
    kd = KnowledgeDistillation(teacher, loss="mse", alpha=0.5)
    export = CompressedExport(tmp_path / "packed", formats=["safetensors", "onnx"], parity_batches=1)
    trainer = make_trainer(accelerator=ACCELERATOR[device], max_steps=6,
                           callbacks=[MagnitudePruning(0.5, schedule="one_shot", start_step=2), qat, kd, export])
    trainer.fit(model, tiny_loader())
    report = export.report
    assert report.parity.passed and report.parity.weights_exact, report.parity.summary()
    onnx = json.loads((tmp_path / "packed" / METADATA_FILE).read_text())["onnx"]
    assert report.parity.relative_error <= 1e-5 and onnx["relative_error"] <= 1e-5
    assert all(p.device.type == "cpu" for p in (*model.parameters(), *teacher.parameters()))
    loaded = load_packed(tmp_path / "packed", TinyRegressor())
    x = tiny_loader(batches=1, seed=3).dataset.tensors[0]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)


def test_on_the_cpu_moves_only_a_whole_model_on_one_accelerator():
    """A model on the CPU, split over devices or partly on the meta device stays where it
    is; one on an accelerator is on the CPU inside the block and back after it, also when
    the block raises."""
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    split = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2, device="meta"))
    for model in (plain, split):
        before = [p.device for p in model.parameters()]
        with on_the_cpu(model) as moved:
            assert not moved and [p.device for p in model.parameters()] == before
    if torch.cuda.is_available():
        model = torch.nn.Sequential(torch.nn.Linear(2, 2)).cuda()
        with pytest.raises(RuntimeError, match="inside"):
            with on_the_cpu(model) as moved:
                assert moved and all(p.device.type == "cpu" for p in model.parameters())
                raise RuntimeError("inside")
        assert all(p.device.type == "cuda" for p in model.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_a_failed_fit_takes_the_teacher_off_the_device(device):
    """Lightning skips ``teardown`` when fit raises; the teacher still leaves the GPU
    (``on_exception``), as Lightning's own teardown moves the student."""

    class Fails(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            raise RuntimeError("a failing step")

    torch.manual_seed(0)
    teacher = WideTeacher()  # fc1 wider than the student's: a projection is trained
    kd = KnowledgeDistillation(teacher, features=[("fc1", "fc1")])
    with pytest.raises(RuntimeError, match="a failing step"):
        make_trainer(accelerator=ACCELERATOR[device], max_steps=2, callbacks=[kd, Fails()]).fit(
            _DistilledRegressor(), tiny_loader())
    assert kd._projections.layers is not None  # the projection was built: the fit got that far
    assert all(p.device.type == "cpu" for p in teacher.parameters())
