"""``onnx_activations="int8"``: the export's ONNX file rounds its integer layers'
activations to int8 in onnxruntime, and is held to ``min_sqnr_db`` (a real Trainer, real
onnxruntime, real files)."""

from __future__ import annotations

import json

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
