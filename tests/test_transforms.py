import copy
import io

import pytest
import torch
from torch import nn

from lightning_compress.core.transforms import (
    Stage,
    add_weight_transform,
    get_weight_transform,
    raw_weight,
    remove_weight_transform,
    weight_before,
)


class Scale:
    def __init__(self, factor):
        self.factor = factor

    def __call__(self, weight):
        return weight * self.factor


class Shift:
    def __init__(self, amount):
        self.amount = amount

    def __call__(self, weight):
        return weight + self.amount


def test_raw_parameter_keeps_its_name_and_forward_uses_the_stack():
    layer = nn.Linear(4, 3)
    keys = list(layer.state_dict())
    add_weight_transform(layer, Stage.MASK, Scale(0.0))
    assert list(layer.state_dict()) == keys
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    assert isinstance(layer, nn.Linear)
    x = torch.randn(2, 4)
    torch.testing.assert_close(layer(x), layer.bias.expand(2, 3), rtol=0, atol=0)


def test_stages_run_in_canonical_order_whatever_the_insertion_order():
    # (W + 1) * 2 when ADAPTER runs before MASK; W * 2 + 1 the other way round.
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.load_state_dict(first.state_dict())
    add_weight_transform(first, Stage.ADAPTER, Shift(1.0))
    add_weight_transform(first, Stage.MASK, Scale(2.0))
    add_weight_transform(second, Stage.MASK, Scale(2.0))
    add_weight_transform(second, Stage.ADAPTER, Shift(1.0))
    expected = (raw_weight(first).detach() + 1.0) * 2.0
    torch.testing.assert_close(first.weight, expected, rtol=0, atol=0)
    torch.testing.assert_close(second.weight, expected, rtol=0, atol=0)
    torch.testing.assert_close(weight_before(first, Stage.MASK), raw_weight(first) + 1.0, rtol=0, atol=0)


def test_gradient_reaches_the_raw_parameter_through_the_stack():
    layer = nn.Linear(4, 2, bias=False)
    keep = torch.tensor([[1.0, 0.0, 1.0, 0.0]] * 2)
    add_weight_transform(layer, Stage.MASK, Scale(keep))
    layer(torch.ones(1, 4)).sum().backward()
    assert torch.equal(raw_weight(layer).grad, keep)


def test_removing_the_last_transform_restores_the_class():
    layer = nn.Conv2d(2, 2, 3)
    add_weight_transform(layer, Stage.MASK, Scale(1.0))
    add_weight_transform(layer, Stage.FAKE_QUANT, Scale(1.0))
    remove_weight_transform(layer, Stage.MASK)
    assert type(layer) is not nn.Conv2d and get_weight_transform(layer, Stage.FAKE_QUANT)
    remove_weight_transform(layer, Stage.FAKE_QUANT)
    assert type(layer) is nn.Conv2d
    assert isinstance(layer.weight, nn.Parameter)


def test_same_stage_twice_is_refused():
    layer = nn.Linear(2, 2)
    add_weight_transform(layer, Stage.MASK, Scale(1.0))
    with pytest.raises(ValueError, match="already taken"):
        add_weight_transform(layer, Stage.MASK, Scale(1.0))


def test_pickle_and_deepcopy_keep_the_stack():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    add_weight_transform(model[0], Stage.MASK, Scale(0.5))
    x = torch.randn(3, 4)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = copy.deepcopy(model)
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(copied(x), model(x))


def test_parent_that_reads_child_weight_directly_sees_the_stack():
    # nn.MultiheadAttention reads out_proj.weight itself instead of calling out_proj.
    attention = nn.MultiheadAttention(8, 2)
    add_weight_transform(attention.out_proj, Stage.MASK, Scale(0.0))
    q = torch.randn(5, 1, 8)
    out, _ = attention(q, q, q)
    torch.testing.assert_close(out, attention.out_proj.bias.expand_as(out), rtol=0, atol=0)
