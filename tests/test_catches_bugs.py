"""Tests whose expected values come from outside the code under test.

Each expected value here is a formula written in the test (LSQ's scale gradient by
autograd on a plain-torch reference, soft-target KL from softmax by hand, mean-magnitude
channel scores, an independent per-token activation quantizer from torchao), a number
worked out by hand, or an invariant; and each check the package performs (the parity
check's weight comparison and its output threshold, the atomic write) gets a negative
test that breaks exactly what it checks.
"""

from __future__ import annotations

import math
import pathlib

import pytest
import torch
from lightning.pytorch import Callback
from torch import nn

from lightning_compress import ParityError, export
from lightning_compress.callbacks.distillation import KnowledgeDistillation
from lightning_compress.core import atomic
from lightning_compress.core.atomic import atomic_write_bytes
from lightning_compress.distill import losses
from lightning_compress.distill.projections import feature_loss
from lightning_compress.formats import export as export_module
from lightning_compress.formats.packed import read_packed
from lightning_compress.formats.parity import ParityReport, check_parity
from lightning_compress.quant.fake_quant import fake_quantize_learned
from lightning_compress.quant.spec import QuantSpec
from lightning_compress.quant.weights import round_to_nearest
from lightning_compress.sparsity.masks import SparsityPattern, global_masks
from tests.conftest import TinyRegressor, make_trainer, tiny_loader


# ====================================================================== LSQ scale gradient
def lsq_reference(matrix, scale, zero_point, qmin, qmax, width):
    """LSQ (Esser et al. 2020) in plain torch: ``x_hat = (clamp(round(x/s + z)) - z) * s``
    with a straight-through round, and the scale's gradient multiplied by
    ``g = 1 / sqrt(width * qmax)`` (the paper's ``1 / sqrt(N_W * Q_P)``, N_W being the
    number of weights sharing the scale) through the paper's ``grad_scale`` trick."""
    g = 1.0 / math.sqrt(width * qmax)
    s = scale * g + (scale - scale * g).detach()  # value: scale; gradient: g
    s = s.view(-1, 1)
    z = zero_point.view(-1, 1).to(matrix.dtype)
    v = matrix.reshape(-1, width) / s + z
    v = v + (torch.round(v) - v).detach()  # straight-through round
    return ((torch.clamp(v, qmin, qmax) - z) * s).view(matrix.shape)


def test_lsq_scale_gradient_by_hand():
    # int4 per tensor: qmin -8, qmax 7, s = 0.1. x/s = [0.4, 2.6, 9, -10].
    # d x_hat / d s = round(x/s) - x/s inside the grid, qmax or qmin where clamped:
    #   [0 - 0.4, 3 - 2.6, 7, -8] = [-0.4, 0.4, 7, -8]
    # Upstream [1, 2, 3, 4]: -0.4 + 0.8 + 21 - 32 = -10.6, times g = 1/sqrt(4 * 7).
    spec = QuantSpec(4, "tensor")
    x = torch.tensor([[0.04, 0.26, 0.9, -1.0]])
    scale = nn.Parameter(torch.tensor([0.1]))
    out = fake_quantize_learned(x, scale, torch.zeros(1, dtype=torch.int32), spec)
    (out * torch.tensor([[1.0, 2.0, 3.0, 4.0]])).sum().backward()
    assert scale.grad.item() == pytest.approx(-10.6 / math.sqrt(28), rel=1e-5)


@pytest.mark.parametrize(
    "spec",
    [QuantSpec(4, "group", 32), QuantSpec(3, "channel", symmetric=False), QuantSpec(8, "tensor"),
     QuantSpec(2, "group", 16, symmetric=False)],
    ids=lambda s: s.describe().replace(" ", "-"),
)
def test_lsq_gradients_equal_autograd_on_a_reference_implementation(spec):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 128, generator=generator)
    width = {"group": spec.group_size, "channel": 128, "tensor": 16 * 128}[spec.granularity]
    groups = weight.reshape(-1, width)
    # A grid written here (not the library's choose_qparams), shrunk so some codes clamp.
    if spec.symmetric:
        scale = 0.8 * groups.abs().amax(1) / ((spec.qmax - spec.qmin) / 2)
        zero_point = torch.zeros(groups.shape[0], dtype=torch.int32)
    else:
        low, high = groups.amin(1).clamp(max=0), groups.amax(1).clamp(min=0)
        scale = 0.8 * (high - low) / (spec.qmax - spec.qmin)
        zero_point = (spec.qmin - torch.round(low / scale)).clamp(spec.qmin, spec.qmax).to(torch.int32)
        assert bool((zero_point != 0).any())
    upstream = torch.randn(weight.shape, generator=generator)

    ours_scale, ref_scale = nn.Parameter(scale.clone()), nn.Parameter(scale.clone())
    ours_w, ref_w = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = fake_quantize_learned(ours_w, ours_scale, zero_point, spec)
    ref = lsq_reference(ref_w, ref_scale, zero_point, spec.qmin, spec.qmax, width)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()

    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_w.grad, ref_w.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_scale.grad, ref_scale.grad, rtol=1e-4, atol=1e-6)
    assert ref_scale.grad.abs().max() > 1e-3  # a gradient that a wrong factor would change


# ====================================================================== distillation
def softmax_rows(rows, temperature):
    out = []
    for row in rows:
        exps = [math.exp(v / temperature) for v in row]
        total = sum(exps)
        out.append([e / total for e in exps])
    return out


def hand_kl(student, teacher, temperature):
    """``T**2 * mean_rows sum_c p_t (log p_t - log p_s)``, p = softmax(logits / T), in
    float64 Python arithmetic."""
    p_s = softmax_rows(student.double().reshape(-1, student.shape[-1]).tolist(), temperature)
    p_t = softmax_rows(teacher.double().reshape(-1, teacher.shape[-1]).tolist(), temperature)
    rows = [sum(t * (math.log(t) - math.log(s)) for s, t in zip(ps, pt)) for ps, pt in zip(p_s, p_t)]
    return temperature**2 * sum(rows) / len(rows)


def hand_agreement(student, teacher):
    s, t = student.reshape(-1, student.shape[-1]).tolist(), teacher.reshape(-1, teacher.shape[-1]).tolist()
    same = [max(range(len(a)), key=a.__getitem__) == max(range(len(b)), key=b.__getitem__) for a, b in zip(s, t)]
    return sum(same) / len(same)


STUDENT = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 1.0]])
TEACHER = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.5, -1.0]])


@pytest.mark.parametrize("temperature", [2.0, 4.0])
def test_kl_carries_temperature_squared_at_t_above_one(temperature):
    got = losses.kl_divergence(STUDENT, TEACHER, temperature).item()
    # hand_kl multiplies by T**2, so a missing (or squared-twice) factor fails here.
    assert got == pytest.approx(hand_kl(STUDENT, TEACHER, temperature), rel=1e-6)
    # Gradient scale: d loss / d student logits = T * (p_s - p_t) / rows, independent of
    # T only through the T**2 factor (Hinton et al. 2015).
    student = STUDENT.clone().requires_grad_()
    losses.kl_divergence(student, TEACHER, temperature).backward()
    p_s = torch.tensor(softmax_rows(STUDENT.double().tolist(), temperature), dtype=torch.float64)
    p_t = torch.tensor(softmax_rows(TEACHER.double().tolist(), temperature), dtype=torch.float64)
    expected = temperature * (p_s - p_t) / STUDENT.shape[0]
    torch.testing.assert_close(student.grad.double(), expected, rtol=1e-5, atol=1e-7)


def test_top1_agreement_by_hand():
    student = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    teacher = torch.tensor([[0.0, 5.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    assert losses.top1_agreement(student, teacher).item() == 0.5 == hand_agreement(student, teacher)
    assert losses.top1_agreement(student[:3], teacher[:3]).item() == pytest.approx(2 / 3)


def test_feature_loss_is_the_plain_mse_of_each_pair():
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    c, d = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    expected = ((a - b) ** 2).sum().item() / a.numel() + ((c - d) ** 2).sum().item() / c.numel()
    assert feature_loss([(a, b), (c, d)], nn.ModuleDict()).item() == pytest.approx(expected, rel=1e-6)


class HandChecker(Callback):
    """Recomputes, before each step, every figure the callback logs and optimizes, by hand:
    ``kd = T**2 KL + feature_weight * MSE(student fc1, teacher fc1)``,
    ``loss = alpha * task + (1 - alpha) * kd`` and the top-1 agreement."""

    def __init__(self, teacher, alpha, temperature, feature_weight):
        self.teacher, self.alpha, self.temperature, self.feature_weight = teacher, alpha, temperature, feature_weight
        self.expected, self.agreements, self.features = None, [], []

    @staticmethod
    def _run(model, x):
        seen = {}
        handle = model.fc1.register_forward_hook(lambda m, i, o: seen.__setitem__("fc1", o.detach().double()))
        try:
            out = model(x).detach().double()
        finally:
            handle.remove()
        return out, seen["fc1"]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y = batch
        with torch.no_grad():
            out, feat_s = self._run(pl_module, x)
            teacher_out, feat_t = self._run(self.teacher, x)
        task = ((out - y.double()) ** 2).mean().item()
        features = ((feat_s - feat_t) ** 2).mean().item()
        kd = hand_kl(out, teacher_out, self.temperature) + self.feature_weight * features
        agreement = hand_agreement(out, teacher_out)
        self.expected = (self.alpha * task + (1 - self.alpha) * kd, kd, agreement)
        self.agreements.append(agreement)
        self.features.append(features)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        total, kd, agreement = self.expected
        logged = trainer.callback_metrics
        assert logged["distill/kd_loss"].item() == pytest.approx(kd, rel=1e-5)
        assert outputs["loss"].item() == pytest.approx(total, rel=1e-5)
        assert logged["distill/top1_agreement"].item() == pytest.approx(agreement, abs=1e-6)


def test_callback_loss_and_logged_figures_equal_the_hand_formulas(seeded):
    torch.manual_seed(3)
    teacher = TinyRegressor()  # same widths: fc1 pairs without a projection
    kd = KnowledgeDistillation(teacher, temperature=4.0, alpha=0.25, features=[("fc1", "fc1")], feature_weight=2.5)
    checker = HandChecker(teacher, 0.25, 4.0, 2.5)
    torch.manual_seed(0)
    make_trainer(max_epochs=1, callbacks=[kd, checker]).fit(TinyRegressor(), tiny_loader(batches=6))
    assert len(checker.agreements) == 6
    assert any(a != 0.5 for a in checker.agreements)  # 1 - x would differ from x
    assert min(checker.features) > 1e-3  # the feature term matters to the total


def test_self_teacher_agrees_fully_on_the_first_step(seeded):
    seen = []

    class First(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(trainer.callback_metrics["distill/top1_agreement"].item())

    kd = KnowledgeDistillation("self", alpha=0.5)
    make_trainer(max_steps=1, callbacks=[kd, First()]).fit(TinyRegressor(), tiny_loader(batches=2))
    assert seen == [1.0]  # the teacher is the student's own starting weights


# ====================================================================== global structured pruning
def _rows(values, shape, seed):
    """A weight whose output channel i has |w| = values[i] everywhere, with random signs."""
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, shape, generator=generator).float() * 2 - 1
    return torch.tensor(values).view(-1, *([1] * (len(shape) - 1))) * signs


@pytest.mark.parametrize("norm", [1, 2])
def test_global_structured_compares_channels_by_mean_magnitude(norm):
    # A Linear with fan-in 2 and a Conv with fan-in 32. Per-weight magnitude, the conv's
    # channels are the smallest (0.5, 0.6 against 1.0, 1.1): mean |w| (and the RMS) rank
    # them lowest. A sum (or an un-normalised L2 norm) would rank the narrow layer's
    # channels lowest instead (2.0, 2.2 against 16, 19.2), only for its small fan-in.
    weights = {"narrow": _rows([1.0, 1.1], (2, 2), 0), "wide": _rows([0.5, 0.6], (2, 4, 8), 1)}
    total = 4 + 64
    # 0.5 of 68 weights = 34: the lowest channel (32 weights) fits, the next one would not.
    masks = global_masks(weights, 0.5, SparsityPattern.parse("structured"), norm=norm)
    assert bool(masks["narrow"].all())
    assert not bool(masks["wide"][0].any()) and bool(masks["wide"][1].all())
    assert int(sum((~m).sum() for m in masks.values())) == 32 == total - 36
    # 0.95 of 68 = 64.6 -> 65: both wide channels (64), not a narrow one as well (66).
    masks = global_masks(weights, 0.95, SparsityPattern.parse("structured"), norm=norm)
    assert bool(masks["narrow"].all()) and not bool(masks["wide"].any())


def zhu_gupta(step, initial, final, start, end, every):
    """Zhu & Gupta (2017), written out: ``s_f + (s_i - s_f) (1 - (t - t0) / (n dt))**3`` on
    the update grid, held between updates; ``None`` before ``start``, ``s_f`` from ``end``."""
    if step < start:
        return None
    if step >= end:
        return final
    t = start + (step - start) // every * every
    return final + (initial - final) * (1 - (t - start) / (end - start)) ** 3


def test_zhu_gupta_formula_on_hand_values():
    # 0.8 (1 - (1 - k/4)**3) for k = 0..4 updates: 0, 0.4625, 0.7, 0.7875, 0.8.
    values = [zhu_gupta(t, 0.0, 0.8, 2, 10, 2) for t in range(0, 13)]
    assert values[:2] == [None, None]
    assert values[2:] == pytest.approx([0.0, 0.0, 0.4625, 0.4625, 0.7, 0.7, 0.7875, 0.7875, 0.8, 0.8, 0.8])


def test_cubic_pruning_follows_zhu_gupta_step_by_step(tmp_path, seeded):
    from lightning.pytorch.loggers import CSVLogger
    import csv

    from lightning_compress import MagnitudePruning

    class Recorder(Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.rows.append((trainer.global_step, {
                n: int((pl_module.get_submodule(n).weight == 0).sum()) for n in ("conv", "fc1", "fc2")}))

    pruning = MagnitudePruning(0.8, start_step=2, end_step=10, update_every=2)  # cubic by default
    recorder = Recorder()
    model = TinyRegressor()
    trainer = make_trainer(max_steps=12, callbacks=[pruning, recorder], logger=CSVLogger(tmp_path), log_every_n_steps=1)
    trainer.fit(model, tiny_loader(batches=12))
    for step, zeros in recorder.rows:
        target = zhu_gupta(step, 0.0, 0.8, 2, 10, 2) or 0.0
        for name, count in zeros.items():
            numel = model.get_submodule(name).weight.numel()
            assert count == round(target * numel), (step, name)
    with open(next(tmp_path.rglob("metrics.csv"))) as handle:
        logged = {int(row["step"]): float(row["pruning/sparsity_scheduled"])
                  for row in csv.DictReader(handle) if row.get("pruning/sparsity_scheduled")}
    assert logged and all(value == pytest.approx(zhu_gupta(step, 0.0, 0.8, 2, 10, 2) or 0.0, abs=1e-7)
                          for step, value in logged.items())
    assert {round(v, 4) for v in logged.values()} >= {0.4625, 0.7, 0.7875, 0.8}


# ====================================================================== parity check
def _exported(tmp_path, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    round_to_nearest(model, QuantSpec(8))
    inputs = [torch.randn(8, 32), torch.randn(4, 32)]
    export(model, tmp_path / "out", inputs=inputs)
    return model, read_packed(tmp_path / "out"), inputs


def test_parity_passes_on_the_packed_model_as_written(tmp_path):
    model, packed, inputs = _exported(tmp_path)
    report = check_parity(model, packed, inputs)
    assert report.passed and report.weights_exact and report.weight_mismatches == []
    assert report.relative_error == 0.0


@pytest.mark.parametrize("with_inputs", [False, True])
def test_parity_fails_on_a_corrupted_quantized_weight(tmp_path, with_inputs):
    model, packed, inputs = _exported(tmp_path)
    codes = packed.layers["2"].weight.codes
    codes[3, 4] = codes[3, 4] + (1 if codes[3, 4] < 127 else -1)  # one code, one step off
    report = check_parity(model, packed, inputs if with_inputs else [])
    assert not report.weights_exact and report.weight_mismatches == ["2"]
    assert not report.passed
    assert "weights differ in ['2']" in report.summary()


def test_parity_fails_on_a_corrupted_float_tensor(tmp_path):
    model, packed, _ = _exported(tmp_path)
    packed.tensors["0.bias"][5] += 1e-3
    report = check_parity(model, packed, [])
    assert report.weight_mismatches == ["0.bias"] and not report.weights_exact and not report.passed


def test_export_refuses_files_whose_read_back_weights_differ(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    round_to_nearest(model, QuantSpec(4, "group", 16))
    real = export_module.open_packed

    def corrupted(directory):
        packed = real(directory)
        codes = packed.layers["0"].weight.codes
        codes[0, 0] = 1 if codes[0, 0] != 1 else 2
        return packed

    monkeypatch.setattr(export_module, "open_packed", corrupted)
    with pytest.raises(ParityError, match=r"weights differ in \['0'\]"):
        export(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == [tmp_path / "out.failed-parity"]  # kept aside, never at `out`


def _per_token_int8(x):
    """Independent of the package: torchao's per-token asymmetric int8 fake quantizer."""
    from lightning_compress._torchao import import_torchao

    qat = import_torchao("torchao.quantization.qat")
    config = qat.IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    return qat.IntxFakeQuantizer(config)(x)


def test_parity_output_threshold_decides_pass_or_fail(tmp_path):
    model, packed, inputs = _exported(tmp_path)
    # The stored metadata says layer 0 quantizes its input (dynamic int8) though the
    # model never did: the weights all match, the exact-path outputs do not.
    packed.layers["0"].activations = "int8_dynamic"
    with torch.no_grad():
        reference = torch.cat([model(x).flatten() for x in inputs]).double()
        expected_out = torch.cat([model[2](model[1](model[0](_per_token_int8(x)))).flatten() for x in inputs]).double()
    expected = float((reference - expected_out).norm() / reference.norm())
    assert 1e-4 < expected < 1e-1

    report = check_parity(model, packed, inputs, backend="dequantize")
    assert report.weights_exact and report.sqnr_db is None
    assert report.relative_error == pytest.approx(expected, rel=1e-3)
    assert not report.passed and report.max_relative_error == 1e-5  # the default threshold
    assert "relative error" in report.summary() and "worst layers: 0" in report.summary()

    loose = check_parity(model, packed, inputs, backend="dequantize", max_relative_error=2 * expected)
    assert loose.passed and loose.max_relative_error == 2 * expected
    tight = check_parity(model, packed, inputs, backend="dequantize", max_relative_error=expected / 2)
    assert not tight.passed and tight.max_relative_error == expected / 2


@pytest.mark.parametrize(
    "relative_error, sqnr, weights_exact, passed",
    [
        (None, None, True, True),
        (1e-5, None, True, True),  # at the threshold
        (1.01e-5, None, True, False),  # past it
        (0.0, 35.0, True, True),
        (0.0, 34.9, True, False),
        (0.0, 50.0, False, False),
    ],
)
def test_parity_report_passes_only_within_every_threshold(relative_error, sqnr, weights_exact, passed):
    report = ParityReport(weights_exact=weights_exact, weight_mismatches=[] if weights_exact else ["x"],
                          relative_error=relative_error, sqnr_db=sqnr, fast_layers=[])
    assert report.passed is passed


# ====================================================================== atomic writes
def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old contents")
    real = pathlib.Path.write_bytes

    def dies_halfway(self, data):
        real(self, data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(pathlib.Path, "write_bytes", dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new contents, half of which get written")
    monkeypatch.undo()
    assert target.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_the_new_file_arrives_by_rename_not_by_writing_the_target(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    renames = []
    real = atomic.os.replace

    def spy(src, dst, *args, **kwargs):
        renames.append((pathlib.Path(src).name, pathlib.Path(dst).name, pathlib.Path(src).read_bytes()))
        assert target.read_bytes() == b"old"  # untouched until the rename
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "replace", spy)
    atomic_write_bytes(target, b"new")
    assert len(renames) == 1 and renames[0][0].startswith(".f.bin.tmp-") and renames[0][1:] == ("f.bin", b"new")
    assert target.read_bytes() == b"new"
