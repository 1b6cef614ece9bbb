"""The int8 GEMM against float64 arithmetic computed here, and its refusal to run where
the CPU would saturate its u8 x s8 products (emulated, as this CPU has VNNI)."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn

from lightning_compress import export, load_packed
from lightning_compress.formats import int8_gemm
from lightning_compress.formats.int8_gemm import Int8Gemm, int8_gemm_available
from lightning_compress.formats.runtime import kernel_report
from lightning_compress.quant.activations import PER_TOKEN, DynamicTokenQuantizer, token_codes
from lightning_compress.quant.fake_quant import choose_qparams, fake_quantize
from tests.test_numeric_core import _dynamic_int8
from tests.conftest import needs_int8_gemm


def _db(reference: torch.Tensor, other: torch.Tensor) -> float:
    noise = (reference.double() - other.double()).norm()
    return math.inf if noise == 0 else 20 * math.log10(float(reference.double().norm() / noise))


def _training_rounding(x: torch.Tensor) -> torch.Tensor:
    quantizer = DynamicTokenQuantizer()
    quantizer.enabled = True
    return quantizer(x)


def test_token_codes_are_trainings_codes_bit_for_bit():
    """The lean per-token rounding against training's (choose_qparams + fake_quantize) on
    rows that reach every branch: mixed signs, all positive, all negative, all zero,
    subnormal values (the scale's floor), one huge outlier, ties at .5 of the grid."""
    generator = torch.Generator().manual_seed(3)
    rows = [torch.randn(64, generator=generator), torch.rand(64, generator=generator) + 1,
            -torch.rand(64, generator=generator) - 1, torch.zeros(64), torch.full((64,), 1e-41),
            torch.randn(64, generator=generator) * 1e-3, torch.cat([torch.tensor([3e4]), torch.randn(63)]),
            torch.arange(64, dtype=torch.float32) / 2 - 10]
    x = torch.stack(rows)
    codes, shift, scale = token_codes(x)
    expected_scale, expected_zero = choose_qparams(x, PER_TOKEN)
    assert codes.dtype == torch.uint8
    assert torch.equal(scale.view(-1), expected_scale)
    assert torch.equal(shift.view(-1), (expected_zero - PER_TOKEN.qmin).float())
    # codes - shift == (q - qmin) - (z - qmin) == q - z: the integers fake_quantize multiplies by the scale.
    assert torch.equal((codes.float() - shift) * scale, fake_quantize(x, expected_scale, expected_zero, PER_TOKEN))


@pytest.mark.parametrize("zero_points", ["symmetric", "per-channel", "per-tensor"])
@needs_int8_gemm
def test_integer_products_equal_float64_on_training_codes(zero_points):
    """``(x_hat) @ ((codes - zero_point) * scale).T`` in float64, x_hat being training's per-token
    rounding of x: with weight zero points (asymmetric grids) and a per-tensor scale too."""
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(-128, 128, (48, 96), generator=generator, dtype=torch.int8)
    scale = torch.rand(48, 1, generator=generator) * 0.01 + 1e-3
    zero = torch.zeros(48, 1)
    if zero_points == "per-channel":
        zero = torch.randint(-20, 20, (48, 1), generator=generator).float()
    elif zero_points == "per-tensor":
        scale, zero = scale[:1], torch.tensor([[7.0]])
    x = torch.randn(10, 96, generator=generator) * 3 + 1  # an offset: token zero points far from the middle
    x[3] = torch.rand(96, generator=generator)  # all positive: the token's zero point at the grid's end
    weight = ((codes.double() - zero.double()) * scale.double())
    float64 = _training_rounding(x).double() @ weight.T
    got = Int8Gemm(codes, scale, zero)(x)
    assert got.dtype == torch.float32 and got.shape == (10, 48)
    assert _db(float64, got) > 120
    assert Int8Gemm(codes, scale, zero)(x[:0]).shape == (0, 48)


def _saturating_gemm(inputs, prepacked, channel_scale, zeros, input_zero):
    """A CPU without VNNI (``vpmaddubsw``): adjacent u8 x s8 products summed into int16 with
    saturation, then accumulated in int32, the input zero point taken out with the weight's
    row sums (as oneDNN compensates it). ``prepacked`` is the int8 weight here."""
    products = inputs.long()[:, None, :] * prepacked.long()[None, :, :]
    pairs = products.view(*products.shape[:2], -1, 2).sum(-1).clamp(-32768, 32767)
    return (pairs.sum(-1) - input_zero * prepacked.long().sum(1)).float() * channel_scale


@pytest.fixture
def saturating_cpu(monkeypatch):
    monkeypatch.setattr(int8_gemm, "_prepack", lambda codes: codes)
    monkeypatch.setattr(int8_gemm, "_gemm", _saturating_gemm)
    int8_gemm_available.cache_clear()
    yield
    int8_gemm_available.cache_clear()


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def test_a_cpu_that_saturates_runs_the_exact_path_and_says_why(tmp_path, saturating_cpu):
    """The probe finds the saturation, so a model trained for the int8 GEMM loads on the
    exact path with a warning, and asking for the int8 GEMM by name is refused."""
    assert int8_gemm_available() == "the CPU's u8 x s8 products saturate (no VNNI)"
    model = _dynamic_int8(_mlp())
    x = torch.randn(4, 16)
    unavailable = r"int8 GEMM kernel unavailable \(the CPU's u8 x s8 products saturate"
    with pytest.warns(UserWarning, match=unavailable):  # the export's check builds the layers too
        export(model, tmp_path / "out")
    with pytest.warns(UserWarning, match=unavailable):
        loaded = load_packed(tmp_path / "out", _mlp())
    assert set(loaded.packed_kernels.values()) == {"dequantize"}
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(RuntimeError, match="the int8 GEMM kernel is not available .*use backend='auto'"):
        load_packed(tmp_path / "out", _mlp(), backend="fbgemm")


@needs_int8_gemm
def test_a_model_pickled_here_loads_exact_where_the_int8_gemm_would_saturate(tmp_path, monkeypatch):
    """Unpickling probes again (the machine may be another one): where the probe fails the
    layers run exact, say so, and compute the fake-quant model's numbers."""
    model, loaded = _loaded_dynamic(tmp_path)
    pickled = pickle.dumps(loaded)
    monkeypatch.setattr(int8_gemm, "_prepack", lambda codes: codes)
    monkeypatch.setattr(int8_gemm, "_gemm", _saturating_gemm)
    int8_gemm_available.cache_clear()
    try:
        with pytest.warns(UserWarning, match="int8 GEMM kernel unavailable"):
            unpickled = pickle.loads(pickled)
    finally:
        int8_gemm_available.cache_clear()
    # (`packed_kernels` is what load_packed recorded; the layers say what runs now.)
    assert set(kernel_report(unpickled).values()) == {"dequantize"}
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.equal(unpickled(x), model(x))


@needs_int8_gemm
def test_an_input_of_another_width_gets_torchs_shape_error(tmp_path):
    _, loaded = _loaded_dynamic(tmp_path)
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"), torch.no_grad():
        loaded[0](torch.randn(3, 15))


def test_the_probe_passes_where_products_do_not_saturate(monkeypatch):
    """The same emulation without the int16 clamp is exact, and the probe accepts it: the
    probe's failure above is the saturation, not the emulation."""
    def exact(inputs, prepacked, channel_scale, zeros, input_zero):
        return ((inputs.double() - input_zero) @ prepacked.double().T).float() * channel_scale

    monkeypatch.setattr(int8_gemm, "_prepack", lambda codes: codes)
    monkeypatch.setattr(int8_gemm, "_gemm", exact)
    int8_gemm_available.cache_clear()
    try:
        assert int8_gemm_available() is None
    finally:
        int8_gemm_available.cache_clear()


@needs_int8_gemm
def test_tokens_with_outliers_of_both_signs_lose_nothing_to_cancellation(monkeypatch):
    """All-positive weight rows (large row sums) and tokens of small values with one
    outlier of each sign: each token's zero point sits mid-grid, and taking it out in
    float32 after the GEMM cancelled two large terms (measured 54.9 dB against float64
    before the GEMM took it out in integers; the float32 fake-quant model: 126 dB)."""
    generator = torch.Generator().manual_seed(4)
    codes = torch.randint(110, 128, (16, 8192), generator=generator, dtype=torch.int8)
    scale, zero = torch.full((16, 1), 1e-3), torch.zeros(16, 1)
    x = torch.randn(8, 8192, generator=generator) * 1e-2
    x[:, 0], x[:, 1] = 50.0, -50.0
    x[5] = torch.rand(8192, generator=generator)  # and one token whose zero point is the grid's end
    float64 = _training_rounding(x).double() @ ((codes.double() - zero.double()) * scale.double()).T
    got = Int8Gemm(codes, scale, zero)(x)
    for token in range(8):
        assert _db(float64[token], got[token]) > 110, token
    # One token on oneDNN (where fbgemm is not used): its zero point in integers. (fbgemm
    # rounds the -50 outlier, at a code midpoint, to the other neighbour: test_one_token_gemm.)
    monkeypatch.setattr(int8_gemm, "one_token_gemm_available", lambda: "not here")
    assert _db(float64[:1], Int8Gemm(codes, scale, zero)(x[:1])) > 120


def _loaded_dynamic(tmp_path):
    model = _dynamic_int8(_mlp())
    export(model, tmp_path / "out", inputs=[torch.randn(8, 16)])
    loaded = load_packed(tmp_path / "out", _mlp())
    assert set(loaded.packed_kernels.values()) == {"fbgemm"}
    return model, loaded


@needs_int8_gemm
def test_a_loaded_model_copies_and_pickles_with_its_int8_gemm(tmp_path):
    """oneDNN's prepared weight has no storage: deepcopy and pickling prepare it again
    from the copied codes (both raised NotImplementedError), and the copy computes alone."""
    model, loaded = _loaded_dynamic(tmp_path)
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = loaded(x)
        copied = copy.deepcopy(loaded)
        assert copied[0]._fbgemm._arguments[0] is copied[0].packed.codes  # the copy's own codes
        unpickled = pickle.loads(pickle.dumps(loaded))  # what torch.save of a whole model does
        del loaded
        assert torch.equal(copied(x), expected) and torch.equal(unpickled(x), expected)
        assert _db(model(x), expected) > 120


@needs_int8_gemm
def test_a_dtype_round_trip_prepares_the_int8_gemm_from_the_rounded_scales(tmp_path):
    """.half().float() rounds the scale buffers to float16 and back: the int8 GEMM (batch 1
    and batched) computes with those, as the exact path does (it kept the float32 scales:
    3.3e-4 apart); a no-op .to() prepares nothing again."""
    _, loaded = _loaded_dynamic(tmp_path)
    layer = loaded[0]
    before = layer._fbgemm
    assert loaded.to("cpu")[0]._fbgemm is before  # the same buffers: nothing to redo
    loaded.half().float()
    assert layer._fbgemm is not before and layer.kernel == "fbgemm"
    assert not torch.equal(layer.packed.scale, before.scale)  # float16 moved the scales
    for x in (torch.randn(5, 16), torch.randn(1, 16)):
        fast = loaded(x).detach()  # no gradient asked: the int8 GEMM
        exact = loaded(x.clone().requires_grad_()).detach()  # the exact path, on the buffers
        assert _db(exact, fast) > 120


@needs_int8_gemm
def test_tracing_runs_the_exact_path_and_compiling_keeps_the_int8_gemm(tmp_path):
    """torch.jit graphs cannot hold the prepared weight (trace raised "Unsupported value
    kind: Tensor"): traced, the layers compute exactly; torch.compile runs the GEMM eagerly
    (Inductor's lowering raised an AssertionError)."""
    model, loaded = _loaded_dynamic(tmp_path)
    x = torch.randn(5, 16)
    with torch.no_grad():
        exact = load_packed(tmp_path / "out", _mlp(), backend="dequantize")
        traced = torch.jit.trace(loaded, x)
        assert torch.equal(traced(x), exact(x))
        calls = []
        original_call = Int8Gemm.__call__

        def counted(self, *args):
            calls.append(self)
            return original_call(self, *args)

        Int8Gemm.__call__ = counted
        try:
            got = torch.compile(loaded)(x)
        finally:
            Int8Gemm.__call__ = original_call
        assert len(calls) == 2  # both layers ran the int8 GEMM, between compiled parts
        assert torch.allclose(got, loaded(x), rtol=0, atol=1e-6)


@needs_int8_gemm
def test_a_weight_only_attention_out_proj_holds_no_int8_gemm_it_never_runs(tmp_path):
    """PyTorch's attention reads ``out_proj.weight`` itself (``out_proj`` is its
    ``NonDynamicallyQuantizableLinear``): weight-only, those layers stay on the exact path
    and are reported so (Lightning's demo Transformer reported them on the int8 GEMM and
    held its prepared weights), while the feed-forward layers and the head run it."""
    from lightning.pytorch.demos import Transformer

    from lightning_compress.quant.spec import QuantSpec
    from lightning_compress.quant.weights import round_to_nearest

    def demo():
        torch.manual_seed(0)
        return Transformer(vocab_size=50, ninp=32, nhead=2, nhid=64, nlayers=1, dropout=0.0).eval()

    model = demo()
    round_to_nearest(model, QuantSpec(8))
    generator = torch.Generator().manual_seed(0)
    src, tgt = torch.randint(0, 50, (3, 10), generator=generator), torch.randint(0, 50, (3, 10), generator=generator)
    export(model, tmp_path / "out", inputs=[(src, tgt)])
    loaded = load_packed(tmp_path / "out", demo())
    out_projs = [name for name in loaded.packed_kernels if name.endswith("out_proj")]
    assert len(out_projs) == 3 and {loaded.packed_kernels[name] for name in out_projs} == {"dequantize"}
    assert all(loaded.get_submodule(name)._fbgemm is None for name in out_projs)
    assert [name for name, kernel in loaded.packed_kernels.items() if kernel == "fbgemm"] == [
        "transformer.encoder.layers.0.linear1", "transformer.encoder.layers.0.linear2",
        "transformer.decoder.layers.0.linear1", "transformer.decoder.layers.0.linear2", "decoder"]
    calls = []
    original_call = Int8Gemm.__call__

    def counted(self, *args):
        calls.append(self)
        return original_call(self, *args)

    with torch.no_grad():
        Int8Gemm.__call__ = counted
        try:
            # PyTorch's fused encoder path (on by default) would read linear1/2.weight and skip them.
            assert torch.backends.mha.get_fastpath_enabled()
            got = loaded(src, tgt)
        finally:
            Int8Gemm.__call__ = original_call
        assert len(calls) == 5  # each layer reported on the int8 GEMM ran it
        assert _db(model(src, tgt), got) > 40


@needs_int8_gemm
def test_a_token_of_nan_or_overflow_gives_its_own_row_nan_and_leaves_the_others():
    """The fake-quant model's answer: NaN where a token's range is NaN or overflows, the
    other tokens untouched (the batch's zero point came from a NaN: ValueError)."""
    generator = torch.Generator().manual_seed(5)
    codes = torch.randint(-127, 128, (8, 16), generator=generator, dtype=torch.int8)
    gemm = Int8Gemm(codes, torch.rand(8, 1, generator=generator) / 100, torch.zeros(8, 1))
    x = torch.randn(4, 16, generator=generator)
    x[1, 3] = float("nan")
    x[2] = 1e38
    x[2, ::2] = -1e38  # its range overflows to inf
    got = gemm(x)
    weight = codes.double() * gemm.scale.double()[:, None]
    for token in (0, 3):
        assert _db(_training_rounding(x[token:token + 1]).double() @ weight.T, got[token]) > 120
    expected = _training_rounding(x).double() @ weight.T  # NaN rows where the fake-quant model has them
    assert torch.equal(got.isnan(), expected.isnan()) and got[1].isnan().all()
    assert gemm(x[1:2]).isnan().all()  # alone too
