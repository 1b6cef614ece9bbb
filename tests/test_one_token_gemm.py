"""One token (batch 1) on the int8 GEMM: scale and zero point as Python numbers, and
fbgemm's quantize-and-multiply, against training's rounding and float64 products computed
here; near code midpoints, where fbgemm may round to the other neighbour."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_compress import export, load_packed
from lightning_compress.formats import int8_gemm
from lightning_compress.formats.int8_gemm import Int8Gemm, one_token_gemm_available
from lightning_compress.quant.activations import (PER_TOKEN, DynamicTokenQuantizer, single_token_codes,
                                                  single_token_qparams, token_codes)
from lightning_compress.quant.fake_quant import choose_qparams, fake_quantize
from tests.test_numeric_core import _dynamic_int8


def _db(reference: torch.Tensor, other: torch.Tensor) -> float:
    noise = (reference.double() - other.double()).norm()
    return math.inf if noise == 0 else 20 * math.log10(float(reference.double().norm() / noise))


def _training_rounding(x: torch.Tensor) -> torch.Tensor:
    quantizer = DynamicTokenQuantizer()
    quantizer.enabled = True
    return quantizer(x)


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
        assert torch.equal((codes.float() - shift) * scale, fake_quantize(x, expected_scale, expected_zero, PER_TOKEN))
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


def _fbgemm_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fbgemm's codes of one token, read through an identity weight, and training's."""
    scale, shift = single_token_qparams(x)
    identity = Int8Gemm(torch.eye(x.shape[1], dtype=torch.int8), torch.ones(x.shape[1], 1), torch.zeros(x.shape[1], 1))
    got = torch.round(identity(x).double() / scale) + shift
    return got, single_token_codes(x, scale, shift).double()


def test_fbgemm_takes_the_other_neighbour_only_at_a_code_midpoint():
    """Where fbgemm's codes differ from training's, by one, the value lies within float32
    rounding of the midpoint between them (both codes are as close to it); on a token of
    ordinary values they are training's. What it costs a layer at worst, every value of
    the token at a midpoint: 41 to 45 dB from training's products (a fifth of the codes move)."""
    assert one_token_gemm_available() is None
    differed = 0
    for seed in range(10):
        x = _near_boundaries(263, seed)
        got, trained = _fbgemm_codes(x)
        steps = x.double() / single_token_qparams(x)[0]
        at_midpoint = (steps - steps.floor() - 0.5).abs() < 1e-5
        assert (got - trained).abs().max() <= 1 and not ((got != trained) & ~at_midpoint).any()
        differed += int((got != trained).sum())
    assert differed > 0  # the tokens do reach the values where the roundings part
    # A token whose range is symmetric puts its minimum on a midpoint (-127.5 steps): fbgemm
    # moves it a step in, as close to it as training's code.
    x = torch.randn(1, 263, generator=torch.Generator().manual_seed(4)) * 1e-2
    x[0, 0], x[0, 1] = 50.0, -50.0
    got, trained = _fbgemm_codes(x)
    assert (got != trained).nonzero()[:, 1].tolist() == [1] and (got - trained)[0, 1] == 1
    got, trained = _fbgemm_codes(torch.randn(1, 263, generator=torch.Generator().manual_seed(9)))
    assert torch.equal(got, trained)
    gemm, weight, bias = _gemm_and_float64(False)
    for seed in range(10):
        x = _near_boundaries(263, seed)
        assert _db(_training_rounding(x).double() @ weight.T + bias.double(), gemm(x, bias)) > 40


@pytest.mark.parametrize("zero_points", [False, True], ids=["symmetric", "asymmetric"])
def test_one_token_equals_float64_on_training_codes(zero_points):
    """fbgemm (symmetric weights) and oneDNN (asymmetric: fbgemm is not used) on one token,
    2-D and 3-D, with the bias: training's codes times the weight in float64, to float32
    rounding; oneDNN keeps training's codes near midpoints too."""
    gemm, weight, bias = _gemm_and_float64(zero_points)
    tokens = [row.view(1, -1) for row in _rows(263)]
    tokens += [_near_boundaries(263, seed) for seed in range(10)] if zero_points else []
    for x in tokens:
        expected = _training_rounding(x).double() @ weight.T + bias.double()
        got = gemm(x, bias)
        assert got.shape == (1, 48) and _db(expected, got) > 120
        assert torch.equal(gemm(x.view(1, 1, -1), bias), got.view(1, 1, 48))
    assert (gemm._one_token_weight is None) == zero_points


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
