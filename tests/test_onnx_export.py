"""ONNX export with integer weights: numerics against the PyTorch fake-quant model, graph
layout, packing bytes, sizes and errors."""

import numpy as np
import pytest
import torch
from torch import nn

import onnx
import onnxruntime  # noqa: F401  (a dev dependency: a missing one fails, never skips)

from onnx import numpy_helper

from lightning_compress.formats.errors import UnexportableModel
from lightning_compress.formats.onnx import io as onnx_io
from lightning_compress.formats.onnx import (
    export_onnx,
    pack_int4,
    pack_int4_zero_points,
    run_onnx,
)
from lightning_compress.quant.fake_quant import QuantizedWeight
from lightning_compress.quant.spec import QuantSpec
from lightning_compress.quant.weights import quantized_weights, round_to_nearest

INT4_G32 = QuantSpec(bits=4, granularity="group", group_size=32)
INT4_G32_ASYM = QuantSpec(bits=4, granularity="group", group_size=32, symmetric=False)
INT4_CHANNEL = QuantSpec(bits=4, granularity="channel")
INT8_CHANNEL = QuantSpec(bits=8, granularity="channel")


class MLP(nn.Module):
    def __init__(self, features=64, hidden=128, classes=10):
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class SequenceModel(nn.Module):
    """Linear on ``[batch, seq, features]``: the exporter emits MatMul + Add, not Gemm."""

    def __init__(self, features=64, hidden=96, out=32):
        super().__init__()
        self.proj = nn.Linear(features, hidden)
        self.head = nn.Linear(hidden, out)

    def forward(self, x):
        return self.head(torch.nn.functional.gelu(self.proj(x)))


def quantize(model, spec):
    round_to_nearest(model, spec)
    return quantized_weights(model)


def rel_err(reference, actual):
    return float(np.linalg.norm(reference - actual) / np.linalg.norm(reference))


def sqnr_db(reference, actual):
    return float(10 * np.log10(np.sum(reference**2) / np.sum((reference - actual) ** 2)))


def torch_out(model, x):
    with torch.no_grad():
        return model(x).numpy()


def graph_of(path):
    return onnx.load(str(path)).graph


def float_initializer_sizes(graph):
    return {
        numpy_helper.to_array(init).size
        for init in graph.initializer
        if numpy_helper.to_array(init).dtype.kind == "f"
    }


CASES = [
    pytest.param(MLP, (64,), id="mlp"),
    pytest.param(SequenceModel, (7, 64), id="seq3d"),
]


@pytest.mark.parametrize("make_model, feature_shape", CASES)
@pytest.mark.parametrize("spec", [INT4_G32, INT4_G32_ASYM, INT4_CHANNEL], ids=lambda s: s.describe())
def test_int4_matches_fake_quant_model(tmp_path, make_model, feature_shape, spec):
    torch.manual_seed(0)
    model = make_model()
    quantized = quantize(model, spec)
    path = tmp_path / "model.onnx"
    report = export_onnx(model, (torch.randn(2, *feature_shape),), path, quantized)

    assert report.layers == {name: "MatMulNBits" for name in quantized}
    graph = graph_of(path)
    assert [n.op_type for n in graph.node].count("MatMulNBits") == len(quantized)
    # The weights are stored as packed uint8 only: no float tensor of a weight's size is left.
    weight_sizes = {q.codes.numel() for q in quantized.values()}
    assert not weight_sizes & float_initializer_sizes(graph)
    has_zero_points = any("zero_points" in i.name for i in graph.initializer)
    assert has_zero_points == (not spec.symmetric)

    for batch in (1, 128):
        x = torch.randn(batch, *feature_shape)
        (out,) = run_onnx(path, (x,))
        assert out.shape == (batch, *feature_shape[:-1], torch_out(model, x).shape[-1])
        assert rel_err(torch_out(model, x), out) <= 1e-5


def test_int4_file_is_much_smaller_than_float(tmp_path):
    torch.manual_seed(0)
    model = MLP(256, 256, 256)
    quantized = quantize(model, INT4_G32)
    report = export_onnx(model, (torch.randn(2, 256),), tmp_path / "m.onnx", quantized)
    weights = sum(q.codes.numel() for q in quantized.values())
    assert report.float_file_bytes >= 4 * weights  # the float export really holds float32
    assert report.file_bytes == (tmp_path / "m.onnx").stat().st_size
    # 4 bits + a float32 scale per 32 weights = 0.625 bytes/weight vs 4 (plus float biases).
    assert report.ratio < 0.3, report


@pytest.mark.parametrize("make_model, feature_shape", CASES)
def test_int8_qdq_matches_fake_quant_model(tmp_path, make_model, feature_shape):
    torch.manual_seed(0)
    model = make_model()
    quantized = quantize(model, INT8_CHANNEL)
    path = tmp_path / "model.onnx"
    report = export_onnx(model, (torch.randn(2, *feature_shape),), path, quantized)

    assert set(report.layers.values()) == {"QDQ"}
    graph = graph_of(path)
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    dequantize = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert len(dequantize) == len(quantized)
    for node in dequantize:
        codes = initializers[node.input[0]]
        assert codes.dtype == np.int8
        # MatMul's weight is [in, out]: one scale per output column.
        assert [a.i for a in node.attribute if a.name == "axis"] == [1]
        assert initializers[node.input[1]].shape == (codes.shape[1],)
    for name, q in quantized.items():
        assert np.array_equal(initializers[f"{name}.weight_int8"], q.codes.numpy().T)
    assert not {q.codes.numel() for q in quantized.values()} & float_initializer_sizes(graph)

    for batch in (1, 128):
        x = torch.randn(batch, *feature_shape)
        (out,) = run_onnx(path, (x,))
        assert rel_err(torch_out(model, x), out) <= 1e-5


def test_int8_asymmetric_per_tensor_qdq(tmp_path):
    torch.manual_seed(0)
    model = MLP()
    quantized = quantize(model, QuantSpec(bits=8, granularity="tensor", symmetric=False))
    path = tmp_path / "model.onnx"
    export_onnx(model, (torch.randn(2, 64),), path, quantized)
    x = torch.randn(32, 64)
    assert rel_err(torch_out(model, x), run_onnx(path, (x,))[0]) <= 1e-5


@pytest.mark.parametrize("make_model, feature_shape", CASES)
def test_int8_dynamic_activations(tmp_path, make_model, feature_shape):
    torch.manual_seed(0)
    model = make_model()
    quantized = quantize(model, INT8_CHANNEL)
    path = tmp_path / "model.onnx"
    report = export_onnx(model, (torch.randn(2, *feature_shape),), path, quantized, dynamic_int8_activations=True)

    assert set(report.layers.values()) == {"MatMulInteger"}
    ops = [n.op_type for n in graph_of(path).node]
    # Per token (ReduceMin/ReduceMax over the last axis), not DynamicQuantizeLinear's one scale a tensor.
    assert ops.count("MatMulInteger") == ops.count("ReduceMin") == len(quantized)
    assert "DynamicQuantizeLinear" not in ops
    for batch in (1, 128):
        x = torch.randn(batch, *feature_shape)
        (out,) = run_onnx(path, (x,))
        assert sqnr_db(torch_out(model, x), out) >= 35


@pytest.mark.parametrize("spec", [INT4_G32, INT4_G32_ASYM], ids=["symmetric", "asymmetric"])
def test_int4_with_dynamic_int8_activations_asks_onnxruntime_for_int8_dot_products(tmp_path, spec):
    """``dynamic_int8_activations=True`` writes int4 layers' MatMulNBits with
    ``accuracy_level=4``: onnxruntime then rounds the activations to int8, so the output
    is no longer exact but close (a weight-only export stays exact and leaves it unset)."""
    torch.manual_seed(0)
    model = MLP()
    quantized = quantize(model, spec)
    exact, fast = tmp_path / "exact.onnx", tmp_path / "fast.onnx"
    export_onnx(model, (torch.randn(2, 64),), exact, quantized)
    report = export_onnx(model, (torch.randn(2, 64),), fast, quantized, dynamic_int8_activations=True)
    assert set(report.layers.values()) == {"MatMulNBits"}

    def accuracy_levels(path):
        return [next((a.i for a in node.attribute if a.name == "accuracy_level"), None)
                for node in graph_of(path).node if node.op_type == "MatMulNBits"]

    assert accuracy_levels(exact) == [None] * len(quantized)
    assert accuracy_levels(fast) == [4] * len(quantized)
    x = torch.randn(64, 64)
    reference = torch_out(model, x)
    assert rel_err(reference, run_onnx(exact, (x,))[0]) <= 1e-5
    (out,) = run_onnx(fast, (x,))
    assert rel_err(reference, out) > 1e-4  # the activations were rounded
    assert sqnr_db(reference, out) >= 30


def test_matmulnbits_packing_golden(tmp_path):
    codes = torch.arange(-8, 8, dtype=torch.int8).reshape(1, 16)  # N=1, K=16
    expected = [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]  # q+8, low nibble first
    packed = pack_int4(codes.numpy(), block_size=16)
    assert packed.dtype == np.uint8 and packed.shape == (1, 1, 8)
    assert packed.reshape(-1).tolist() == expected
    # Two rows of three blocks: each row padded to whole bytes, z+8 low nibble first.
    zero_points = np.array([[-8, 7, 0], [1, -1, 3]])
    assert pack_int4_zero_points(zero_points).tolist() == [0xF0, 0x08, 0x79, 0x0B]
    # K=20 with a block of 32: the tail is padded with code 0 (stored 8).
    assert pack_int4(np.zeros((1, 20), np.int8), 32).reshape(-1).tolist() == [0x88] * 16

    # The same codes through the export and onnxruntime: y = x @ (codes * 0.5)^T.
    spec = QuantSpec(bits=4, granularity="group", group_size=16)
    q = QuantizedWeight(
        codes=codes,
        scale=torch.tensor([[0.5]]),
        zero_point=torch.zeros(1, 1, dtype=torch.int32),
        spec=spec,
        shape=(1, 16),
    )
    layer = nn.Linear(16, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(q.dequantize())
    model = nn.Sequential(layer)
    path = tmp_path / "golden.onnx"
    export_onnx(model, (torch.randn(2, 16),), path, {"0": q})
    initializers = {i.name: numpy_helper.to_array(i) for i in graph_of(path).initializer}
    assert initializers["0.weight_q4"].reshape(-1).tolist() == expected
    assert initializers["0.weight_scales"].tolist() == [0.5]
    node = next(n for n in graph_of(path).node if n.op_type == "MatMulNBits")
    attrs = {a.name: a.i for a in node.attribute}
    assert attrs == {"K": 16, "N": 1, "bits": 4, "block_size": 16}
    (out,) = run_onnx(path, (torch.eye(16),))
    assert out.reshape(-1).tolist() == (np.arange(-8, 8) * 0.5).tolist()


def test_plain_float_model_with_dequantized_weights(tmp_path):
    """A model without weight transforms whose weights equal q.dequantize() exports the same."""
    torch.manual_seed(0)
    reference = SequenceModel()
    quantized = quantize(reference, INT4_G32_ASYM)
    plain = SequenceModel()
    plain.load_state_dict(reference.state_dict())
    with torch.no_grad():
        for name, q in quantized.items():
            plain.get_submodule(name).weight.copy_(q.dequantize())
    path = tmp_path / "plain.onnx"
    export_onnx(plain, (torch.randn(2, 5, 64),), path, quantized)
    x = torch.randn(4, 5, 64)
    assert rel_err(torch_out(reference, x), run_onnx(path, (x,))[0]) <= 1e-5


def test_partial_quantization_and_model_unchanged(tmp_path):
    torch.manual_seed(0)
    model = MLP()
    quantized = quantize(model, INT4_G32)
    x = torch.randn(8, 64)
    before = torch_out(model, x)
    path = tmp_path / "model.onnx"
    report = export_onnx(model, (x,), path, {"fc1": quantized["fc1"]})
    assert report.layers == {"fc1": "MatMulNBits"}
    ops = [n.op_type for n in graph_of(path).node]
    assert ops.count("MatMulNBits") == 1 and ops.count("Gemm") == 1  # fc2 stays float
    # fc2's float weight is its fake-quantized one (folded), so the outputs still match.
    assert rel_err(before, run_onnx(path, (x,))[0]) <= 1e-5
    assert np.array_equal(torch_out(model, x), before)  # the model keeps its transforms


def test_overwrite_is_atomic_and_leaves_no_temporaries(tmp_path, monkeypatch):
    import os

    from lightning_compress.core import atomic

    torch.manual_seed(0)
    model = MLP()
    quantized = quantize(model, INT4_CHANNEL)
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old")
    # Atomic: an export that fails before its final rename leaves the old file whole
    # (and the new bytes never touch the target before that rename).
    real_replace = os.replace

    def failing_replace(src, dst, *args, **kwargs):
        assert path.read_bytes() == b"old"
        if os.fspath(dst) == os.fspath(path):
            raise OSError("injected")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="injected"):
        export_onnx(model, (torch.randn(2, 64),), path, quantized)
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]

    export_onnx(model, (torch.randn(2, 64),), path, quantized)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    x = torch.randn(3, 64)
    assert rel_err(torch_out(model, x), run_onnx(path, (x,))[0]) <= 1e-5


def test_external_data_when_over_protobuf_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_io, "_PROTOBUF_LIMIT", 0)
    torch.manual_seed(0)
    model = MLP()
    quantized = quantize(model, INT8_CHANNEL)
    path = tmp_path / "model.onnx"
    report = export_onnx(model, (torch.randn(2, 64),), path, quantized)
    assert report.external_data == tmp_path / "model.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert report.file_bytes == path.stat().st_size + report.external_data.stat().st_size
    x = torch.randn(3, 64)
    assert rel_err(torch_out(model, x), run_onnx(path, (x,))[0]) <= 1e-5


@pytest.mark.parametrize(
    "spec, dynamic, message",
    [
        (QuantSpec(bits=3, granularity="channel"), False, "int3 channel sym"),
        (QuantSpec(bits=4, granularity="group", group_size=8), False, "int4 g8"),
        (QuantSpec(bits=8, granularity="group", group_size=32), False, "int8 g32"),
        (QuantSpec(bits=8, granularity="group", group_size=32), True, "int8 g32"),
    ],
)
def test_unsupported_grids_are_refused(tmp_path, spec, dynamic, message):
    torch.manual_seed(0)
    model = MLP()
    quantized = quantize(model, spec)
    path = tmp_path / "model.onnx"
    with pytest.raises(ValueError, match=message) as error:
        export_onnx(model, (torch.randn(2, 64),), path, quantized, dynamic_int8_activations=dynamic)
    assert "'fc1'" in str(error.value)
    assert not path.exists()


def test_unknown_layer_is_refused(tmp_path):
    torch.manual_seed(0)
    model = MLP()
    quantized = quantize(model, INT4_G32)
    quantized["encoder.fc9"] = quantized["fc1"]
    with pytest.raises(ValueError, match=r"encoder\.fc9"):
        export_onnx(model, (torch.randn(2, 64),), tmp_path / "m.onnx", quantized)


def test_weights_from_another_model_are_refused(tmp_path):
    torch.manual_seed(0)
    model, other = MLP(), MLP()
    quantize(model, INT4_G32)
    with pytest.raises(ValueError, match="'fc1'.*differs"):
        export_onnx(model, (torch.randn(2, 64),), tmp_path / "m.onnx", quantize(other, INT4_G32))


def test_non_linear_layer_is_refused(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.Flatten(), nn.Linear(48, 4))
    quantized = quantize(model, INT4_CHANNEL)
    with pytest.raises(ValueError, match="'0' is a Conv1d"):
        export_onnx(model, (torch.randn(2, 4, 8),), tmp_path / "m.onnx", quantized)


def test_layer_not_called_in_forward_is_reported(tmp_path):
    class Unused(MLP):
        def __init__(self):
            super().__init__()
            self.spare = nn.Linear(64, 32)

    torch.manual_seed(0)
    model = Unused()
    quantized = quantize(model, INT4_G32)
    with pytest.raises(ValueError, match=r"uses the weight of layer\(s\) \['spare'\]; was the layer called in forward"):
        export_onnx(model, (torch.randn(2, 64),), tmp_path / "m.onnx", quantized)

    class CalledButUnused(Unused):  # BERT's pooler when only last_hidden_state is used
        def forward(self, x):
            self.spare(x)
            return super().forward(x)

    model = CalledButUnused()
    quantized = quantize(model, INT4_G32)
    with pytest.raises(ValueError, match=r"\['spare'\].*output never reaches the model's outputs is left out of the"
                                         r" trace.*\(`exclude`\), or export the module whose outputs use it"):
        export_onnx(model, (torch.randn(2, 64),), tmp_path / "m.onnx", quantized)


def test_mixed_bit_widths_at_opset_13(tmp_path):
    torch.manual_seed(0)
    model = MLP()
    round_to_nearest(model, INT4_G32_ASYM, targets=["fc1"])
    round_to_nearest(model, INT8_CHANNEL, targets=["fc2"])
    quantized = quantized_weights(model)
    path = tmp_path / "model.onnx"
    report = export_onnx(model, (torch.randn(2, 64),), path, quantized, opset=13)
    assert report.layers == {"fc1": "MatMulNBits", "fc2": "QDQ"}
    assert report.opset == 13
    x = torch.randn(16, 64)
    assert rel_err(torch_out(model, x), run_onnx(path, (x,))[0]) <= 1e-5
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, (x,), tmp_path / "old.onnx", quantized, opset=12)


# ---------------------------------------------------------------- inputs that are not plain tensors
class DictForward(nn.Module):
    """``forward(self, batch)`` takes the dataloader's dict itself, labels included."""

    def __init__(self):
        super().__init__()
        self.image = nn.Linear(32, 16)
        self.meta = nn.Linear(4, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, batch):
        return self.head(torch.relu(self.image(batch["image"]) + self.meta(batch["meta"])))


def test_a_forward_taking_a_dict_exports_and_onnxruntime_matches(tmp_path):
    """PyTorch's exporter reads a trailing dict of its args as keyword arguments (then
    ``forward()`` misses ``batch``, which was reported as a missing onnxscript); the dict
    is one positional input, its tensors graph inputs, the unused labels left out."""
    import json

    from lightning_compress import export
    from lightning_compress.formats.inputs import batch_inputs
    from lightning_compress.formats.packed import METADATA_FILE

    torch.manual_seed(0)
    model = DictForward()
    round_to_nearest(model, INT8_CHANNEL)
    batch = {"image": torch.randn(6, 32), "meta": torch.randn(6, 4), "label": torch.tensor([0, 1, 2, 0, 1, 2])}
    inputs = batch_inputs(batch, model)
    assert inputs == (batch,)
    report = export(model, tmp_path / "out", inputs=[inputs], formats=["safetensors", "onnx"])
    assert json.loads((tmp_path / "out" / METADATA_FILE).read_text())["onnx"]["relative_error"] <= 1e-5
    # A new user's trial: the default session is ~1% off on int8 QDQ layers; the report names the option.
    (note,) = [n for n in report.notes if n.startswith("model.onnx:")]
    assert note.endswith("with session.qdq_matmulnbits_accuracy_level=0, as run_onnx sets it (onnxruntime's default"
                         " session also rounds the inputs of its 3 int8 QDQ layers to int8)")

    graph = graph_of(tmp_path / "out" / "model.onnx")
    assert [i.name for i in graph.input] == ["input_0", "input_1"]  # image, meta; the label is not used
    other = {"image": torch.randn(3, 32), "meta": torch.randn(3, 4)}  # another batch size: dimension 0 is dynamic
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "model.onnx"), options,
                                           providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_0": other["image"].numpy(), "input_1": other["meta"].numpy()})[0]
    with torch.no_grad():
        assert rel_err(model(other).numpy(), got) <= 1e-5
    # run_onnx takes the same positional inputs as the model, dicts included.
    assert rel_err(model(other).detach().numpy(), run_onnx(tmp_path / "out" / "model.onnx", (other,))[0]) <= 1e-5


def test_an_exporter_call_mismatch_is_not_blamed_on_onnxscript(tmp_path, monkeypatch):
    """When the TorchScript exporter's TypeError is a call that does not fit ``forward``,
    the dynamo exporter would fail the same way: the error says what to pass, and does
    not ask for onnxscript."""
    model = MLP()
    quantized = quantize(model, INT8_CHANNEL)

    def exporter(*args, **kwargs):
        raise TypeError("MLP.forward() missing 1 required positional argument: 'x'")

    monkeypatch.setattr(torch.onnx, "export", exporter)
    with pytest.raises(UnexportableModel, match=r"could not call MLP.forward with the example inputs \(TypeError:"
                                                  r" MLP.forward\(\) missing 1 required.*\).*`input_fn`") as caught:
        export_onnx(model, (torch.randn(2, 64),), tmp_path / "m.onnx", quantized)
    assert "onnxscript" not in str(caught.value)


def test_an_op_the_exporter_cannot_convert_is_named_with_the_way_out(tmp_path, monkeypatch):
    """The TorchScript exporter asserts on an op it has no conversion for (a LLaMA with
    grouped-query attention: scaled_dot_product_attention with enable_gqa): an ExportError
    naming it and saying to leave 'onnx' out of `formats`, not a bare AssertionError."""
    model = MLP()
    quantized = quantize(model, INT8_CHANNEL)

    def exporter(*args, **kwargs):
        raise AssertionError("conversion of scaled_dot_product_attention not implemented if enable_gqa is True"
                             "\n<the traced graph>")

    monkeypatch.setattr(torch.onnx, "export", exporter)
    with pytest.raises(UnexportableModel, match=r"cannot export this model: conversion of scaled_dot_product_attention"
                                                  r" not implemented if enable_gqa is True\. Leave 'onnx' out of `formats`"):
        export_onnx(model, (torch.randn(2, 64),), tmp_path / "m.onnx", quantized)


class _KeyValueCache:
    """Not a tensor: what a transformers model with use_cache on returns beside its logits."""


class _ReturnsCache(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc(x), _KeyValueCache()


class _ReturnsCount(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        return {"y": self.fc(x), "steps": 3, "extra": (self.fc(x), None, "tag")}


def test_python_values_among_the_outputs_are_named(tmp_path):
    """A new user's `{"y": t, "n": 3}` reached the tracer's "did not have observable data
    dependence" error; a `None` beside tensors exports."""
    from lightning_compress import ExportError, export

    model = _ReturnsCount().eval()
    round_to_nearest(model, QuantSpec(4, "group", 16))
    with pytest.raises(ExportError, match=r"_ReturnsCount returns Python values: output\['steps'\] \(int\),"
                                          r" output\['extra'\]\[2\] \(str\)\. Return them as tensors"):
        export(model, tmp_path / "out", inputs=[torch.randn(2, 32)], formats=["safetensors", "onnx"])
    assert list(tmp_path.iterdir()) == []  # the packed files are not at fault: none kept as a failed check's


def test_a_model_returning_a_cache_object_gets_the_way_out(tmp_path):
    """The TorchScript tracer refuses an output that is not tensors with a RuntimeError
    about JIT inputs; the export says which type, and how a transformers model drops its cache."""
    from lightning_compress import ExportError, export

    model = _ReturnsCache().eval()
    round_to_nearest(model, QuantSpec(4, "group", 16))
    with pytest.raises(ExportError, match=r"_ReturnsCache returns a _KeyValueCache\. .*use_cache = False"):
        export(model, tmp_path / "out", inputs=[torch.randn(2, 32)], formats=["safetensors", "onnx"])
    assert list(tmp_path.iterdir()) == []
