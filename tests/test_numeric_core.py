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
from lightning_compress.quant.spec import QuantSpec
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
