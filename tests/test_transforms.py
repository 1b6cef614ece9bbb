import copy
import gc
import io
import weakref

import pytest
import torch
from torch import nn

from lightning_compress.core.transforms import (
    INPUT,
    Stage,
    add_input_transform,
    add_weight_transform,
    all_transforms,
    detach_all,
    get_weight_transform,
    install_weight_transform,
    raw_weight,
    remove_input_transform,
    remove_weight_transform,
    transformed_slots,
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


def test_stage_on_multihead_attention_in_proj_weight():
    """MultiheadAttention reads `in_proj_weight` itself: a stage there changes its output
    exactly as a float model with the transformed weight, and state_dict keys stay."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2)
    reference = copy.deepcopy(attention)
    keys = list(attention.state_dict())
    keep = (torch.arange(3 * 8 * 8).view(24, 8) % 3 != 0).float()
    add_weight_transform(attention, Stage.MASK, Scale(keep), param="in_proj_weight")
    assert list(attention.state_dict()) == keys
    assert [n for n, _ in attention.named_parameters()] == [n for n, _ in reference.named_parameters()]
    assert transformed_slots(attention) == ("in_proj_weight",)
    with torch.no_grad():
        reference.in_proj_weight.mul_(keep)
    q = torch.randn(5, 1, 8)
    torch.testing.assert_close(attention(q, q, q)[0], reference(q, q, q)[0], rtol=0, atol=0)
    # The raw parameter is untouched and still the one the optimizer sees.
    assert raw_weight(attention, "in_proj_weight") is dict(attention.named_parameters())["in_proj_weight"]
    assert not torch.equal(raw_weight(attention, "in_proj_weight"), reference.in_proj_weight)


def test_stage_on_lstm_weights_reaches_its_flat_weights():
    """nn.LSTM computes from a cached list of its parameters; the stack hands it the
    effective weights, so a zeroed `weight_hh_l0` gives the output of an LSTM without
    recurrence weights, the gradient reaches the raw parameter, and keys are unchanged."""
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 3, num_layers=2)
    reference = copy.deepcopy(lstm)
    keys = list(lstm.state_dict())
    add_weight_transform(lstm, Stage.MASK, Scale(0.0), param="weight_hh_l0")
    add_weight_transform(lstm, Stage.FAKE_QUANT, Shift(0.5), param="weight_ih_l1")
    assert list(lstm.state_dict()) == keys
    with torch.no_grad():
        reference.weight_hh_l0.zero_()
        reference.weight_ih_l1.add_(0.5)
    x = torch.randn(6, 2, 4)
    out, (h, c) = lstm(x)
    expected, (h_ref, c_ref) = reference(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(c, c_ref, rtol=0, atol=0)
    out.sum().backward()
    assert torch.equal(raw_weight(lstm, "weight_hh_l0").grad, torch.zeros(12, 3))
    assert raw_weight(lstm, "weight_ih_l1").grad.abs().sum() > 0
    # After the forward the module still caches its raw parameters.
    assert all(w is p for w, p in zip(lstm._flat_weights, (getattr(lstm, "_parameters")[n] for n in lstm._flat_weights_names)))
    detach_all(lstm)
    assert type(lstm) is nn.LSTM
    torch.testing.assert_close(lstm(x)[0], copy.deepcopy(lstm)(x)[0], rtol=0, atol=0)


def test_stage_on_a_parameter_the_layer_does_not_have_is_refused():
    with pytest.raises(ValueError, match="no floating parameter `in_proj_weight`.*\\['weight', 'bias'\\]"):
        add_weight_transform(nn.Linear(2, 2), Stage.MASK, Scale(1.0), param="in_proj_weight")


class Clamp:
    def __call__(self, x, layer):
        return x.clamp(-0.5, 0.5) if layer.training else x


def test_input_stage_runs_before_the_layer_and_is_seen_by_every_reader():
    layer = nn.Linear(4, 2)
    reference = copy.deepcopy(layer)
    keys = list(layer.state_dict())
    install_weight_transform(layer, Stage.INPUT_QUANT, Clamp(), owner="qat", active_owners=set(), param=INPUT)
    assert list(layer.state_dict()) == keys
    x = torch.randn(3, 4) * 4
    torch.testing.assert_close(layer(x), reference(x.clamp(-0.5, 0.5)), rtol=0, atol=0)
    layer.eval()  # the transform gets the layer: here it acts only in training
    torch.testing.assert_close(layer(x), reference(x), rtol=0, atol=0)
    assert [(slot, stage) for slot, stage, _ in all_transforms(layer)] == [(INPUT, Stage.INPUT_QUANT)]
    # An input stage held by an active owner is a conflict, as for weights.
    with pytest.raises(ValueError, match="two active callbacks"):
        install_weight_transform(layer, Stage.INPUT_QUANT, Clamp(), owner="other", active_owners={"qat"}, param=INPUT)
    with pytest.raises(ValueError, match="already taken"):
        add_input_transform(layer, Stage.INPUT_QUANT, Clamp())
    copied = copy.deepcopy(layer)
    copied.train()
    torch.testing.assert_close(copied(x), reference(x.clamp(-0.5, 0.5)), rtol=0, atol=0)


class Counting:
    """A weight stage that counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, weight):
        self.calls += 1
        return weight * 0.5


def test_recurrent_stack_runs_once_per_forward_and_copies_hold_raw_parameters():
    lstm = nn.LSTM(4, 3)
    stage = Counting()
    add_weight_transform(lstm, Stage.MASK, stage, param="weight_ih_l0")
    x = torch.randn(5, 2, 4)
    out = lstm(x)[0]
    assert stage.calls == 1
    # The module caches its raw (leaf) parameters between forwards, so it deep-copies
    # with gradients on, and the copy computes the same.
    assert all(w is lstm._parameters[n] for w, n in zip(lstm._flat_weights, lstm._flat_weights_names))
    copied = copy.deepcopy(lstm)
    torch.testing.assert_close(copied(x)[0], out, rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(lstm, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False)(x)[0], out, rtol=0, atol=0)
    # `.to()` re-caches the weights: still the raw leaves, and the stage still applies.
    lstm.to(torch.float64)
    assert all(w is lstm._parameters[n] for w, n in zip(lstm._flat_weights, lstm._flat_weights_names))
    torch.testing.assert_close(lstm(x.double())[0], out.double(), rtol=1e-6, atol=1e-6)
    assert stage.calls == 2  # its two forwards, once each (copies run copies of the stage)


def test_input_stage_sees_input_passed_by_keyword_and_keeps_the_attention_fast_path_off():
    layer = nn.Linear(4, 2)
    reference = copy.deepcopy(layer)
    install_weight_transform(layer, Stage.INPUT_QUANT, Clamp(), owner="qat", active_owners=set(), param=INPUT)
    x = torch.randn(3, 4) * 4
    torch.testing.assert_close(layer(input=x), reference(x.clamp(-0.5, 0.5)), rtol=0, atol=0)
    # In eval mode without gradients nn.TransformerEncoderLayer takes a fused path that
    # never calls its Linear layers' forward; a layer with an input stage must keep it off,
    # so the model computes what it trains (the stage here acts in eval mode too).
    encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    plain = copy.deepcopy(encoder)

    class Halve:
        def __call__(self, x, layer):
            return x * 0.5

    install_weight_transform(encoder.linear2, Stage.INPUT_QUANT, Halve(), owner="qat", active_owners=set(), param=INPUT)
    with torch.no_grad():
        plain.linear2.weight.mul_(0.5)  # linear2(h / 2) == (W / 2) h + b
        src = torch.randn(2, 5, 8)
        torch.testing.assert_close(encoder(src), plain(src), rtol=1e-6, atol=1e-6)
    remove_input_transform(encoder.linear2, Stage.INPUT_QUANT)
    assert type(encoder.linear2) is nn.Linear and not encoder.linear2._forward_pre_hooks


def test_stage_must_be_a_stage():
    with pytest.raises(ValueError, match="`stage` must be a Stage"):
        add_weight_transform(nn.Linear(2, 2), 99, Scale(1.0))
    with pytest.raises(ValueError, match="no parameter `nope`; it has \\['bias', 'weight'\\]"):
        raw_weight(nn.Linear(2, 2), "nope")


class _Remembering:
    """A weight stage whose outputs it can tell are still alive (weak references only)."""

    def __init__(self, factor):
        self.factor, self.outputs = factor, []

    def __call__(self, weight):
        out = (weight * self.factor).view(weight.shape)  # a view, as fake quantization returns
        self.outputs.append(weakref.ref(out._base))
        return out


@pytest.mark.parametrize("make_layer, shape", [(lambda: nn.Linear(6, 4), (3, 6)),
                                               (lambda: nn.Conv1d(2, 4, 3), (3, 2, 5))])
def test_effective_weights_are_recomputed_for_the_backward_not_kept(make_layer, shape):
    torch.manual_seed(0)
    layer, x = make_layer(), torch.randn(*shape, requires_grad=True)
    reference = copy.deepcopy(layer)
    mask = (torch.rand_like(layer.weight) > 0.3).float()
    remembering = _Remembering(1.5)
    add_weight_transform(layer, Stage.MASK, lambda w: w * mask)
    add_weight_transform(layer, Stage.FAKE_QUANT, remembering)
    out = layer(x)
    gc.collect()
    # Nothing holds the effective weight between the forward and the backward...
    assert len(remembering.outputs) == 1 and remembering.outputs[0]() is None
    out.square().sum().backward()
    # ...and the gradients are those of the stack computed by hand, bit for bit.
    x_ref = x.detach().clone().requires_grad_()
    effective = reference.weight * mask * 1.5
    functional = torch.nn.functional.linear if isinstance(layer, nn.Linear) else torch.nn.functional.conv1d
    functional(x_ref, effective, reference.bias).square().sum().backward()
    assert torch.equal(layer._parameters["weight"].grad, reference.weight.grad)
    assert torch.equal(layer.bias.grad, reference.bias.grad) and torch.equal(x.grad, x_ref.grad)
    assert len(remembering.outputs) == 2  # computed again once, in the backward


def test_a_weight_changed_between_forward_and_backward_is_refused():
    layer = nn.Linear(4, 3)
    add_weight_transform(layer, Stage.FAKE_QUANT, lambda w: w * 2)
    out = layer(torch.randn(2, 4, requires_grad=True))  # the input's gradient needs the weight
    with torch.no_grad():
        layer._parameters["weight"].add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place between the forward and the backward"):
        out.sum().backward()


def test_without_autograd_nothing_is_recorded():
    layer = nn.Linear(4, 3)
    remembering = _Remembering(2.0)
    add_weight_transform(layer, Stage.FAKE_QUANT, remembering)
    x = torch.randn(2, 4)
    with torch.no_grad():
        out = layer(x)
    expected = torch.nn.functional.linear(x, layer._parameters["weight"] * 2.0, layer.bias)
    assert torch.equal(out, expected) and out.grad_fn is None and len(remembering.outputs) == 1


def test_under_activation_checkpointing_the_checkpoint_decides_what_is_kept():
    # Its hooks drop everything the block saves (the layer's input too) and run the block
    # again in the backward; the gradients are those of the plain stack.
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    reference = copy.deepcopy(block)
    for layer in (block[0], block[2]):
        add_weight_transform(layer, Stage.FAKE_QUANT, Scale(0.5))
    x = torch.randn(4, 6)
    torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False).square().sum().backward()
    h = torch.tanh(torch.nn.functional.linear(x, reference[0].weight * 0.5, reference[0].bias))
    torch.nn.functional.linear(h, reference[2].weight * 0.5, reference[2].bias).square().sum().backward()
    for mine, theirs in ((block[0], reference[0]), (block[2], reference[2])):
        torch.testing.assert_close(mine._parameters["weight"].grad, theirs.weight.grad, rtol=0, atol=0)
