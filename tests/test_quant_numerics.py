"""Fake-quant numerics against torchao, bit for bit, and the STE gradients."""

import pytest
import torch

from lightning_compress._torchao import import_torchao
from lightning_compress.quant.activations import DynamicTokenQuantizer, StaticRangeObserver
from lightning_compress.quant.fake_quant import (
    CLIP_RATIOS,
    as_matrix,
    choose_qparams,
    choose_qparams_mse,
    dequantize_codes,
    fake_quantize,
    fake_quantize_learned,
    quantize_codes,
)
from lightning_compress.quant.spec import QuantSpec, parse_bits, spec_from_options

qat = import_torchao("torchao.quantization.qat")
primitives = import_torchao("torchao.quantization.quant_primitives")

BITS = [2, 3, 4, 5, 6, 7, 8]
DTYPES = {2: "int2", 3: "int3", 4: "int4", 5: "int5", 6: "int6", 7: "int7", 8: "int8"}


def torch_dtype(bits):
    return torch.int8 if bits == 8 else getattr(torch, DTYPES[bits])


def ours(matrix, spec):
    scale, zero_point = choose_qparams(matrix, spec)
    return fake_quantize(matrix, scale, zero_point, spec)


def sample(rows=16, cols=128, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator) * torch.rand(rows, 1, generator=generator)
    weight[0, :7] = 0.0  # pruned weights
    return weight


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("granularity", ["channel", "group"])
def test_symmetric_weights_equal_torchao_intx_fake_quantizer(bits, granularity):
    weight = sample()
    if granularity == "group":
        spec = QuantSpec(bits, "group", 32)
        config = qat.IntxFakeQuantizeConfig(torch_dtype(bits), group_size=32)
    else:
        spec = QuantSpec(bits, "channel")
        config = qat.IntxFakeQuantizeConfig(torch_dtype(bits), "per_channel")
    expected = qat.IntxFakeQuantizer(config)(weight)
    assert torch.equal(ours(weight, spec), expected)


def torchao_affine(weight, bits, block_size, symmetric):
    mapping = primitives.MappingType.SYMMETRIC if symmetric else primitives.MappingType.ASYMMETRIC
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale, zero_point = primitives.choose_qparams_affine(
        weight, mapping, block_size, torch.int8, qmin, qmax, zero_point_dtype=torch.int32
    )
    return primitives._fake_quantize_affine(weight, block_size, scale, zero_point, torch.int32, qmin, qmax)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_all_granularities_equal_torchao_affine_primitives(bits, granularity, symmetric):
    weight = sample()
    block = {"tensor": tuple(weight.shape), "channel": (1, weight.shape[1]), "group": (1, 32)}[granularity]
    spec = QuantSpec(bits, granularity, 32 if granularity == "group" else None, symmetric)
    assert torch.equal(ours(weight, spec), torchao_affine(weight, bits, block, symmetric))


def test_conv_weight_matches_per_channel_numerics_of_its_2d_view():
    weight = torch.randn(8, 4, 3, 3)
    config = qat.IntxFakeQuantizeConfig(torch.int4, "per_channel")
    expected = qat.IntxFakeQuantizer(config)(weight.reshape(8, -1)).view_as(weight)
    matrix = as_matrix(weight)
    assert torch.equal(ours(matrix, QuantSpec(4, "channel")).view_as(weight), expected)


def test_activation_per_token_equals_torchao():
    x = torch.randn(3, 5, 64) * 3
    config = qat.IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    expected = qat.IntxFakeQuantizer(config)(x)
    quantizer = DynamicTokenQuantizer()
    quantizer.enabled = True
    assert torch.equal(quantizer(x), expected)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_is_on_every_grid(bits, symmetric):
    weight = sample()
    for granularity, group in [("tensor", None), ("channel", None), ("group", 16)]:
        out = ours(weight, QuantSpec(bits, granularity, group, symmetric))
        assert bool((out[weight == 0] == 0).all()), (granularity, bits, symmetric)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_dequantize_to_the_fake_quantized_weight_exactly(bits, symmetric):
    weight = sample()
    spec = QuantSpec(bits, "group", 32, symmetric)
    scale, zero_point = choose_qparams(weight, spec)
    codes = quantize_codes(weight, scale, zero_point, spec)
    assert codes.dtype == torch.int8
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    assert torch.equal(dequantize_codes(codes, scale, zero_point, spec), fake_quantize(weight, scale, zero_point, spec))


def test_ste_passes_gradients_inside_the_range_and_clips_outside():
    spec = QuantSpec(4, "tensor")
    scale = torch.tensor([0.1])
    zero_point = torch.tensor([0], dtype=torch.int32)
    # Grid covers [-0.8, 0.7]; 0.9 and -1.0 lie outside.
    x = torch.tensor([[0.05, -0.33, 0.69, 0.9, -1.0, 0.0]], requires_grad=True)
    fake_quantize(x, scale, zero_point, spec).sum().backward()
    assert x.grad.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0, 1.0]]


def test_ewgs_scales_each_gradient_by_where_its_weight_sits_between_two_codes():
    """Lee et al. 2021: g_x = g_q (1 + delta sign(g_q) (x_n - x_q)), here with the residual in
    code steps, x/s - round(x/s) (the paper's delta is this one times 2^b - 1), by hand."""
    spec = QuantSpec(4, "tensor")
    scale = torch.tensor([0.1])
    zero_point = torch.tensor([0], dtype=torch.int32)
    # x/s: 2.3 (0.3 above its code), 1.8 (0.2 below), -3.4, 0.9 and -1.0 (clipped: the grid is [-0.8, 0.7])
    x = torch.tensor([[0.23, 0.18, -0.34, 0.9, -1.0, 0.23]], requires_grad=True)
    upstream = torch.tensor([[1.0, 1.0, -2.0, 1.0, 1.0, -1.0]])
    out = fake_quantize(x, scale, zero_point, spec, ewgs_delta=0.5)
    assert torch.equal(out, fake_quantize(x.detach(), scale, zero_point, spec))  # the forward is unchanged
    out.backward(upstream)
    # 1 + 0.5 * (+1) * 0.3; 1 + 0.5 * (+1) * (-0.2); -2 * (1 + 0.5 * (-1) * (-0.4)); clipped; clipped;
    # -1 * (1 + 0.5 * (-1) * 0.3)
    expected = torch.tensor([[1.15, 0.9, -2.4, 0.0, 0.0, -0.85]])
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", [QuantSpec(4, "group", 32), QuantSpec(3, "channel", symmetric=False)],
                         ids=lambda s: s.describe())
def test_ewgs_matches_the_formula_on_a_matrix_and_learned_scales_keep_their_lsq_gradient(spec):
    """Every weight against the formula in float64; with learned ranges the weights get the
    same gradient and the scales the gradient they get without EWGS."""
    weight, delta = sample(), 0.2
    scale, zero_point = choose_qparams(weight, spec)
    upstream = torch.randn_like(weight)
    x = weight.clone().requires_grad_(True)
    fake_quantize(x, scale, zero_point, spec, ewgs_delta=delta).backward(upstream)
    width = weight.numel() // scale.numel()
    # The codes as the forward rounds them (float32 x * (1/s)): a weight half a step past the
    # grid's end is clipped or not by that arithmetic.
    steps = (weight.reshape(-1, width) * (1.0 / scale.reshape(-1, 1))).double()
    codes = torch.round(steps) + zero_point.double().reshape(-1, 1)
    inside = ((codes >= spec.qmin) & (codes <= spec.qmax)).reshape(weight.shape)
    residual = (steps - torch.round(steps)).reshape(weight.shape)
    expected = torch.where(inside, upstream.double() * (1 + delta * upstream.double().sign() * residual), 0.0)
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=1e-6)

    grads = {}
    for ewgs in (0.0, delta):
        x = weight.clone().requires_grad_(True)
        learned = torch.nn.Parameter(scale.clone())
        fake_quantize_learned(x, learned, zero_point, spec, ewgs_delta=ewgs).backward(upstream)
        grads[ewgs] = (x.grad, learned.grad)
    torch.testing.assert_close(grads[delta][0].double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(grads[delta][1], grads[0.0][1])


@pytest.mark.parametrize("learned", [False, True], ids=["fixed", "learned"])
def test_ewgs_keeps_a_bf16_weight_in_bf16_for_its_backward_and_computes_as_in_float32(learned):
    """A reviewer measured a float32 copy of every bf16 weight kept until the backward (4
    bytes a weight where the plain STE keeps a 1-byte mask): now the weight itself is kept,
    and the gradient is the float32 computation's, rounded to bf16."""
    from lightning_compress.quant.weights import WeightFakeQuantizer

    spec = QuantSpec(4, "group", 32)
    weight = sample().to(torch.bfloat16)
    upstream = torch.randn(weight.shape, dtype=torch.bfloat16)

    def run(dtype):
        quantizer = WeightFakeQuantizer(spec, learned=learned, ewgs_delta=0.3)
        if learned:
            quantizer.create_parameters(weight)
        quantizer.enabled = True
        x = weight.to(dtype).clone().requires_grad_(True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = quantizer(x)
        out.backward(upstream.to(dtype))
        return out, x.grad, saved

    out, grad, saved = run(torch.bfloat16)
    reference_out, reference_grad, _ = run(torch.float32)
    assert torch.equal(out, reference_out.to(torch.bfloat16))
    assert torch.equal(grad, reference_grad.to(torch.bfloat16))
    weight_sized = [t for t in saved if t.numel() == weight.numel()]
    assert weight_sized and all(t.dtype == torch.bfloat16 for t in weight_sized), [t.dtype for t in weight_sized]


def test_learned_ranges_receive_gradients_and_match_the_fixed_grid_forward():
    weight = sample()
    spec = QuantSpec(4, "group", 32)
    scale, zero_point = choose_qparams(weight, spec)
    learned = torch.nn.Parameter(scale.clone())
    out = fake_quantize_learned(weight, learned, zero_point, spec)
    assert torch.equal(out, fake_quantize(weight, scale, zero_point, spec))
    (out * torch.randn_like(out)).sum().backward()
    assert learned.grad is not None and learned.grad.abs().sum() > 0


@pytest.mark.parametrize("spec", [QuantSpec(4, "group", 32), QuantSpec(3, "channel", symmetric=False),
                                  QuantSpec(2, "group", 16), QuantSpec(8, "tensor")], ids=lambda s: s.describe())
def test_mse_ranges_pick_the_clipping_with_the_least_error(spec):
    weight = sample()
    weight[1, :32] = 0.0  # an all-zero group keeps ratio 1
    weight[2, 5] = 6.0  # an outlier, which clipping trades away
    scale, zero_point, clip = choose_qparams_mse(weight, spec)
    # The ratios reproduce the grid.
    again = choose_qparams(weight, spec, clip=clip)
    assert torch.equal(again[0], scale) and torch.equal(again[1], zero_point)
    # Reference: every ratio for every group, one group at a time; the first of equal errors wins.
    width = weight.numel() // scale.numel()
    groups = weight.reshape(-1, width)
    for g in range(groups.shape[0]):
        errors = []
        for ratio in CLIP_RATIOS:
            one = QuantSpec(spec.bits, "channel", symmetric=spec.symmetric)  # the group as a one-row matrix
            s, z = choose_qparams(groups[g : g + 1], one, clip=torch.tensor([ratio]))
            errors.append(float((fake_quantize(groups[g : g + 1], s, z, one) - groups[g : g + 1]).square().sum()))
        best = min(range(len(errors)), key=lambda i: (errors[i], i))
        assert clip[g] == torch.tensor(CLIP_RATIOS[best]), g
    minmax = choose_qparams(weight, spec)
    error = lambda s, z: (fake_quantize(weight, s, z, spec) - weight).square().sum()  # noqa: E731
    assert error(scale, zero_point) <= error(*minmax)
    if spec.bits <= 4:
        assert error(scale, zero_point) < error(*minmax)  # clipping pays at low bit widths
    if spec.granularity == "group":
        assert clip[weight.shape[1] // width] == 1.0  # the first group of row 1, all zeros


def test_static_observer_minmax_and_moving_average():
    minmax = StaticRangeObserver("minmax")
    average = StaticRangeObserver("moving_average", momentum=0.5)
    for observer in (minmax, average):
        observer.enabled = True
        observer(torch.tensor([-1.0, 2.0]), training=True)
        observer(torch.tensor([-3.0, 1.0]), training=True)
    assert (minmax.low.item(), minmax.high.item()) == (-3.0, 2.0)
    assert (average.low.item(), average.high.item()) == (-2.0, 1.5)
    # Not in training (validation/test/predict): the range does not move.
    minmax(torch.tensor([-10.0, 10.0]), training=False)
    assert (minmax.low.item(), minmax.high.item()) == (-3.0, 2.0)
    minmax.calibrating = False
    minmax(torch.tensor([-10.0, 10.0]), training=True)
    assert (minmax.low.item(), minmax.high.item()) == (-3.0, 2.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=1), "`bits` must be an int from 2 to 8"),
        (dict(bits=9), "`bits` must be an int from 2 to 8"),
        (dict(granularity="row"), "unknown `granularity`"),
        (dict(granularity="group"), "`group_size` must be an int >= 2"),
        (dict(granularity="channel", group_size=32), "only applies to granularity='group'"),
        (dict(symmetric="yes"), "`symmetric` must be True or False"),
    ],
)
def test_bad_specs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(**kwargs)


def test_parse_bits_and_overrides():
    assert parse_bits("weights", "int4") == 4 and parse_bits("weights", 3) == 3
    with pytest.raises(ValueError, match="`weights` must be 'int2'..'int8'"):
        parse_bits("weights", "fp8")
    base = QuantSpec(4, "group", 32)
    assert spec_from_options("o", {"bits": 8}, base) == QuantSpec(8, "group", 32)
    assert spec_from_options("o", {"granularity": "channel"}, base) == QuantSpec(4, "channel")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bitz'\]"):
        spec_from_options("o", {"bitz": 8}, base)
