"""CompressedExport under a real Trainer, the transformers load check, and a reader fuzz."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_compress import (
    CompressedExport,
    LoRA,
    MagnitudePruning,
    PackedFormatError,
    QuantizationAwareTraining,
    export,
    load_packed,
    quantized_weights,
)
from lightning_compress.core.validate import ArgumentError
from lightning_compress.formats.packed import METADATA_FILE, WEIGHTS_FILE
from lightning_compress.quant.spec import QuantSpec
from lightning_compress.quant.weights import round_to_nearest
from tests.conftest import FAST_INT8, INT8_GEMM_MISSING, TinyRegressor, make_trainer, tiny_loader


def test_stacked_fit_exports_exactly_what_was_trained(tmp_path, seeded):
    model = TinyRegressor()
    callbacks = [
        MagnitudePruning(final_sparsity=0.75, start_step=0, end_step=6, update_every=2),
        QuantizationAwareTraining("int4", group_size=16, start_step=2, overrides={"conv": {"granularity": "channel"}}),
        CompressedExport(tmp_path / "packed"),
    ]
    trainer = make_trainer(callbacks=callbacks, max_steps=10)
    trainer.fit(model, tiny_loader(), tiny_loader(batches=2, seed=1))
    report = callbacks[-1].report
    assert report.parity.passed and report.parity.weights_exact and report.parity.relative_error == 0.0
    trained = quantized_weights(model)
    loaded = load_packed(tmp_path / "packed", TinyRegressor())
    for name, q in trained.items():
        assert torch.equal(loaded.get_submodule(name).weight, q.dequantize())
        assert int((q.dequantize() == 0).sum()) >= int(0.75 * q.codes.numel())  # pruned stays exactly zero
    x = next(iter(tiny_loader(batches=1, seed=2)))[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    meta = json.loads((tmp_path / "packed" / METADATA_FILE).read_text())
    assert meta["parity"]["passed"] and meta["library_versions"]["torch"] == torch.__version__
    assert {entry["sparsity"] for entry in meta["layers"].values()} == {"bitmask"}


def test_static_int8_activations_load_on_the_exact_path_and_pass_by_default(tmp_path, seeded):
    """fbgemm's dynamic GEMM quantizes each call's range, not the calibrated static one
    (nor its clipping): a 3-layer MLP calibrated for 2 steps failed the default export at
    26 dB. By default such layers now run exact, so the export passes at error 0."""
    class MLP(TinyRegressor):
        def __init__(self):
            super().__init__()
            del self.conv, self.fc1, self.fc2
            self.net = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 8))

        def forward(self, x):
            return self.net(x.flatten(1))

    lightning_model = MLP()
    export_cb = CompressedExport(tmp_path / "packed")
    qat = QuantizationAwareTraining("int8", activations="int8_static", calibration_steps=2)
    make_trainer(callbacks=[qat, export_cb], max_steps=6).fit(lightning_model, tiny_loader())
    parity = export_cb.report.parity
    assert parity.passed and parity.fast_layers == [] and parity.relative_error == 0.0
    loaded = load_packed(tmp_path / "packed", MLP())
    assert set(loaded.packed_kernels.values()) == {"dequantize"}
    x = next(iter(tiny_loader(batches=1, seed=2)))[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), lightning_model.eval()(x))


def test_int8_dynamic_activations_run_on_the_int8_gemm(tmp_path, seeded):
    model = TinyRegressor()
    export_cb = CompressedExport(tmp_path / "packed")
    trainer = make_trainer(callbacks=[QuantizationAwareTraining("int8", activations="int8_dynamic"), export_cb],
                           max_steps=4)
    trainer.fit(model, tiny_loader(), tiny_loader(batches=2, seed=1))
    parity = export_cb.report.parity
    if INT8_GEMM_MISSING is None:
        assert parity.fast_layers == ["fc1", "fc2"] and parity.sqnr_db >= 35
    else:  # this CPU's int8 GEMM saturates: every layer runs exact
        assert parity.fast_layers == [] and parity.sqnr_db is None
    assert parity.relative_error <= 1e-5  # the exact path applies the same activation fake-quant
    loaded = load_packed(tmp_path / "packed", TinyRegressor())
    assert loaded.packed_kernels == {"conv": "dequantize", "fc1": FAST_INT8, "fc2": FAST_INT8}


def test_lora_adapters_are_merged_into_the_export(tmp_path, seeded):
    model = TinyRegressor()
    export_cb = CompressedExport(tmp_path / "packed")
    trainer = make_trainer(
        callbacks=[LoRA(r=4, target_modules=["fc1", "fc2"]), QuantizationAwareTraining("int8"), export_cb],
        max_steps=4,
    )
    trainer.fit(model, tiny_loader(), tiny_loader(batches=2, seed=1))
    assert export_cb.report.parity.passed
    loaded = load_packed(tmp_path / "packed", TinyRegressor(), backend="dequantize")  # exact, to compare bits
    assert not any("lora" in key for key in loaded.state_dict())
    x = next(iter(tiny_loader(batches=1, seed=2)))[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_existing_directory_is_refused_before_training(tmp_path):
    (tmp_path / "packed").mkdir()
    trainer = make_trainer(callbacks=[CompressedExport(tmp_path / "packed")], max_steps=1)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        trainer.fit(TinyRegressor(), tiny_loader())


def test_unknown_submodule_is_refused_before_training(tmp_path):
    trainer = make_trainer(callbacks=[CompressedExport(tmp_path / "packed", module="model")], max_steps=1)
    with pytest.raises(ValueError, match="`module`='model'.*children are"):
        trainer.fit(TinyRegressor(), tiny_loader())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dirpath=""), "`dirpath`"),
        (dict(module=""), "`module`"),
        (dict(overwrite="yes"), "`overwrite`"),
        (dict(parity_batches=0), "`parity_batches`"),
        (dict(input_fn=3), "`input_fn`"),
        (dict(backend="gpu"), "`backend`"),
        (dict(sparse_threshold=2), "`sparse_threshold`"),
        (dict(recipe=[1]), "`recipe`"),
    ],
)
def test_bad_callback_arguments(tmp_path, kwargs, message):
    options = dict(dirpath=tmp_path / "x")
    options.update(kwargs)
    with pytest.raises(ValueError, match=message):
        CompressedExport(**options)


# ---------------------------------------------------------------------- transformers
def _tiny_bert():
    import transformers
    import compressed_tensors  # noqa: F401  (a dev dependency: a missing one fails, never skips)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=32)
    return transformers, transformers.BertModel(config).eval()


@pytest.mark.parametrize(
    "spec",
    [QuantSpec(4, "group", 32), QuantSpec(4, "group", 32, scale_dtype="float16"), QuantSpec(8, "channel"),
     QuantSpec(8, "tensor", symmetric=False), QuantSpec(3, "channel")],
    ids=lambda s: s.describe().replace(" ", "-"),
)
def test_transformers_loads_the_export_with_compressed_tensors(tmp_path, spec, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers, model = _tiny_bert()
    round_to_nearest(model, spec, targets=[nn.Linear])
    ids = torch.randint(0, 100, (2, 10))
    report = export(model, tmp_path / "hf", inputs=[{"input_ids": ids}])
    assert report.compressed_tensors and report.parity.relative_error == 0.0
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["dtype"] == "float32"  # transformers 4.x would otherwise load it in float16
    config = written["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == "pack-quantized"  # weight-only, 8-bit too: what vLLM reads (W8A16)
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        ours = model(input_ids=ids).last_hidden_state
        theirs = loaded(input_ids=ids).last_hidden_state
    assert ((ours - theirs).norm() / ours.norm()).item() <= 1e-5
    query = loaded.encoder.layer[0].attention.self.query.weight
    assert torch.equal(query, model.encoder.layer[0].attention.self.query.weight)


@pytest.mark.parametrize("spec", [QuantSpec(4, "group", 32, symmetric=False), QuantSpec(8, "channel", symmetric=False)],
                         ids=["int4-g32-asym", "int8-channel-asym"])
def test_asymmetric_export_of_a_transformers_model_stays_ours_by_default(tmp_path, spec):
    """Packed zero points (what vLLM reads) do not load in the tested transformers: by
    default no config.json; compressed_tensors=True writes it (tests/test_compressed_tensors_vllm.py)."""
    _, model = _tiny_bert()
    round_to_nearest(model, spec, targets=[nn.Linear])
    report = export(model, tmp_path / "hf")
    assert not report.compressed_tensors and "zero points" in report.notes[0]
    assert "compressed_tensors=True" in report.notes[0]
    assert not (tmp_path / "hf" / "config.json").exists()


# ---------------------------------------------------------------------- fuzz
@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    round_to_nearest(model, QuantSpec(4, "group", 16))
    out = tmp_path_factory.mktemp("fuzz") / "packed"
    export(model, out)
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    which=st.sampled_from([WEIGHTS_FILE, METADATA_FILE]),
    position=st.floats(0, 1),
    mask=st.integers(1, 255),
    truncate=st.booleans(),
)
def test_fuzzed_files_never_load_silently(packed_dir, tmp_path_factory, which, position, mask, truncate):
    work = tmp_path_factory.mktemp("case")
    for name in (WEIGHTS_FILE, METADATA_FILE):
        (work / name).write_bytes((packed_dir / name).read_bytes())
    data = bytearray((work / which).read_bytes())
    index = min(int(position * len(data)), len(data) - 1)
    if truncate:
        data = data[:index]
    else:
        data[index] ^= mask
    (work / which).write_bytes(bytes(data))
    build = lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))  # noqa: E731
    try:
        loaded = load_packed(work, build())
    except PackedFormatError:
        return
    # Only a change JSON ignores (whitespace turned into other whitespace) may load, and
    # then the model must be exactly the exported one.
    assert which == METADATA_FILE and not truncate
    reference = load_packed(packed_dir, build())
    x = torch.randn(3, 16)
    assert torch.equal(loaded(x), reference(x))
    for (key, a), (_, b) in zip(loaded.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), key


def test_onnx_export_runs_in_onnxruntime_with_parity(tmp_path, seeded):
    import onnxruntime  # noqa: F401  (a dev dependency: a missing one fails, never skips)
    model = TinyRegressor()
    export_cb = CompressedExport(tmp_path / "packed", formats=["safetensors", "onnx"])
    trainer = make_trainer(
        callbacks=[QuantizationAwareTraining("int4", group_size=16, overrides={"conv": {"bits": 8, "granularity": "channel"}}), export_cb],
        max_steps=3,
    )
    trainer.fit(model, tiny_loader(), tiny_loader(batches=2, seed=1))
    meta = json.loads((tmp_path / "packed" / METADATA_FILE).read_text())
    assert meta["onnx"]["layers"] == {"fc1": "MatMulNBits", "fc2": "MatMulNBits"}
    assert meta["onnx"]["relative_error"] <= 1e-5
    assert (tmp_path / "packed" / "model.onnx").stat().st_size > 0


def test_onnx_needs_traceable_inputs(tmp_path):
    with pytest.raises(ValueError, match="inputs"):
        export(nn.Linear(4, 4), tmp_path / "x", formats=["safetensors", "onnx"])
    with pytest.raises(ValueError, match="`formats`"):
        CompressedExport(tmp_path / "x", formats=["gguf"])


def test_onnx_export_keeps_trained_activation_quantization(tmp_path, seeded):
    """The ONNX file computes with the static int8 activations QAT trained: the export folds
    the weight stages into constants but keeps the input stages, traced as their
    round/clamp arithmetic (without them the file's relative error was 5.4e-2)."""
    import onnxruntime  # noqa: F401  (a dev dependency: a missing one fails, never skips)
    import onnx

    model = TinyRegressor()
    qat = QuantizationAwareTraining("int8", activations="int8_static", start_step=0, calibration_steps=2, exclude=["conv"])
    # The exact (dequantize) path is what this test is about; the int8 GEMM has its own tests.
    export_cb = CompressedExport(tmp_path / "packed", formats=["safetensors", "onnx"], backend="dequantize")
    make_trainer(callbacks=[qat, export_cb], max_steps=4).fit(model, tiny_loader(), tiny_loader(batches=2, seed=1))
    meta = json.loads((tmp_path / "packed" / METADATA_FILE).read_text())
    assert meta["onnx"]["relative_error"] <= 1e-5
    ops = [node.op_type for node in onnx.load(str(tmp_path / "packed" / "model.onnx")).graph.node]
    # One activation fake quantization (round, then clamp) in front of each of fc1 and fc2.
    assert ops.count("Round") == ops.count("MatMul") == 2, ops


class _Heads(TinyRegressor):
    """An export target (`heads`, a ModuleDict: no forward of its own) whose child computes."""

    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleDict({"cls": nn.Linear(8, 3)})


@pytest.mark.parametrize("options, says, not_says", [
    (dict(module="heads"), r"the submodule 'heads' has no forward, and the export runs the model on a few inputs to"
     r" check the packed copy against it \(parity\): add a forward to ModuleDict; or export a submodule that computes:"
     r" CompressedExport\(module='heads.cls'\).*; or pass parity=False", "training_step"),
    (dict(module="heads", parity=False, formats=["safetensors", "onnx"]), r"inputs to trace the ONNX graph: add a forward", "parity=False"),
])
def test_an_export_target_without_forward_is_named_at_setup(tmp_path, options, says, not_says):
    model = _Heads()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ArgumentError, match=says) as error:
        make_trainer(max_steps=1, callbacks=[CompressedExport(tmp_path / "out", **options)]).fit(model, tiny_loader())
    assert not_says not in str(error.value) and error.value.argument == "module"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not (tmp_path / "out").exists()
    # Without parity or ONNX the export never runs the model: no forward needed.
    make_trainer(max_steps=1, callbacks=[CompressedExport(tmp_path / "plain", module="heads", parity=False)]).fit(
        _Heads(), tiny_loader())
    assert (tmp_path / "plain" / WEIGHTS_FILE).is_file()
