"""Unit checks of the numeric core that mutation testing (`make mutation`) found unguarded:
defaults, state round trips and exact copies, each against hand-computed values."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_compress.core.validate import ArgumentError
from lightning_compress.distill.losses import cosine, mse
from lightning_compress.quant.activations import DynamicTokenQuantizer, StaticRangeObserver
from lightning_compress.quant.nf4 import copy_nf4, dequantize_nf4, nf4_deepcopy_memo, to_nf4
from lightning_compress.quant.spec import QuantSpec, spec_from_options
from lightning_compress.quant.weights import WeightFakeQuantizer


# ---------------------------------------------------------------------- activation observers
def test_a_new_observer_is_off_and_passes_inputs_through():
    observer = StaticRangeObserver()
    x = torch.tensor([0.3, -1.7, 2.2])
    assert observer(x, training=True) is x and observer.low is None
    assert observer.table_fields() == {}


def test_the_default_observer_keeps_the_running_min_and_max():
    observer = StaticRangeObserver()
    observer.enabled = True  # calibrating by default
    observer(torch.tensor([-1.0, 2.0]), training=True)
    observer(torch.tensor([-0.5, 4.0]), training=True)
    observer(torch.tensor([-3.0, 1.0]), training=True)
    assert (observer.low.item(), observer.high.item()) == (-3.0, 4.0)  # minmax, not an average
    assert observer.table_fields() == {"activation_bits": 8}


def test_the_moving_average_default_momentum_is_one_percent():
    observer = StaticRangeObserver("moving_average")
    observer.enabled = True
    observer(torch.tensor([-1.0, 1.0]), training=True)
    observer(torch.tensor([-3.0, 5.0]), training=True)
    # low = -1 + 0.01 * (-3 - -1) = -1.02; high = 1 + 0.01 * (5 - 1) = 1.04
    assert observer.low.item() == pytest.approx(-1.02) and observer.high.item() == pytest.approx(1.04)


def test_observer_state_round_trips_and_freezes():
    observer = StaticRangeObserver()
    assert observer.state_dict() == {"low": None, "high": None, "calibrating": True}
    observer.enabled = True
    observer(torch.tensor([-2.0, 6.0]), training=True)
    observer.calibrating = False
    state = observer.state_dict()
    assert (state["low"].item(), state["high"].item(), state["calibrating"]) == (-2.0, 6.0, False)
    restored = StaticRangeObserver()
    restored.enabled = True
    restored.load_state_dict(state)
    assert restored.calibrating is False and (restored.low.item(), restored.high.item()) == (-2.0, 6.0)
    restored(torch.tensor([-50.0, 50.0]), training=True)  # frozen: not observed
    assert (restored.low.item(), restored.high.item()) == (-2.0, 6.0)
    # asymmetric int8 on [-2, 6]: scale 8/255, zero point round(2 / scale) - 128 = -64; the
    # top code 127 stands for (127 + 64) * scale, where 6 and 7 (clamped) land; 0 is exact
    out = restored(torch.tensor([6.0, 7.0, 0.0]), training=False)
    top = (127 + 64) * 8 / 255
    assert torch.allclose(out, torch.tensor([top, top, 0.0]), atol=1e-6)


def test_dynamic_quantizer_reports_its_bits_only_when_on():
    quantizer = DynamicTokenQuantizer()
    assert quantizer.table_fields() == {}
    quantizer.enabled = True
    assert quantizer.table_fields() == {"activation_bits": 8}


# ---------------------------------------------------------------------- NF4 copies
def test_copy_nf4_is_exact_and_independent_for_non_default_blocks():
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    nf4 = to_nf4(weight, block_size=32, scaler_block_size=4)
    copied = copy_nf4(nf4)
    assert torch.equal(dequantize_nf4(copied), dequantize_nf4(nf4))
    assert (copied.block_size, copied.scaler_block_size) == (32, 4)
    assert copied.quantized_data.data_ptr() != nf4.quantized_data.data_ptr()
    copied.quantized_data.zero_()  # a copy, not a view
    assert not torch.equal(dequantize_nf4(copied), dequantize_nf4(nf4))


def test_deepcopy_memo_keeps_each_nf4_parameter_exact():
    layer = torch.nn.Linear(64, 16, bias=False)
    layer.weight = torch.nn.Parameter(to_nf4(layer.weight.detach(), 32, 4), requires_grad=False)
    twin = copy.deepcopy(layer, nf4_deepcopy_memo(layer))
    assert twin.weight is not layer.weight and twin.weight.requires_grad is False
    assert torch.equal(dequantize_nf4(twin.weight), dequantize_nf4(layer.weight))


# ---------------------------------------------------------------------- learned scales
@pytest.mark.parametrize(
    ("spec", "groups"),
    [(QuantSpec(4, "group", 8), 6 * 24 // 8), (QuantSpec(8, "channel"), 6), (QuantSpec(8, "tensor"), 1)],
)
def test_learned_scales_get_one_zero_log_scale_per_group(spec, groups):
    quantizer = WeightFakeQuantizer(spec, learned=True)
    parameter = quantizer.create_parameters(torch.empty(6, 2, 3, 4))  # a conv weight: 6 rows of 24
    assert parameter is quantizer.log_scale and isinstance(parameter, torch.nn.Parameter)
    assert torch.equal(parameter.detach(), torch.zeros(groups))
    assert quantizer.zero_point.dtype == torch.int32 and torch.equal(quantizer.zero_point, torch.zeros(groups, dtype=torch.int32))


# ---------------------------------------------------------------------- specs and losses
def test_replace_keeps_an_explicit_group_size_so_a_wrong_one_is_refused():
    grouped = QuantSpec(4, "group", 32)
    assert grouped.replace(granularity="channel").group_size is None  # dropped when switching away
    with pytest.raises(ArgumentError, match="only applies to granularity='group'"):
        grouped.replace(granularity="channel", group_size=16)


def test_mse_and_cosine_by_hand():
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    teacher = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    assert mse(student, teacher).item() == pytest.approx((1 + 1 + 0 + 1) / 4)
    # rows: orthogonal (1 - 0) and parallel (1 - 1): mean 0.5
    assert cosine(student, teacher).item() == pytest.approx(0.5)


# ---------------------------------------------------------------------- per-layer overrides
def test_overrides_accept_each_documented_option():
    base = QuantSpec(4, "channel")
    assert spec_from_options("o", {"weights": "int8"}, base) == QuantSpec(8, "channel")
    assert spec_from_options("o", {"weights": 3}, base) == QuantSpec(3, "channel")
    assert spec_from_options("o", {"bits": "int2"}, base) == QuantSpec(2, "channel")
    # a group size alone switches to groups; with an explicit granularity it is checked against it
    assert spec_from_options("o", {"group_size": 16}, base) == QuantSpec(4, "group", 16)
    assert spec_from_options("o", {"group_size": 16, "granularity": "group"}, base) == QuantSpec(4, "group", 16)
    assert spec_from_options("o", {"group_size": None}, base) == QuantSpec(4, "channel")
    assert spec_from_options("o", {"symmetric": False}, base) == QuantSpec(4, "channel", symmetric=False)
    assert spec_from_options("o", {"scale_dtype": "float16"}, base) == QuantSpec(4, "channel", scale_dtype="float16")
    assert spec_from_options("o", {}, base) == base


@pytest.mark.parametrize(
    ("options", "argument", "message"),
    [
        ({"bitz": 8}, "o", r"^`o` has unknown option\(s\) \['bitz'\]; allowed: \['bits', 'granularity', 'group_size',"
                            r" 'scale_dtype', 'symmetric', 'weights'\]$"),
        ({"weights": 4, "bits": 4}, "o", r"^`o` gives both `weights` and `bits`; keep one$"),
        ({"weights": "fp8"}, "o.weights", r"^`o.weights` must be 'int2'..'int8'"),
        ({"bits": 9}, "o.bits", r"^`o.bits` must be 'int2'..'int8'"),
        ({"granularity": "channel", "group_size": 16}, "o", r"^`o`: `group_size`=16 only applies to granularity='group'"),
        ({"granularity": "row"}, "o", r"^`o`: unknown `granularity` 'row'"),
        ({"scale_dtype": "float64"}, "o", r"^`o`: unknown `scale_dtype` 'float64'"),
    ],
)
def test_override_errors_name_the_option(options, argument, message):
    with pytest.raises(ArgumentError, match=message) as caught:
        spec_from_options("o", options, QuantSpec(4, "channel"))
    assert caught.value.argument == argument


# ---------------------------------------------------------------------- the static observer in a layer
def test_the_observer_reads_training_from_its_layer():
    layer = torch.nn.Linear(2, 2)
    observer = StaticRangeObserver()
    observer.enabled = True
    observer(torch.tensor([-1.0, 3.0]))  # no layer, no `training`: not observed
    assert observer.low is None
    layer.eval()
    observer(torch.tensor([-1.0, 3.0]), layer)
    assert observer.low is None
    layer.train()
    observer(torch.tensor([-1.0, 3.0]), layer)
    assert (observer.low.item(), observer.high.item()) == (-1.0, 3.0)
    with torch.no_grad():
        observer(torch.tensor([-9.0, 9.0]), layer)  # no gradient (validation): not observed
    assert (observer.low.item(), observer.high.item()) == (-1.0, 3.0)


def test_the_observer_follows_the_input_device_and_keeps_its_dtype():
    observer = StaticRangeObserver()
    observer.enabled = True
    observer(torch.tensor([-2.0, 6.0]), training=True)
    # the meta device stands for "not where the range was restored" (a GPU after a CPU checkpoint)
    out = observer(torch.empty(3, device="meta"), training=False)
    assert out.device.type == "meta"
    assert observer.low.device.type == "meta" and observer.high.device.type == "meta"
    cpu = StaticRangeObserver()
    cpu.enabled = True
    cpu(torch.tensor([-2.0, 6.0]), training=True)
    # scale 8/255, zero point -64: 1.0 is code round(1 * 255 / 8) = 32 -> 32 * 8 / 255
    out = cpu(torch.tensor([1.0, 0.0], dtype=torch.bfloat16), training=False)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.tensor([32 * 8 / 255, 0.0]).to(torch.bfloat16))


# ---------------------------------------------------------------------- learned scales: placement and start
def test_learned_scales_live_on_the_weights_device():
    quantizer = WeightFakeQuantizer(QuantSpec(4, "group", 8), learned=True)
    parameter = quantizer.create_parameters(torch.empty(6, 24, device="meta"))
    assert parameter.device.type == "meta" and quantizer.zero_point.device.type == "meta"


def _reference_sym_scales(rows, bits, ratios=(1.0,)):
    """Per-row symmetric scales by hand: the clipping ratio (of ``ratios``) with the least
    squared round-to-nearest error, the larger ratio on ties."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    chosen = []
    for row in rows:
        best = None
        for ratio in ratios:
            scale = ratio * max(abs(v) for v in row) / ((qmax - qmin) / 2)
            error = sum((min(max(round(v / scale), qmin), qmax) * scale - v) ** 2 for v in row)
            if best is None or error < best[0] - 1e-12:
                best = (error, scale)
        chosen.append(best[1])
    return chosen


@pytest.mark.parametrize("weight_range", ["minmax", "mse"])
def test_learned_scales_start_from_the_weight_range_grid(weight_range):
    # row 0: squared errors 0.151, 0.083, 0.049, 0.092, ... at ratios 1.0, 0.95, 0.9, 0.85, ...:
    # mse clips its range to 0.9 * 2.9; row 1 keeps the full range (equal errors keep the larger)
    rows = [[-1.7, 0.7, 0.9, 0.6, 0.7, 1.0, -0.3, -2.9], [0.75, 0.0, -0.5, 0.25, 0.0, -0.25, 0.5, -0.5]]
    ratios = tuple(1.0 - 0.05 * i for i in range(11)) if weight_range == "mse" else (1.0,)
    expected = torch.tensor(_reference_sym_scales(rows, 4, ratios))
    quantizer = WeightFakeQuantizer(QuantSpec(4, "channel"), learned=True, weight_range=weight_range)
    weight = torch.tensor(rows)
    quantizer.create_parameters(weight)
    before, _ = quantizer.qparams(weight)  # what the first forward will choose, before it runs
    quantizer.enabled = True
    quantizer(weight)
    assert quantizer.initialized
    assert torch.allclose(quantizer.log_scale.detach().exp(), expected, rtol=1e-6)
    assert torch.equal(before, quantizer.log_scale.detach().exp())
    if weight_range == "mse":
        assert expected[0].item() == pytest.approx(0.9 * 2.9 / 7.5)  # clipped to 0.9
    assert torch.equal(quantizer.zero_point, torch.zeros(2, dtype=torch.int32))


def test_learned_asymmetric_scales_start_with_zero_on_the_grid():
    # int4 asymmetric on [-1, 2]: scale 3/15 = 0.2, zero point -8 - round(-1 / 0.2) = -3
    quantizer = WeightFakeQuantizer(QuantSpec(4, "tensor", symmetric=False), learned=True)
    weight = torch.tensor([[-1.0, 2.0], [0.0, 0.45]])
    quantizer.create_parameters(weight)
    quantizer.enabled = True
    out = quantizer(weight)
    assert quantizer.log_scale.detach().exp().item() == pytest.approx(0.2)
    assert quantizer.zero_point.tolist() == [-3]
    assert torch.allclose(out, torch.tensor([[-1.0, 2.0], [0.0, 0.4]]), atol=1e-6)  # 0.45 -> 2 steps


# ---------------------------------------------------------------------- structured channel norms
def test_structured_pruning_ranks_channels_by_the_chosen_norm():
    from lightning_compress.sparsity.masks import SparsityPattern, layer_mask

    # row 0: mean |w| 1, RMS 1; row 1: mean |w| 0.75, RMS 1.5 -> L1 prunes row 1, L2 row 0
    weight = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    structured = SparsityPattern.parse("structured")
    assert layer_mask(weight, 0.5, structured, norm=1)[:, 0].tolist() == [True, False]
    assert layer_mask(weight, 0.5, structured, norm=2)[:, 0].tolist() == [False, True]
