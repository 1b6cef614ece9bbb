"""One token (batch 1) on the int8 GEMM: scale and zero point as Python numbers, and
fbgemm's quantize-and-multiply, against training's rounding and float64 products computed
here; near code midpoints, where fbgemm may round to the other neighbour."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress import export, load_packed
from lightning_compress.formats import int8_gemm
from lightning_compress.formats.int8_gemm import Int8Gemm, one_token_gemm_available
from lightning_compress.quant.activations import (PER_TOKEN, single_token_codes, single_token_on_grid,
                                                  single_token_qparams, token_codes)
from lightning_compress.quant.fake_quant import choose_qparams, fake_quantize
from tests.test_int8_gemm import _db, _training_rounding
from tests.test_numeric_core import _dynamic_int8
from tests.conftest import needs_int8_gemm


def _rows(width: int) -> list[torch.Tensor]:
    """Tokens that reach every branch: mixed signs, all positive, all negative, all zero,
    subnormal values (the scale's floor), one huge outlier, ties at .5 of the grid."""
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(width, generator=generator), torch.rand(width, generator=generator) + 1,
            -torch.rand(width, generator=generator) - 1, torch.zeros(width), torch.full((width,), 1e-41),
            torch.randn(width, generator=generator) * 1e-3,
            torch.cat([torch.tensor([3e4]), torch.randn(width - 1, generator=generator)]),
            torch.arange(width, dtype=torch.float32) / 2 - 10]


def _near_boundaries(width: int, seed: int) -> torch.Tensor:
    """One token whose values sit within a float32 step of the middle between two codes,
    where ``round(x * (1 / s))`` and a rounding after adding the zero point disagree."""
    generator = torch.Generator().manual_seed(seed)
    ends = torch.tensor([[-100.0, 155.0]]) * 0.0371  # the token's range: its scale is about 0.0371
    scale, _ = single_token_qparams(ends)
    middles = (torch.randint(-99, 99, (width,), generator=generator).float() + 0.5) * scale
    steps = torch.randint(-1, 2, (width,), generator=generator).float()
    x = torch.nextafter(middles, middles + steps)
    x[:2] = ends
    return x.view(1, width)


@pytest.mark.parametrize("width", [64, 263])
def test_one_tokens_numbers_are_trainings_bit_for_bit(width):
    """Scale, zero point and codes against choose_qparams + fake_quantize, one token at a
    time, on every branch and near code midpoints, at a width that is not a multiple of
    the vector length."""
    tokens = [row.view(1, width) for row in _rows(width)] + [_near_boundaries(width, seed) for seed in range(20)]
    for x in tokens:
        scale, shift = single_token_qparams(x)
        expected_scale, expected_zero = choose_qparams(x, PER_TOKEN)
        assert (scale, shift) == (float(expected_scale), int(expected_zero) - PER_TOKEN.qmin)
        codes = single_token_codes(x, scale, shift)
        assert torch.equal(codes, token_codes(x)[0])
        trained = fake_quantize(x, expected_scale, expected_zero, PER_TOKEN)
        assert torch.equal((codes.float() - shift) * scale, trained)
        # What fbgemm is handed: values whose codes, rounded again, are training's.
        assert torch.equal(single_token_codes(single_token_on_grid(x, scale, shift), scale, shift), codes)
    assert single_token_qparams(torch.tensor([[1.0, float("nan")]])) is None
    assert single_token_qparams(torch.tensor([[3e38, -3e38]])) is None  # the range overflows


def _gemm_and_float64(zero_points: bool, width: int = 263):
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (48, width), generator=generator, dtype=torch.int8)
    scale = torch.rand(48, 1, generator=generator) * 0.01 + 1e-3
    zero = torch.randint(-20, 20, (48, 1), generator=generator).float() if zero_points else torch.zeros(48, 1)
    bias = torch.randn(48, generator=generator)
    weight = (codes.double() - zero.double()) * scale.double()
    return Int8Gemm(codes, scale, zero), weight, bias


def _integer_valued(seed: int) -> torch.Tensor:
    """A token of small integers (counts, ids, rounded features): its odd values sit
    exactly on code midpoints (-5..5 is a range of 10: 25.5 steps a unit)."""
    return torch.randint(-5, 6, (1, 263), generator=torch.Generator().manual_seed(seed)).float()


def _fbgemm_codes(x: torch.Tensor, trained_codes: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes one token gets on fbgemm, read through an identity weight, and training's."""
    scale, shift = single_token_qparams(x)
    width = x.shape[1]
    identity = Int8Gemm(torch.eye(width, dtype=torch.int8), torch.ones(width, 1), torch.zeros(width, 1), trained_codes)
    got = torch.round(identity(x).double() / scale) + shift
    assert identity._one_token_weight is not None  # fbgemm ran
    return got, single_token_codes(x, scale, shift).double()


@needs_int8_gemm
def test_a_layer_trained_with_dynamic_activations_gets_trainings_codes_at_midpoints_too():
    """fbgemm adds the zero point before it rounds: on tokens whose values sit on code
    midpoints (integer-valued features, a symmetric range's minimum, values a float32 step
    from a midpoint) a weight-only layer's codes move by one there, and only there (as
    close to the value); a layer trained with int8 dynamic activations hands fbgemm
    training's fake-quantized values and gets training's codes back, every one."""
    assert one_token_gemm_available() is None
    symmetric = torch.randn(1, 263, generator=torch.Generator().manual_seed(4)) * 1e-2
    symmetric[0, 0], symmetric[0, 1] = 50.0, -50.0  # the minimum is -127.5 steps from zero
    tokens = [_near_boundaries(263, seed) for seed in range(10)] + [_integer_valued(s) for s in range(5)] + [symmetric]
    moved = 0
    for x in tokens:
        got, trained = _fbgemm_codes(x, trained_codes=True)
        assert torch.equal(got, trained)
        got, trained = _fbgemm_codes(x, trained_codes=False)
        steps = x.double() / single_token_qparams(x)[0]
        at_midpoint = (steps - steps.floor() - 0.5).abs() < 1e-5
        assert (got - trained).abs().max() <= 1 and not ((got != trained) & ~at_midpoint).any()
        moved += int((got != trained).sum())
    assert moved > 263  # what the grid step is for: hundreds of codes would move
    got, trained = _fbgemm_codes(torch.randn(1, 263, generator=torch.Generator().manual_seed(9)), trained_codes=False)
    assert torch.equal(got, trained)  # ordinary values: the same codes either way


@pytest.mark.parametrize("zero_points", [False, True], ids=["symmetric", "asymmetric"])
@needs_int8_gemm
def test_one_token_equals_float64_on_training_codes(zero_points):
    """fbgemm (symmetric weights) and the batched oneDNN path (asymmetric weights) on one
    token, 1-D, 2-D and 3-D, with the bias, on every branch, near midpoints and on
    integer values: training's codes times the weight in float64, to float32 rounding."""
    gemm, weight, bias = _gemm_and_float64(zero_points)
    tokens = [row.view(1, -1) for row in _rows(263)] + [_near_boundaries(263, seed) for seed in range(5)]
    for x in tokens + [_integer_valued(seed) for seed in range(3)]:
        expected = _training_rounding(x).double() @ weight.T + bias.double()
        got = gemm(x, bias)
        assert got.shape == (1, 48) and _db(expected, got) > 120
        assert torch.equal(gemm(x.view(1, 1, -1), bias), got.view(1, 1, 48))
        assert torch.equal(gemm(x.view(-1), bias), got.view(48))
    assert (gemm._one_token_weight is None) == zero_points


@needs_int8_gemm
def test_a_token_of_a_tiny_range_keeps_float32_precision():
    """Values around 1e-37: token scale x weight scale falls below float32's normal numbers,
    where fbgemm's requantization lost bits (3.6e-5 relative error, 89 dB): the token runs
    the batched path, which applies the scales one at a time."""
    gemm, weight, _ = _gemm_and_float64(False)
    for magnitude in (1e-30, 1e-37):
        x = torch.randn(1, 263, generator=torch.Generator().manual_seed(5)) * magnitude
        expected = _training_rounding(x).double() @ weight.T
        assert _db(expected, gemm(x)) > 120


@needs_int8_gemm
def test_a_token_of_a_huge_range_runs_the_batched_path():
    """Values past ~1e32 (a scale past 2**100): fbgemm's float32 requantization lost about
    1% at 1.6e38, so the token runs the batched path, which keeps training's numbers (at
    1e37 too, where the asymmetric one-token path it replaced overflowed to inf)."""
    gemm, weight, bias = _gemm_and_float64(False)
    x = torch.randn(1, 263, generator=torch.Generator().manual_seed(3)) * 1e36
    x[0, 0], x[0, 1] = 1e37, -1e37
    expected = _training_rounding(x).double() @ weight.T + bias.double()
    got = gemm(x, bias)
    assert torch.isfinite(got).all() and _db(expected, got) > 100
    assert gemm._one_token_weight is None  # fbgemm was not asked


@needs_int8_gemm
def test_a_changed_bias_is_packed_again():
    """fbgemm packs the bias with the weight: a bias changed in place, or another bias
    tensor, gives the new sums."""
    gemm, weight, bias = _gemm_and_float64(False)
    x = torch.randn(1, 263, generator=torch.Generator().manual_seed(1))
    rounded = _training_rounding(x).double() @ weight.T
    assert _db(rounded + bias.double(), gemm(x, bias)) > 120
    bias.add_(5.0)
    assert _db(rounded + bias.double(), gemm(x, bias)) > 120
    assert _db(rounded, gemm(x)) > 120


@pytest.mark.parametrize("fault", ["rounding", "saturation", "missing"])
@needs_int8_gemm
def test_the_probe_refuses_fbgemm_where_it_is_not_exact_and_onednn_runs(monkeypatch, fault):
    """Emulated: fbgemm rounding every value a code up, saturating u8 x s8 pairs, or no
    fbgemm at all: the probe says why, and one token runs oneDNN's path (training's codes,
    near midpoints too)."""
    real = int8_gemm._one_token_gemm

    def faulty(x, scale, zero, packed):
        if fault == "missing":
            raise RuntimeError("Didn't find engine for operation quantized::linear_prepack")
        if fault == "rounding":  # every value a code up
            return real(x + scale, scale, zero, packed)
        return real(x, scale, zero, packed).clamp(max=255.0 * 127 * 63)  # all-255 x all-127 comes out short

    monkeypatch.setattr(int8_gemm, "_one_token_gemm", faulty)
    one_token_gemm_available.cache_clear()
    try:
        reason = one_token_gemm_available()
        assert reason == {"rounding": "fbgemm's input rounding is not training's",
                          "saturation": "the CPU's u8 x s8 products saturate (no VNNI)",
                          "missing": "RuntimeError: Didn't find engine for operation quantized::linear_prepack"}[fault]
        gemm, weight, bias = _gemm_and_float64(False)
        x = _near_boundaries(263, 0)
        assert _db(_training_rounding(x).double() @ weight.T + bias.double(), gemm(x, bias)) > 120
        assert gemm._one_token_weight is None
    finally:
        one_token_gemm_available.cache_clear()


@needs_int8_gemm
def test_a_loaded_model_decodes_one_token_at_a_time_as_it_trained(tmp_path):
    """A packed model trained with int8 dynamic activations, fed one token at a time (as a
    decoder generates): each row is the fake-quant model's and the batched call's to float
    rounding; a state dict loaded later packs fbgemm's weight again."""
    def mlp(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(40, 96), nn.GELU(), nn.Linear(96, 24)).eval()

    model = _dynamic_int8(mlp(0))
    export(model, tmp_path / "out", inputs=[torch.randn(8, 40)])
    loaded = load_packed(tmp_path / "out", mlp(1))
    assert set(loaded.packed_kernels.values()) == {"fbgemm"}
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(2)) * 3
    with torch.no_grad():
        batched = loaded(x)
        for token in range(6):
            one = loaded(x[token:token + 1])
            assert _db(model(x[token:token + 1]), one) > 110
            assert _db(batched[token:token + 1], one) > 110
        assert loaded[0]._fbgemm._one_token_weight is not None
        other = _dynamic_int8(mlp(3))
        export(other, tmp_path / "other", inputs=[torch.randn(8, 40)])
        loaded.load_state_dict(load_packed(tmp_path / "other", mlp(1)).state_dict())  # other codes and biases
        assert _db(other(x[:1]), loaded(x[:1])) > 110


@needs_int8_gemm
def test_an_inference_mode_bias_is_added_apart_and_follows_its_changes():
    """An inference tensor has no version counter: its bias is added after the GEMM, so an
    in-place change inside inference mode shows, and going back to a packed bias works."""
    gemm, weight, bias = _gemm_and_float64(False)
    x = torch.randn(1, 263, generator=torch.Generator().manual_seed(1))
    rounded = _training_rounding(x).double() @ weight.T
    assert _db(rounded + bias.double(), gemm(x, bias)) > 120  # packed with the bias
    with torch.inference_mode():
        frozen = bias.clone()
        assert _db(rounded + frozen.double(), gemm(x, frozen)) > 120
        frozen.add_(3.0)
        assert _db(rounded + frozen.double(), gemm(x, frozen)) > 120
    assert _db(rounded + bias.double(), gemm(x, bias)) > 120


@needs_int8_gemm
def test_a_bias_whose_data_is_replaced_or_that_asks_for_a_gradient():
    """``bias.data = ...`` (as Module.half()/.float() do) keeps the object and its version:
    the one-token path sees the new values; a bias that requires a gradient is added
    apart, so one token's output carries its gradient."""
    gemm, weight, bias = _gemm_and_float64(False)
    x = torch.randn(1, 263, generator=torch.Generator().manual_seed(1))
    rounded = _training_rounding(x).double() @ weight.T
    parameter = nn.Parameter(bias.clone(), requires_grad=False)
    assert _db(rounded + parameter.double(), gemm(x, parameter)) > 120
    parameter.data = torch.zeros(48)
    assert _db(rounded, gemm(x, parameter)) > 120
    parameter.requires_grad_(True)
    out = gemm(x, parameter)
    out.sum().backward()
    assert torch.equal(parameter.grad, torch.ones(48)) and _db(rounded, out.detach()) > 120
    with torch.no_grad():  # no gradient asked: packed again, with it
        assert _db(rounded, gemm(x, parameter)) > 120 and gemm._one_token_bias is parameter


@needs_int8_gemm
def test_concurrent_first_tokens_put_the_quantized_engine_back():
    """fbgemm's weight is packed with PyTorch's quantized engine switched to it: threads
    packing at once each put back what the user had (7 of 20 runs left it switched)."""
    import threading

    before = torch.backends.quantized.engine
    for _ in range(10):
        gemms = [_gemm_and_float64(False)[0] for _ in range(4)]
        x = torch.randn(1, 263)
        threads = [threading.Thread(target=gemm, args=(x,)) for gemm in gemms]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert torch.backends.quantized.engine == before
        assert all(gemm._one_token_weight is not None for gemm in gemms)
