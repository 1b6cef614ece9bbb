"""``onnx_activations="int8"``: the export's ONNX file rounds its integer layers'
activations to int8 in onnxruntime, and is held to ``min_sqnr_db`` (a real Trainer, real
onnxruntime, real files)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnxruntime  # noqa: F401  (a dev dependency: a missing one fails, never skips)
import pytest
import torch
from torch import nn

from lightning_compress import CompressedExport, ParityError, QuantizationAwareTraining, export
from lightning_compress.formats.config import ExportConfig
from lightning_compress.formats.onnx import run_onnx
from lightning_compress.formats.packed import METADATA_FILE
from lightning_compress.quant.spec import QuantSpec
from lightning_compress.quant.weights import round_to_nearest
from tests.conftest import TinyRegressor, make_trainer, tiny_loader


def _mlp(spec: QuantSpec) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval()
    round_to_nearest(model, spec)
    return model


def _sqnr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2)
                               / np.sum((reference.astype(np.float64) - actual) ** 2)))


def _ops(path) -> dict:
    graph = onnx.load(str(path)).graph
    return {node.op_type: [a.i for a in node.attribute if a.name == "accuracy_level"] for node in graph.node}


@pytest.mark.parametrize("spec, op", [(QuantSpec(4, "group", 32), "MatMulNBits"), (QuantSpec(8), "MatMulInteger")],
                         ids=["int4", "int8"])
def test_the_file_rounds_activations_and_is_held_to_the_sqnr_threshold(tmp_path, spec, op):
    """The file's integer layers take int8 activations (int4: accuracy_level=4; int8:
    MatMulInteger), its outputs are within min_sqnr_db of the fake-quant model (computed
    here from onnxruntime's outputs), and compression.json and the report say so."""
    model = _mlp(spec)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    report = export(model, tmp_path / "out", inputs=[x], formats=["safetensors", "onnx"], onnx_activations="int8",
                    min_sqnr_db=25)
    meta = json.loads((tmp_path / "out" / METADATA_FILE).read_text())["onnx"]
    assert meta["int8_activations"] is True and set(meta["layers"].values()) == {op}
    ops = _ops(tmp_path / "out" / "model.onnx")
    assert op in ops and (op != "MatMulNBits" or ops[op] == [4])
    with torch.no_grad():
        reference = model(x).numpy()
    (got,) = run_onnx(tmp_path / "out" / "model.onnx", (x,))
    measured = _sqnr_db(reference, got)
    assert 25 <= measured < 80  # rounded, so not exact; close
    assert meta["sqnr_db"] == pytest.approx(measured, abs=0.01)
    assert meta["relative_error"] > 1e-5
    assert any("int8 activations" in note for note in report.notes)


def test_a_file_under_the_threshold_fails_and_keeps_the_result(tmp_path):
    """The same file held to 90 dB: ParityError naming the SQNR, nothing at out_dir, the
    packed files and model.onnx kept in the failed-parity folder."""
    model = _mlp(QuantSpec(4, "group", 32))
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ParityError, match=r"model.onnx in onnxruntime differs .* \(SQNR [0-9.]+ dB < 90\)") as caught:
        export(model, tmp_path / "out", inputs=[x], formats=["safetensors", "onnx"], onnx_activations="int8",
               min_sqnr_db=90)
    assert not (tmp_path / "out").exists()
    assert (caught.value.directory / "model.onnx").exists() and (caught.value.directory / "model.safetensors").exists()


def test_exact_by_default(tmp_path):
    model = _mlp(QuantSpec(4, "group", 32))
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    export(model, tmp_path / "out", inputs=[x], formats=["safetensors", "onnx"])
    meta = json.loads((tmp_path / "out" / METADATA_FILE).read_text())["onnx"]
    assert meta["int8_activations"] is False and meta["relative_error"] <= 1e-5
    assert _ops(tmp_path / "out" / "model.onnx")["MatMulNBits"] == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(onnx_activations="int4", formats=["safetensors", "onnx"]), r"unknown `onnx_activations` 'int4'; choose one of \('float', 'int8'\)"),
    (dict(onnx_activations="int8"), r"`onnx_activations='int8'` sets how model.onnx computes: add 'onnx' to `formats`"),
])
def test_bad_onnx_activations_are_refused_before_anything_runs(tmp_path, kwargs, message):
    model = _mlp(QuantSpec(8))
    with pytest.raises(ValueError, match=message):
        export(model, tmp_path / "out", inputs=[torch.randn(2, 64)], **kwargs)
    with pytest.raises(ValueError, match=message):
        CompressedExport(tmp_path / "cb", **kwargs)
    with pytest.raises(ValueError, match=message):
        ExportConfig(tmp_path / "config", **kwargs)
    assert not any(tmp_path.iterdir())


def test_the_callback_writes_the_int8_activation_file_after_training(tmp_path, seeded):
    """A real Trainer with int4 QAT and CompressedExport(onnx_activations="int8"): the dry
    export before training and the export after it both run the int8-activation file."""
    model = TinyRegressor()
    export_cb = CompressedExport(tmp_path / "packed", formats=["safetensors", "onnx"], onnx_activations="int8",
                                 min_sqnr_db=20)
    qat = QuantizationAwareTraining("int4", group_size=16, overrides={"conv": {"bits": 8, "granularity": "channel"}})
    make_trainer(callbacks=[qat, export_cb], max_steps=3).fit(model, tiny_loader(), tiny_loader(batches=2, seed=1))
    meta = json.loads((tmp_path / "packed" / METADATA_FILE).read_text())["onnx"]
    assert meta["int8_activations"] is True and set(meta["layers"].values()) == {"MatMulNBits"}
    assert meta["sqnr_db"] >= 20
    assert export_cb.dry_report is not None and any("int8 activations" in n for n in export_cb.dry_report.notes)


def test_a_recipe_sets_it_and_names_a_bad_value(tmp_path):
    from lightning_compress.recipes import BUILTIN_RECIPES_DIR, RecipeError, load_recipe

    base = ["export.dirpath=" + str(tmp_path / "out"), "export.formats=[safetensors,onnx]"]
    recipe = load_recipe(BUILTIN_RECIPES_DIR / "int4_weight_only.yaml", base + ["export.onnx_activations=int8"])
    (export_cb,) = [c for c in recipe.callbacks() if isinstance(c, CompressedExport)]
    assert export_cb.config.onnx_activations == "int8"
    with pytest.raises(RecipeError, match=r"export.onnx_activations: unknown `onnx_activations` 'int9'"):
        load_recipe(BUILTIN_RECIPES_DIR / "int4_weight_only.yaml", base + ["export.onnx_activations=int9"]).callbacks()


def _dynamic_trained(spec: QuantSpec) -> nn.Module:
    from tests.test_numeric_core import _dynamic_int8

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval()
    _dynamic_int8(model)
    if not spec.symmetric:  # asymmetric int8 weights, on the same model
        round_to_nearest(model, spec)
    return model


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_int8_layers_round_each_token_as_training_did(tmp_path, symmetric):
    """A model trained with int8 dynamic activations: model.onnx rounds each token on
    training's grid (its own scale and zero point), so it matches the fake-quant model to
    float rounding, per token whatever else is in the batch (one scale for the whole tensor
    gave 37 dB alone and 9 dB beside a sample 50x louder), with asymmetric weights too;
    the traced fake-quant ops are gone (the per-token nodes are them)."""
    model = _dynamic_trained(QuantSpec(8, symmetric=symmetric))
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    export(model, tmp_path / "out", inputs=[x], formats=["safetensors", "onnx"], onnx_activations="int8")
    path = tmp_path / "out" / "model.onnx"
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("MatMulInteger") == ops.count("ReduceMin") == 2 and "DynamicQuantizeLinear" not in ops
    generator = torch.Generator().manual_seed(2)
    a, loud = torch.randn(4, 64, generator=generator), torch.randn(1, 64, generator=generator) * 50
    with torch.no_grad():
        reference = model(a).numpy()
    alone = run_onnx(path, (a,))[0]
    beside = run_onnx(path, (torch.cat([a, loud]),))[0][:4]
    assert _sqnr_db(reference, alone) > 100 and _sqnr_db(reference, beside) > 100


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_where_uint8_x_int8_saturates_the_weights_are_uint8_and_exact(tmp_path, monkeypatch, symmetric):
    """On a CPU without VNNI onnxruntime's uint8 x int8 kernel adds products in saturating
    int16 (12 dB SQNR on this file here): the export then writes the codes and zero
    points shifted by 128 as uint8, and the file computes what training did on any CPU."""
    from lightning_compress.formats.onnx import layouts

    monkeypatch.setattr(layouts, "uint8_int8_matmul_exact", lambda: False)
    model = _dynamic_trained(QuantSpec(8, symmetric=symmetric))
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    export(model, tmp_path / "out", inputs=[x], formats=["safetensors", "onnx"], onnx_activations="int8")
    graph = onnx.load(str(tmp_path / "out" / "model.onnx")).graph
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    codes = {name: array for name, array in weights.items() if name.endswith(".weight_int8")}
    points = {name: array for name, array in weights.items() if name.endswith(".weight_zero_point")}
    assert len(codes) == len(points) == 2 and all(a.dtype == np.uint8 for a in [*codes.values(), *points.values()])
    # full-range codes: 255 * (q + 128) pairs are what overflows int16 without VNNI
    assert max(int(a.max()) for a in codes.values()) > 200 and min(int(a.min()) for a in codes.values()) < 55
    with torch.no_grad():
        reference = model(x).numpy()
    assert _sqnr_db(reference, run_onnx(tmp_path / "out" / "model.onnx", (x,))[0]) > 100


def test_the_onnxruntime_probe_says_whether_uint8_x_int8_sums_exactly():
    """The probe's answer is what onnxruntime computes on this CPU for int8 weights: a
    random full-range product, compared with integers summed in numpy."""
    from onnx import TensorProto, helper, numpy_helper

    from lightning_compress.formats.onnx.layouts import uint8_int8_matmul_exact

    rng = np.random.default_rng(0)
    weight = rng.integers(-128, 128, (256, 64)).astype(np.int8)
    inputs = rng.integers(200, 256, (8, 256)).astype(np.uint8)
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.UINT8, [8, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [8, 64])],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    got = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": inputs})[0]
    uint8_int8_matmul_exact.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exact = uint8_int8_matmul_exact()
    assert exact == np.array_equal(got, inputs.astype(np.int64) @ weight.astype(np.int64))
    # where it switches the layout, it says so once (the file is slower on a VNNI server)
    said = [w for w in caught if "saturates on this CPU (no VNNI): model.onnx gets uint8" in str(w.message)]
    assert len(said) == (0 if exact else 1)


def test_a_weight_only_int8_layer_rounds_its_tokens_per_token(tmp_path):
    """Weight-only int8: each token rounded to 8 bits on its own grid (what load_packed's
    int8 GEMM does), the same outputs alone or beside a loud sample."""
    model = _mlp(QuantSpec(8))
    export(model, tmp_path / "out", inputs=[torch.randn(16, 64)], formats=["safetensors", "onnx"],
           onnx_activations="int8")
    path = tmp_path / "out" / "model.onnx"
    generator = torch.Generator().manual_seed(2)
    a, loud = torch.randn(4, 64, generator=generator), torch.randn(1, 64, generator=generator) * 50
    alone, beside = run_onnx(path, (a,))[0], run_onnx(path, (torch.cat([a, loud]),))[0][:4]
    assert np.array_equal(alone, beside)
    with torch.no_grad():
        assert 30 < _sqnr_db(model(a).numpy(), alone) < 80


def test_a_sequence_model_rounds_each_position(tmp_path):
    """[batch, sequence, features]: a token is each position's feature vector (the last
    axis), as in training; the fake-quant model's numbers to float rounding."""
    model = _dynamic_trained(QuantSpec(8))
    sequence = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(3))
    export(model, tmp_path / "out", inputs=[sequence], formats=["safetensors", "onnx"], onnx_activations="int8")
    other = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(4)) * 3
    with torch.no_grad():
        assert _sqnr_db(model(other).numpy(), run_onnx(tmp_path / "out" / "model.onnx", (other,))[0]) > 100


def test_the_dry_export_warns_when_the_rounded_file_misses_and_the_export_refuses(tmp_path, seeded):
    """Before training, model.onnx's SQNR with rounded activations depends on weights not
    trained yet: a warning that says so, and training runs; the export at the end holds it
    to min_sqnr_db and keeps the result (ParityError naming the fix)."""
    model = TinyRegressor()
    export_cb = CompressedExport(tmp_path / "packed", formats=["safetensors", "onnx"], onnx_activations="int8",
                                 min_sqnr_db=150)
    qat = QuantizationAwareTraining("int4", group_size=16, overrides={"conv": {"bits": 8, "granularity": "channel"}})
    trainer = make_trainer(callbacks=[qat, export_cb], max_steps=2)
    with pytest.warns(UserWarning, match=r"dry export before training: model.onnx .* \(SQNR [0-9.]+ dB < 150\);"
                                         r" lower min_sqnr_db, or export with onnx_activations='float'.*"
                                         r"model.onnx's SQNR depends on the trained weights"):
        with pytest.raises(Exception, match="onnx_activations='float'"):
            trainer.fit(model, tiny_loader(), tiny_loader(batches=2, seed=1))
    assert trainer.global_step == 2  # it trained
    assert not (tmp_path / "packed").exists() and (tmp_path / "packed.failed-parity" / "model.safetensors").exists()


def test_a_file_where_no_layer_takes_int8_activations_is_said(tmp_path):
    """int3 layers (exported to ONNX in float), or layers trained with static int8
    activations (kept as trained, QDQ): a warning, and the report does not claim them."""
    message = "onnx_activations='int8' changes nothing here: no layer of model.onnx takes int8 activations"
    with pytest.warns(UserWarning, match=message):
        report = export(_mlp(QuantSpec(3)), tmp_path / "int3", inputs=[torch.randn(4, 64)],
                        formats=["safetensors", "onnx"], onnx_activations="int8")
    assert not any("int8 activations" in note for note in report.notes)
    assert json.loads((tmp_path / "int3" / METADATA_FILE).read_text())["onnx"]["int8_activations"] is False


def test_static_int8_activations_keep_their_calibrated_range(tmp_path, seeded):
    """A model trained with static int8 activations: its layers stay QDQ with the traced
    static fake quantization (the per-token grid is not theirs), the file matches the
    model to float rounding, and the export says onnx_activations changed nothing."""
    model = TinyRegressor()
    qat = QuantizationAwareTraining("int8", activations="int8_static", start_step=0, calibration_steps=2,
                                    exclude=["conv"])
    export_cb = CompressedExport(tmp_path / "packed", formats=["safetensors", "onnx"], onnx_activations="int8",
                                 backend="dequantize")
    with pytest.warns(UserWarning, match="onnx_activations='int8' changes nothing here"):
        make_trainer(callbacks=[qat, export_cb], max_steps=4).fit(model, tiny_loader(), tiny_loader(batches=2, seed=1))
    meta = json.loads((tmp_path / "packed" / METADATA_FILE).read_text())["onnx"]
    assert set(meta["layers"].values()) == {"QDQ"} and meta["int8_activations"] is False
    assert meta["relative_error"] <= 1e-5


def test_integer_valued_tokens_a_nan_token_and_a_layer_called_twice(tmp_path):
    """Three ways the per-token nodes went wrong in onnxruntime: its optimizer turned
    Mul(x, 1/s) into x/s, which moved codes of integer-valued tokens (values on midpoints:
    44.6 dB); a NaN vanished in ReduceMin/Max and the uint8 cast (a finite row); a Linear
    called twice on 3-D inputs reached its second MatMul through an Identity the rewrite
    skipped (a float MatMul on unrounded activations: 49.5 dB)."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(33, 33), nn.Linear(33, 7)

        def forward(self, x):
            return self.b(self.a(torch.relu(self.a(x))))

    model = _dynamic_trained(QuantSpec(8))
    twice = Twice()
    from tests.test_numeric_core import _dynamic_int8

    _dynamic_int8(twice).eval()
    export(model, tmp_path / "mlp", inputs=[torch.randn(8, 64)], formats=["safetensors", "onnx"],
           onnx_activations="int8")
    export(twice, tmp_path / "twice", inputs=[torch.randn(2, 6, 33)], formats=["safetensors", "onnx"],
           onnx_activations="int8")
    integers = torch.randint(-5, 6, (8, 64), generator=torch.Generator().manual_seed(1)).float()
    with torch.no_grad():
        assert _sqnr_db(model(integers).numpy(), run_onnx(tmp_path / "mlp" / "model.onnx", (integers,))[0]) > 100
        poisoned = torch.randn(5, 64)
        poisoned[1, 5], poisoned[3, 2], poisoned[4, 9] = float("nan"), float("inf"), -float("inf")
        poisoned[2] *= 1e36  # finite: the sums times its scale alone overflowed float32 (inf)
        got, expected = run_onnx(tmp_path / "mlp" / "model.onnx", (poisoned,))[0], model(poisoned).numpy()
        assert np.isnan(got[[1, 3, 4]]).all() and np.isfinite(got[[0, 2]]).all()
        assert np.array_equal(np.isnan(got), np.isnan(expected))  # as the fake-quant model
        assert _sqnr_db(expected[2], got[2]) > 100
        sequence = torch.randn(2, 6, 33, generator=torch.Generator().manual_seed(2))
        assert _sqnr_db(twice(sequence).numpy(), run_onnx(tmp_path / "twice" / "model.onnx", (sequence,))[0]) > 100
    ops = [node.op_type for node in onnx.load(str(tmp_path / "twice" / "model.onnx")).graph.node]
    assert ops.count("MatMulInteger") == 3 and "MatMul" not in ops


def test_int8_activations_on_a_float64_model_are_refused_before_anything_is_packed(tmp_path):
    """Training's grid is float32: a float64 model's export with onnx_activations='int8'
    is an option that does not fit (the layer named, the way out given), refused before
    packing; it had been a failed check of packed files, kept in a folder load_packed refuses."""
    from lightning_compress import ExportError

    model = _dynamic_trained(QuantSpec(8)).double()
    with pytest.raises(ExportError, match=r"layer '.*' is float64: .*model\.float\(\).*onnx_activations='float'"):
        export(model, tmp_path / "out", inputs=[torch.randn(4, 64, dtype=torch.float64)],
               formats=["safetensors", "onnx"], onnx_activations="int8")
    assert list(tmp_path.iterdir()) == []
