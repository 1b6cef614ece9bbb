"""Unit checks of the numeric core that mutation testing (`make mutation`) found unguarded:
defaults, state round trips and exact copies, each against hand-computed values."""

from __future__ import annotations

import copy
import hashlib
import math
import struct
import warnings

import pytest
import torch
from torch import nn

from lightning_compress import export
from lightning_compress.core.transforms import Stage, add_input_transform, add_weight_transform, get_weight_transform
from lightning_compress.core.validate import ArgumentError
from lightning_compress.distill.losses import (
    cosine,
    distillation_loss,
    kl_divergence,
    mse,
    reverse_kl_divergence,
    top1_agreement,
)
from lightning_compress.formats.packed import read_packed
from lightning_compress.formats.parity import ParityReport, check_parity, flatten_outputs, relative_error, sqnr_db
from lightning_compress.quant.activations import DynamicTokenQuantizer, StaticRangeObserver, input_quantizer_of
from lightning_compress.quant.config import QATConfig
from lightning_compress.quant.nf4 import (
    check_nf4_compatible,
    copy_nf4,
    dequantize_nf4,
    nf4_deepcopy_memo,
    tensor_digest,
    to_nf4,
)
from lightning_compress.quant.fake_quant import check_divisible, choose_qparams, quantize_codes
from lightning_compress.quant.packing import pack_codes, unpack_biased, unpack_codes
from lightning_compress.quant.spec import QuantSpec, spec_from_options
from lightning_compress.quant.weights import (
    WeightFakeQuantizer,
    attach_weight_quantizers,
    quantized_weights,
    round_to_nearest,
)
from lightning_compress.sparsity.config import PruningConfig
from lightning_compress.sparsity.masks import (
    MaskedWeight,
    SparsityPattern,
    check_nm_compatible,
    global_masks,
    layer_mask,
    pack_mask,
    unpack_mask,
)
from lightning_compress.sparsity.schedules import scheduled_sparsity
from tests.conftest import needs_int8_gemm


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


def test_a_group_size_alone_means_group_granularity_as_in_qat():
    # A new user's trial: QuantSpec(bits=4, group_size=32) was refused while
    # QuantizationAwareTraining("int4", group_size=32) inferred the granularity.
    assert QuantSpec(bits=4, group_size=32) == QuantSpec(4, "group", 32)
    assert QuantSpec(bits=4).granularity == "channel"
    assert QuantSpec(bits=4, group_size=32).replace(group_size=None, granularity="channel") == QuantSpec(4)


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
    observer.in_training_batch = False  # between training batches (validation in train mode, after fit)
    observer(torch.tensor([-9.0, 9.0]), layer)
    assert (observer.low.item(), observer.high.item()) == (-1.0, 3.0)
    observer.in_training_batch = True
    with torch.no_grad():  # reentrant checkpointing runs a training forward so: observed
        observer(torch.tensor([-2.0, 5.0]), layer)
    assert (observer.low.item(), observer.high.item()) == (-2.0, 5.0)


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
    # row 0: mean |w| 1, RMS 1; row 1: mean |w| 0.75, RMS 1.5 -> L1 prunes row 1, L2 row 0
    weight = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    structured = SparsityPattern.parse("structured")
    assert layer_mask(weight, 0.5, structured, norm=1)[:, 0].tolist() == [True, False]
    assert layer_mask(weight, 0.5, structured)[:, 0].tolist() == [True, False]  # L1 by default
    assert layer_mask(weight, 0.5, structured, norm=2)[:, 0].tolist() == [False, True]


# ---------------------------------------------------------------------- the QAT config
def test_qat_config_builds_its_grid_from_the_fields():
    assert QATConfig().spec == QuantSpec(8, "channel")
    assert QATConfig("int4", granularity="tensor").spec == QuantSpec(4, "tensor")
    assert QATConfig("int4", group_size=32).spec == QuantSpec(4, "group", 32)  # a group size alone means groups
    assert QATConfig(scale_dtype="float16", symmetric=False).spec == QuantSpec(8, "channel", None, False, "float16")
    assert QATConfig(learn_ranges=True).spec == QuantSpec(8, "channel")  # float32 scales: allowed with learned ranges
    assert QATConfig(scale_dtype="bfloat16").spec.scale_dtype == "bfloat16"  # fixed ranges: any scale dtype


def test_qat_config_keeps_checked_values():
    config = QATConfig(range_lr=1, targets="fc", exclude=["head", nn.Conv2d], name="qat-a")
    assert config.range_lr == 1.0 and type(config.range_lr) is float
    assert config.targets == ("fc",) and config.exclude == ("head", nn.Conv2d)  # tuples, whatever was passed
    assert config.name == "qat-a"
    assert config.overrides is None and config.layer_overrides == {}
    overridden = QATConfig("int4", group_size=32, overrides={"head": {"bits": 8, "granularity": "channel"}})
    assert overridden.layer_overrides == {"head": QuantSpec(8, "channel")}


@pytest.mark.parametrize(
    ("kwargs", "argument", "message"),
    [
        (dict(granularity="row"), "granularity", "unknown `granularity` 'row'; choose one of ('tensor', 'channel', 'group')"),
        (dict(weight_range="max"), "weight_range", "unknown `weight_range` 'max'; choose one of ('minmax', 'mse')"),
        (dict(learn_ranges="yes"), "learn_ranges", "`learn_ranges` must be True or False, got 'yes'"),
        (dict(learn_ranges=True, scale_dtype="bfloat16"), "scale_dtype",
         "`learn_ranges=True` trains float32 scales, which `scale_dtype`='bfloat16' would round at export; use"
         " scale_dtype='float32' with learned ranges"),
        (dict(activations="int4"), "activations",
         "unknown `activations` 'int4'; choose None or one of ('int8_dynamic', 'int8_static')"),
        (dict(observer="ema"), "observer", "unknown `observer` 'ema'; choose one of ('minmax', 'moving_average')"),
        (dict(calibration_steps=0), "calibration_steps", "`calibration_steps` must be a positive int, got 0"),
        (dict(start_step=-1), "start_step", "`start_step` must be >= 0, got -1"),
        (dict(targets=[""]), "targets", "`targets` has an empty name pattern; remove it"),
        (dict(targets=[nn.BatchNorm1d]), "targets", "`targets` names the layer type BatchNorm1d, which this method"
                                                    " cannot compress; supported types: Linear, "),
        (dict(exclude=[""]), "exclude", "`exclude` has an empty name pattern; remove it"),
        (dict(exclude=[nn.BatchNorm1d]), "exclude", "`exclude` names the layer type BatchNorm1d, which this method"
                                                    " cannot compress; supported types: Linear, "),
        (dict(name=""), "name", "`name` must be a non-empty string or None, got ''"),
        (dict(overrides=["head"]), "overrides",
         "`overrides` must map name globs to option dicts, e.g. {'head': {'bits': 8}}"),
        (dict(overrides={"head": 8}), "overrides", "`overrides['head']` must be a dict of options, got 8"),
        (dict(overrides={"head": {"bitz": 8}}), "overrides", "`overrides['head']` has unknown option(s) ['bitz']"),
    ],
)
def test_qat_config_errors_name_the_field(kwargs, argument, message):
    with pytest.raises(ArgumentError) as caught:
        QATConfig(**kwargs)
    assert caught.value.argument == argument
    assert str(caught.value).startswith(message)


def test_qat_config_names_the_grid_that_does_not_fit_a_layer():
    config = QATConfig("int4", group_size=32, overrides={"weight_hh_l0": {"group_size": 16}})
    fits = nn.Linear(64, 4)
    assert config.layer_issue("fc", fits) is None
    issue = config.layer_issue("fc", nn.Linear(48, 4))
    assert (issue.argument, issue.value) == ("group_size", 32)
    assert issue.message == ("`group_size`=32 does not divide the input size 48 of layer 'fc'; use group_size=16"
                             " for it with an override, or add it to `exclude`")
    # each weight of a recurrent layer is its own key; the override names the hidden-to-hidden one
    rnn = nn.LSTM(48, 4)  # weight_ih_l0 [16, 48], weight_hh_l0 [16, 4]
    issue = config.layer_issue("rnn.weight_ih_l0", rnn)
    assert (issue.argument, issue.value) == ("group_size", 32) and "input size 48 of layer 'rnn.weight_ih_l0'" in issue.message
    issue = config.layer_issue("rnn.weight_hh_l0", rnn)
    assert (issue.argument, issue.value) == ("overrides['weight_hh_l0']", "int4 g16 sym")
    assert issue.message == ("`group_size`=16 does not divide the input size 4 of layer 'rnn.weight_hh_l0'; use"
                             " granularity='channel' for it with an override, or add it to `exclude`")


# ---------------------------------------------------------------------- sparsity patterns and the pruning config
def test_sparsity_patterns_parse_and_print():
    assert SparsityPattern.parse(" Structured ") == SparsityPattern("structured")
    assert SparsityPattern.parse("1:4") == SparsityPattern("n:m", 1, 4) and SparsityPattern.parse("1:4").fixed_sparsity == 0.75
    assert SparsityPattern.parse(" 2 : 4 ") == SparsityPattern("n:m", 2, 4)
    assert [str(SparsityPattern.parse(text)) for text in ("unstructured", "structured", "2:4")] == [
        "unstructured", "structured", "2:4"]
    assert SparsityPattern.parse("unstructured").fixed_sparsity is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (5, "`pattern` must be a string, got 5"),
        ("blocky", "unknown `pattern` 'blocky'; choose 'unstructured', 'structured' or 'N:M' such as '2:4'"),
        ("4:4", "`pattern`='4:4' must keep N of every M weights with 1 <= N < M (e.g. '2:4')"),
        ("0:4", "`pattern`='0:4' must keep N of every M weights with 1 <= N < M (e.g. '2:4')"),
    ],
)
def test_bad_sparsity_patterns_name_the_argument(text, message):
    with pytest.raises(ArgumentError) as caught:
        SparsityPattern.parse(text)
    assert (caught.value.argument, str(caught.value)) == ("pattern", message)


def test_nm_compatibility_reads_the_input_size():
    two_four = SparsityPattern.parse("2:4")
    assert check_nm_compatible("fc", torch.empty(3, 8), two_four) is None
    assert check_nm_compatible("conv", torch.empty(3, 8, 3), two_four) is None  # dim 1 (8), not the kernel (3)
    assert check_nm_compatible("fc", torch.empty(3, 6), SparsityPattern.parse("unstructured")) is None
    with pytest.raises(ValueError) as caught:
        check_nm_compatible("fc", torch.empty(3, 6), two_four)
    assert str(caught.value) == ("layer 'fc' has input size 6, not divisible by M=4 of pattern '2:4'; add 'fc' to"
                                 " `exclude` or choose an M that divides it")


def test_pruning_config_derives_and_keeps_checked_values():
    assert PruningConfig().final_sparsity == 0.5
    assert PruningConfig(pattern="1:4").final_sparsity == 0.75  # N:M fixes it
    assert PruningConfig(0.75, pattern="1:4").final_sparsity == 0.75
    config = PruningConfig(0.5, initial_sparsity=0, targets="fc", exclude=[nn.Conv2d], name="prune-a")
    assert type(config.initial_sparsity) is float and config.initial_sparsity == 0.0
    assert config.targets == ("fc",) and config.exclude == (nn.Conv2d,) and config.name == "prune-a"
    assert PruningConfig(0.5, initial_sparsity=0.5).initial_sparsity == 0.5  # equal is allowed
    assert PruningConfig(scope="global").scope == "global"  # global with unstructured weights
    # one_shot has no end to come after its start; the other schedules do
    assert PruningConfig(schedule="one_shot", start_step=10, end_step=5).start_step == 10
    # a final sparsity exactly the tolerance (1e-12) away from the pattern's is accepted
    assert PruningConfig(0.0, pattern="999999999999:1000000000000").final_sparsity == 0.0


@pytest.mark.parametrize(
    ("kwargs", "argument", "message"),
    [
        (dict(final_sparsity=1.0), "final_sparsity", "`final_sparsity` must be a number in [0, 1), got 1.0"),
        (dict(initial_sparsity=-0.1), "initial_sparsity", "`initial_sparsity` must be a number in [0, 1), got -0.1"),
        (dict(final_sparsity=0.6, pattern="2:4"), "final_sparsity",
         "`pattern`='2:4' fixes the sparsity at 0.5; leave `final_sparsity` unset (got 0.6)"),
        (dict(final_sparsity=0.3, initial_sparsity=0.4), "initial_sparsity",
         "`initial_sparsity`=0.4 exceeds `final_sparsity`=0.3; sparsity only grows during pruning"),
        (dict(schedule="exp"), "schedule", "unknown `schedule` 'exp'; choose one of ('cubic', 'linear', 'one_shot')"),
        (dict(start_step=10, end_step=5), "end_step", "`end_step`=5 must come after `start_step`=10"),
        (dict(update_every=0), "update_every", "`update_every` must be a positive int or None, got 0"),
        (dict(scope="model"), "scope", "unknown `scope` 'model'; choose 'layer' or 'global'"),
        (dict(scope="global", pattern="2:4"), "scope",
         "`scope`='global' cannot be combined with `pattern`='2:4': N:M fixes every group's sparsity. Use scope='layer'."),
        (dict(targets=[""]), "targets", "`targets` has an empty name pattern; remove it"),
        (dict(targets=[nn.BatchNorm1d]), "targets", "`targets` names the layer type BatchNorm1d, which this method"
                                                    " cannot compress; supported types: Linear, "),
        (dict(exclude=[""]), "exclude", "`exclude` has an empty name pattern; remove it"),
        (dict(exclude=[nn.BatchNorm1d]), "exclude", "`exclude` names the layer type BatchNorm1d, which this method"
                                                    " cannot compress; supported types: Linear, "),
        (dict(name=""), "name", "`name` must be a non-empty string or None, got ''"),
    ],
)
def test_pruning_config_errors_name_the_field(kwargs, argument, message):
    with pytest.raises(ArgumentError) as caught:
        PruningConfig(**kwargs)
    assert caught.value.argument == argument
    assert str(caught.value).startswith(message)


def test_pruning_config_names_the_pattern_that_does_not_fit_a_layer():
    config = PruningConfig(pattern="2:4")
    assert config.layer_issue("fc", nn.Linear(8, 3)) is None
    assert PruningConfig().layer_issue("fc", nn.Linear(6, 3)) is None  # unstructured fits anything
    issue = config.layer_issue("fc", nn.Linear(6, 3))
    assert (issue.argument, issue.value) == ("pattern", "2:4")
    assert issue.message == ("layer 'fc' has input size 6, not divisible by M=4 of pattern '2:4'; add 'fc' to"
                             " `exclude` or choose an M that divides it")
    rnn = nn.GRU(8, 6)  # weight_ih_l0 [18, 8] fits, weight_hh_l0 [18, 6] does not
    assert config.layer_issue("rnn.weight_ih_l0", rnn) is None
    assert "layer 'rnn.weight_hh_l0' has input size 6" in config.layer_issue("rnn.weight_hh_l0", rnn).message


# ---------------------------------------------------------------------- distillation losses
def test_kl_defaults_to_temperature_one_by_hand():
    teacher = torch.tensor([[0.0, 0.0]])  # p_t = (1/2, 1/2)
    student = torch.tensor([[0.0, math.log(3.0)]])  # p_s = (1/4, 3/4)
    forward = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    backward = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert kl_divergence(student, teacher).item() == pytest.approx(forward, rel=1e-6)
    assert reverse_kl_divergence(student, teacher).item() == pytest.approx(backward, rel=1e-6)
    assert distillation_loss("kl", student, teacher).item() == pytest.approx(forward, rel=1e-6)
    with pytest.raises(ValueError) as caught:
        distillation_loss("l1", student, teacher)
    assert str(caught.value) == "unknown distillation loss 'l1'; choose one of ('kl', 'reverse_kl', 'mse', 'cosine')"


def test_losses_compute_bfloat16_outputs_in_float32_without_warnings():
    student = torch.tensor([[0.1, 1.3, -2.2, 0.7], [2.0, -1.0, 0.5, 0.0]]).bfloat16()
    teacher = torch.tensor([[1.1, -0.4, 0.3, 2.5], [0.2, 0.9, -1.5, 1.0]]).bfloat16()
    s, t = student.double(), teacher.double()  # the bf16 values, exactly
    log_s, log_t = s.log_softmax(-1), t.log_softmax(-1)
    expected = (log_t.exp() * (log_t - log_s)).sum(-1).mean().item()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kl = kl_divergence(student.view(1, 2, 4), teacher.view(1, 2, 4))  # [batch, position, class]
    assert kl.dtype == torch.float32 and kl.item() == pytest.approx(expected, abs=1e-6)  # bf16 math: ~1e-2 off
    assert mse(student, teacher).dtype == torch.float32
    assert mse(torch.tensor(3.0), torch.tensor(1.0)).item() == 4.0  # a 0-d output is one row of one column
    with pytest.raises(ValueError) as caught:
        mse(torch.zeros(2, 3), torch.zeros(2, 4))
    assert str(caught.value) == "student output shape (2, 3) differs from teacher output shape (2, 4)"


def test_kl_is_computed_in_row_chunks_that_keep_only_the_logits_for_the_backward(monkeypatch):
    from lightning_compress.distill import losses

    monkeypatch.setattr(losses, "_CHUNK_BYTES", 4 * 7 * 16)  # 16 rows of 7 classes a chunk: 4 chunks of 50 rows
    torch.manual_seed(0)
    student = torch.randn(5, 10, 7, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 10, 7, dtype=torch.float64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        kl = kl_divergence(student, teacher, temperature=2.0)
    kl.backward()
    # Reference: the textbook formula, by hand, on the same float64 values.
    reference_student = student.detach().clone().requires_grad_()
    log_s = (reference_student / 2.0).log_softmax(-1)
    log_t = (teacher / 2.0).log_softmax(-1)
    expected = (log_t.exp() * (log_t - log_s)).sum(-1).mean() * 4.0
    expected.backward()
    assert kl.item() == pytest.approx(expected.item(), rel=1e-12)
    assert torch.allclose(student.grad, reference_student.grad, rtol=0, atol=1e-15)
    # What the backward keeps: the two logit tensors (views of the inputs), no softmax of them.
    assert len(saved) == 2 and {x.data_ptr() for x in saved} == {student.data_ptr(), teacher.data_ptr()}
    # reverse_kl differentiates the second argument: the unchunked formula, same value.
    reverse = reverse_kl_divergence(student, teacher, temperature=2.0)
    assert reverse.item() == pytest.approx(kl_divergence(teacher, student.detach(), temperature=2.0).item(), rel=1e-12)
    assert torch.isnan(kl_divergence(torch.zeros(0, 3), torch.zeros(0, 3)))  # the mean of no rows, as before


def test_top1_agreement_compares_the_last_dimension():
    # [batch 2, positions 2, classes 3]
    student = torch.tensor([[[0.0, 5.0, 1.0], [9.0, 0.0, 1.0]], [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # [1, 0], [0, 1]
    teacher = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]], [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])  # [1, 1], [0, 2]
    assert top1_agreement(student, teacher).item() == 0.5


# ---------------------------------------------------------------------- masks
def test_nm_masks_keep_n_of_m_above_the_patterns_sparsity():
    weight = torch.arange(1.0, 9.0).view(1, 8)
    mask = layer_mask(weight, 0.75, SparsityPattern.parse("2:4"))  # capped at 2:4's 50%
    assert mask.tolist() == [[False, False, True, True, False, False, True, True]]


def test_masks_prune_exactly_the_count_with_ties_by_position():
    weight = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    assert layer_mask(weight, 0.5, SparsityPattern.parse("unstructured")).tolist() == [[False, False, True, True]]


def test_the_radix_select_is_exact_with_zeros_and_subnormal_magnitudes():
    # 70,000 magnitudes (above the radix-select threshold): 100 zeros, 200 distinct subnormals
    # (the second 16-bit bucket), the rest in [1, 2]; pruning 150 takes the zeros and the 50
    # smallest subnormals, as a stable argsort says
    values = torch.linspace(1.0, 2.0, 70_000)
    values[:100] = 0.0
    values[100:300] = torch.arange(0x10000, 0x10000 + 200 * 7, 7, dtype=torch.int32).view(torch.float32)
    values = values[torch.randperm(70_000, generator=torch.Generator().manual_seed(0))]
    expected = torch.ones(70_000, dtype=torch.bool)
    expected[torch.sort(values, stable=True).indices[:150]] = False
    mask = layer_mask(values.view(1, -1), 150 / 70_000, SparsityPattern.parse("unstructured"))
    assert torch.equal(mask.view(-1), expected)


def test_global_masks_by_hand():
    structured = SparsityPattern.parse("structured")
    # L1 (the default norm) prunes row 1 (mean 0.75 < 1), L2 row 0 (RMS 1 < 1.5)
    weight = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    assert global_masks({"a": weight}, 0.5, structured)["a"][:, 0].tolist() == [True, False]
    assert global_masks({"a": weight}, 0.5, structured, norm=1)["a"][:, 0].tolist() == [True, False]
    assert global_masks({"a": weight}, 0.5, structured, norm=2)["a"][:, 0].tolist() == [False, True]
    # three layers (one of a single channel): 4 of 10 weights are exactly the two lowest channels
    layers = {"a": torch.tensor([[1.0, 1.0], [5.0, 5.0]]), "b": torch.tensor([[0.5, 0.5]]),
              "c": torch.tensor([[0.1, 0.1], [9.0, 9.0]])}
    masks = global_masks(layers, 0.4, structured)
    assert masks["a"].all() and not masks["b"].any() and masks["c"][:, 0].tolist() == [False, True]
    unstructured = SparsityPattern.parse("unstructured")
    masks = global_masks({"a": torch.tensor([[5.0, 6.0]]), "b": torch.tensor([[0.1, 7.0]]),
                          "c": torch.tensor([[8.0, 0.2]])}, 2 / 6, unstructured)
    assert [masks[k].tolist() for k in "abc"] == [[[True, True]], [[False, True]], [[True, False]]]
    with pytest.raises(ValueError) as caught:
        global_masks({"a": weight}, 0.5, SparsityPattern.parse("2:4"))
    assert str(caught.value) == "N:M sparsity is per group; use scope='layer' with an N:M `pattern`"


def test_global_channel_ties_are_broken_by_position():
    # 24,000 equal channels: a stable sort prunes the first half in order (an unstable one mixes them)
    masks = global_masks({"a": torch.ones(12_000, 1), "b": torch.ones(12_000, 1)}, 0.5,
                         SparsityPattern.parse("structured"))
    assert not masks["a"].any() and masks["b"].all()


def test_masked_weight_keeps_the_weights_dtype_and_device_and_holds_packed_bits():
    keep = torch.tensor([True, False, True])
    stage = MaskedWeight()
    stage.set(keep, like=torch.zeros(3))
    assert stage.bits.dtype == torch.uint8 and stage.bits.tolist() == [0b010]  # pruned entries, low bit first
    assert stage.pruned.dtype == torch.bool and stage.keep.tolist() == [True, False, True]
    out = stage(torch.tensor([1.5, 2.5, -3.0], dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.tolist() == [1.5, 0.0, -3.0]
    on_meta = MaskedWeight()
    on_meta.set(keep, like=torch.zeros(3, device="meta"))
    assert on_meta.pruned.device.type == "meta"
    follows = MaskedWeight()
    follows.set(keep, like=torch.zeros(3))  # restored on the CPU, the model elsewhere
    assert follows(torch.zeros(3, device="meta")).device.type == "meta" and follows.pruned.device.type == "meta"


def test_masked_weight_matches_masked_fill_and_saves_only_the_bits_for_its_backward():
    # The reference: torch's own masked_fill with a bool mask (values and gradient).
    torch.manual_seed(0)
    keep = torch.rand(37, 29) > 0.6
    weight = torch.randn(37, 29, dtype=torch.float64, requires_grad=True)
    reference = torch.randn(37, 29, dtype=torch.float64, requires_grad=True)
    stage = MaskedWeight()
    stage.set(keep, like=weight)
    saved = []

    def record(tensor):
        saved.append((tensor.dtype, tensor.numel()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor):
        out = stage(weight)
    (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    with torch.no_grad():
        reference.copy_(weight)
    expected = reference.masked_fill(~keep, 0)
    (expected * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    assert torch.equal(out, expected) and torch.equal(weight.grad, reference.grad)
    assert (weight.grad[~keep] == 0).all()
    # What lives from the forward to the backward: the packed bits (37 * 29 / 8 bytes,
    # rounded up), not a bool mask the weight's size (masked_fill saves that one).
    assert saved == [(torch.uint8, -(-37 * 29 // 8))]
    assert torch.autograd.gradcheck(lambda w: stage(w), (weight.detach().clone().requires_grad_(),))


# The first use of torch.func scripts helpers with torch.jit, which torch 2.13 deprecates (not our warning).
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_masked_weight_supports_forward_mode_ad_and_torch_func_as_masked_fill_does():
    keep = torch.tensor([[True, False, True], [False, True, True]])
    stage = MaskedWeight()
    stage.set(keep, like=torch.zeros(2, 3))
    weight, tangent = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    with torch.autograd.forward_ad.dual_level():
        out = torch.autograd.forward_ad.unpack_dual(stage(torch.autograd.forward_ad.make_dual(weight, tangent)))
    assert torch.equal(out.primal, weight.masked_fill(~keep, 0)) and torch.equal(out.tangent, tangent.masked_fill(~keep, 0))
    grad = torch.func.grad(lambda w: (stage(w) * 3).sum())(weight)
    assert torch.equal(grad, torch.full_like(weight, 3.0).masked_fill(~keep, 0))
    batch = torch.randn(4, 2, 3)
    assert torch.equal(torch.func.vmap(stage)(batch), batch.masked_fill(~keep, 0))


def test_masked_weight_made_under_inference_mode_still_trains():
    # Bits made under inference mode (moved to the model's device by Lightning's
    # sanity-check validation, or set there) must still be savable for a backward.
    stage = MaskedWeight()
    with torch.inference_mode():
        stage.set(torch.tensor([True, False]), like=torch.zeros(2))
        assert stage(torch.ones(2)).tolist() == [1.0, 0.0]
    assert stage.bits.is_inference()
    weight = torch.ones(2, requires_grad=True)
    stage(weight).sum().backward()
    assert weight.grad.tolist() == [1.0, 0.0]


def test_masked_weight_pickled_with_a_bool_mask_loads_as_bits():
    import pickle

    legacy = MaskedWeight.__new__(MaskedWeight)
    legacy.__dict__.update(pruned=torch.tensor([False, True, True]))  # how the stage was before packed bits
    stage = pickle.loads(pickle.dumps(legacy))
    assert stage.keep.tolist() == [True, False, False]
    assert stage(torch.tensor([1.0, 2.0, 3.0])).tolist() == [1.0, 0.0, 0.0]
    empty = MaskedWeight.__new__(MaskedWeight)
    empty.__dict__.update(pruned=None)
    assert pickle.loads(pickle.dumps(empty))(torch.tensor([1.0])).tolist() == [1.0]


def test_unpacking_under_fake_tensors_leaves_real_unpacking_real():
    from torch._subclasses.fake_tensor import FakeTensorMode

    packed = pack_mask(torch.tensor([True, False, True]))
    with FakeTensorMode() as mode:
        unpack_mask(mode.from_tensor(packed), (3,))
    assert unpack_mask(packed, (3,)).tolist() == [True, False, True]


def test_mask_packing_stays_on_the_masks_device():
    mask = torch.ones(16, dtype=torch.bool, device="meta")
    packed = pack_mask(mask)
    assert packed.device.type == "meta" and packed.dtype == torch.uint8
    assert unpack_mask(packed, (16,)).device.type == "meta"


# ---------------------------------------------------------------------- schedules
def test_schedules_by_hand():
    common = dict(initial=0.0, final=0.8, start=0, end=100, update_every=10)
    assert scheduled_sparsity(50, **common) == pytest.approx(0.8 - 0.8 * 0.5**3)  # cubic by default
    assert scheduled_sparsity(5, **common, kind="one_shot") == 0.8
    # `end` off the update grid: from `end` on it is `final`, not the last update's value
    assert scheduled_sparsity(95, **dict(common, end=95)) == 0.8
    assert scheduled_sparsity(50, **dict(common, initial=0.2, final=0.6), kind="linear") == pytest.approx(0.4)
    with pytest.raises(ValueError) as caught:
        scheduled_sparsity(50, **common, kind="exp")
    assert str(caught.value) == "unknown schedule 'exp'; choose one of ('cubic', 'linear', 'one_shot')"


# ---------------------------------------------------------------------- packing
def test_unpacking_errors_and_devices():
    with pytest.raises(TypeError) as caught:
        unpack_codes(torch.zeros(2, 1, dtype=torch.int16), 4, 8)
    assert str(caught.value) == "packed codes must be int32, got torch.int16"
    with pytest.raises(ValueError) as caught:
        unpack_codes(torch.zeros(2, 2, dtype=torch.int32), 4, 8)
    assert str(caught.value) == "2 words per row cannot hold 8 codes of 4 bits"
    # the general (3-bit) path and the biased 4-bit view stay on the codes' device
    assert unpack_codes(torch.zeros(2, 3, dtype=torch.int32, device="meta"), 3, 32).device.type == "meta"
    assert unpack_biased(torch.zeros(2, 1, dtype=torch.int32, device="meta"), 4, 8).device.type == "meta"
    # only 2-D int32 words have a biased view
    assert unpack_biased(torch.zeros(1, dtype=torch.int32), 4, 8) is None
    assert unpack_biased(torch.zeros(2, 1, dtype=torch.int16), 4, 4) is None


# ---------------------------------------------------------------------- specs, quantizers, NF4
def test_spec_descriptions():
    assert QuantSpec().describe() == "int8 channel sym"
    assert QuantSpec(4, "group", 32, False, "float16").describe() == "int4 g32 asym float16 scales"
    assert QuantSpec(2, "tensor", scale_dtype="bfloat16").describe() == "int2 tensor sym bfloat16 scales"


def test_learned_scales_restore_their_start_state():
    quantizer = WeightFakeQuantizer(QuantSpec(4, "channel"), learned=True)
    weight = torch.tensor([[1.5, -3.0], [0.75, 0.0]])
    quantizer.create_parameters(weight)
    state = quantizer.start_state()  # before the first enabled forward: zeros, not initialized
    quantizer.enabled = True
    quantizer(weight)
    assert quantizer.initialized and torch.allclose(quantizer.log_scale.detach().exp(), torch.tensor([0.4, 0.1]))
    quantizer.restore_start_state(state)
    assert not quantizer.initialized and torch.equal(quantizer.log_scale.detach(), torch.zeros(2))


def test_weight_quantizer_table_fields():
    quantizer = WeightFakeQuantizer(QuantSpec(4, "group", 32))
    assert quantizer.table_fields() == {}
    quantizer.enabled = True
    assert quantizer.table_fields() == {"weight_bits": 4, "granularity": "g32"}


def test_round_to_nearest_leaves_excluded_layers_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    assert set(round_to_nearest(model, QuantSpec(8, "channel"), exclude=["1"])) == {"0"}


def test_the_input_quantizer_is_the_input_stage():
    layer = nn.Linear(2, 2)
    quantizer = DynamicTokenQuantizer()
    add_input_transform(layer, Stage.INPUT_QUANT, quantizer)
    assert input_quantizer_of(layer) is quantizer and input_quantizer_of(nn.Linear(2, 2)) is None


def test_dynamic_quantizer_tokens_are_channels_for_conv_inputs():
    x = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))  # [batch, channels, length]
    quantizer, linear = DynamicTokenQuantizer(channels_first=True), DynamicTokenQuantizer()
    quantizer.enabled = linear.enabled = True
    # a Conv input at each position is a Linear input of its channels
    assert torch.equal(quantizer(x), linear(x.movedim(1, 2)).movedim(2, 1))
    assert linear(x.bfloat16()).dtype == torch.bfloat16


def test_nf4_compatibility_messages():
    with pytest.raises(ValueError) as caught:
        check_nf4_compatible("fc", torch.empty(4, 4, 4), 64, 1)
    assert str(caught.value) == "layer 'fc': NF4 stores 1-D or 2-D weights, got shape (4, 4, 4)"
    with pytest.raises(ValueError) as caught:
        check_nf4_compatible("fc", torch.empty(2, 64), 48, 1)
    assert str(caught.value) == ("layer 'fc': `nf4_block_size`=48 does not divide its 128 weights (shape (2, 64));"
                                 " choose a block size that divides it, or exclude the layer")
    with pytest.raises(ValueError) as caught:
        check_nf4_compatible("fc", torch.empty(2, 64), 64, 4)
    assert str(caught.value) == ("layer 'fc': its 2 NF4 blocks do not split into `nf4_scaler_block_size`=4 scale"
                                 " blocks; choose a scaler block size that divides 2, or exclude the layer")
    assert check_nf4_compatible("fc", torch.empty(2, 64), 64, 2) is None


def test_a_bfloat16_digest_hashes_its_bits():
    values = [1.0, -2.5, 0.15625]  # exact in bfloat16: its bytes are the high half of float32's
    digest = hashlib.sha256()
    tensor_digest(digest, torch.tensor(values, dtype=torch.bfloat16))
    assert digest.hexdigest() == hashlib.sha256(b"".join(struct.pack("<f", v)[2:] for v in values)).hexdigest()


# ---------------------------------------------------------------------- the parity check
def test_parity_report_summary_and_dict_by_hand():
    rows = [{"layer": f"l{i}", "relative_error": 1e-3 * (6 - i), "sqnr_db": 40.0 + i} for i in range(6)]
    failed = ParityReport(weights_exact=False, weight_mismatches=list("abcdef"), relative_error=2e-5, sqnr_db=30.0,
                          fast_layers=["x"], layers=rows)
    assert failed.summary() == (
        "weights differ in ['a', 'b', 'c', 'd', 'e']; exact-path relative error 2.00e-05 (max 1e-05);"
        " int8-GEMM SQNR 30.0 dB (min 35); worst layers: l0 rel 6.00e-03 / 40.0 dB; l1 rel 5.00e-03 / 41.0 dB;"
        " l2 rel 4.00e-03 / 42.0 dB; l3 rel 3.00e-03 / 43.0 dB; l4 rel 2.00e-03 / 44.0 dB")
    assert failed.as_dict() == {"passed": False, "weights_exact": False, "relative_error": 2e-5, "sqnr_db": 30.0,
                                "fast_layers": ["x"], "max_relative_error": 1e-5, "min_sqnr_db": 35.0,
                                "kernels": None, "fallbacks": {}}
    chose = ParityReport(weights_exact=True, weight_mismatches=[], relative_error=0.0, sqnr_db=36.0,
                         fast_layers=["x"], kernels={"x": "fbgemm", "y": "dequantize"},
                         fallbacks={"y": "alone 30.0 dB"})
    assert chose.summary() == ("weights exact; exact-path relative error 0.00e+00 (max 1e-05); int8-GEMM SQNR 36.0 dB"
                               " (min 35); 1 layer(s) run exact instead of the int8 GEMM: y (alone 30.0 dB)")
    assert chose.as_dict()["kernels"] == {"x": "fbgemm", "y": "dequantize"}
    assert chose.as_dict()["fallbacks"] == {"y": "alone 30.0 dB"}
    passed = ParityReport(weights_exact=True, weight_mismatches=[], relative_error=None, sqnr_db=math.inf,
                          fast_layers=[], layers=rows)
    assert passed.summary() == "weights exact; outputs not checked (no inputs); int8-GEMM SQNR inf dB (min 35)"
    assert passed.as_dict()["sqnr_db"] is None and passed.as_dict()["passed"] is True  # inf is not JSON


def test_parity_figures_by_hand():
    assert relative_error(torch.zeros(3), torch.ones(3)) == pytest.approx(math.sqrt(3))  # a zero reference
    assert relative_error(torch.tensor([0.3, 0.4]), torch.tensor([0.3, 0.5])) == pytest.approx(0.2)
    assert sqnr_db(torch.tensor([10.0, 0.0]), torch.tensor([9.0, 0.0])) == pytest.approx(20.0)
    assert sqnr_db(torch.zeros(2), torch.zeros(2)) == math.inf
    output = {"a": torch.tensor([1.0]), "b": [torch.tensor([[2.0, 3.0]]), (torch.tensor([4.0]), torch.tensor([7]))]}
    assert flatten_outputs(output).tolist() == [1.0, 2.0, 3.0, 4.0]  # integer tensors left out
    with pytest.raises(ValueError) as caught:
        flatten_outputs({"ids": torch.tensor([1])})
    assert str(caught.value) == "the model's output holds no floating-point tensor to compare"


class _Skips(nn.Module):
    """An int8 model with dynamic int8 activations whose first layer (by name) never runs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a_unused, self.b_first, self.c_second = nn.Linear(16, 16), nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.c_second(torch.relu(self.b_first(x)))


def _dynamic_int8(model: nn.Module) -> nn.Module:
    round_to_nearest(model, QuantSpec(8, "channel"))
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            quantizer = DynamicTokenQuantizer()
            quantizer.enabled = True
            add_input_transform(layer, Stage.INPUT_QUANT, quantizer)
    return model


@needs_int8_gemm
def test_parity_uses_the_int8_gemm_where_training_quantized_activations(tmp_path):
    model = _dynamic_int8(_Skips())
    inputs = [torch.randn(8, 16, generator=torch.Generator().manual_seed(1))]
    export(model, tmp_path / "out", inputs=inputs)
    packed = read_packed(tmp_path / "out")
    report = check_parity(model, packed, inputs)  # backend "auto" by default
    assert report.fast_layers == ["a_unused", "b_first", "c_second"] and report.sqnr_db >= 35.0
    assert report.min_sqnr_db == 35.0 and report.max_relative_error == 1e-5 and report.passed
    assert report.relative_error <= 1e-6  # the exact path dequantizes
    # every layer that ran is measured alone, on the kernel the packed model runs
    assert sorted(row["layer"] for row in report.layers) == ["b_first", "c_second"]
    assert {row["kernel"] for row in report.layers} == {"fbgemm"}
    exact = check_parity(model, packed, inputs, backend="dequantize")
    assert exact.fast_layers == [] and exact.sqnr_db is None
    # each layer gets the input it received before its own (dynamic) activation quantization
    assert {row["kernel"] for row in exact.layers} == {"dequantize"}
    assert max(row["relative_error"] for row in exact.layers) <= 1e-6


class _Attends(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]  # called with a keyword argument


def test_parity_calls_each_layer_alone_with_its_keyword_arguments(tmp_path):
    model = _Attends()
    round_to_nearest(model, QuantSpec(8, "channel"))
    inputs = [torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1))]
    export(model, tmp_path / "out", inputs=inputs)
    report = check_parity(model, read_packed(tmp_path / "out"), inputs, backend="dequantize")
    assert [row["layer"] for row in report.layers][:1] and report.passed
    assert all(row["relative_error"] <= 1e-5 for row in report.layers)


def test_parity_feeds_each_layer_its_input_before_activation_quantization(tmp_path):
    # A token on [-2.5/256, 252.5/256]: step 1/256, and both ends at half a step (ties round to
    # even: codes -2 and 252). Quantized again it spans 254 steps, a new grid, so a layer fed the
    # already quantized input would quantize it a second time and differ from training.
    model = _dynamic_int8(nn.Sequential(nn.Linear(3, 2)))
    token = torch.tensor([[-2.5 / 256, 252.5 / 256, 100.3 / 256]])
    quantizer = DynamicTokenQuantizer()
    quantizer.enabled = True
    once = quantizer(token)
    assert once.tolist() == [[-2 / 256, 252 / 256, 100 / 256]] and not torch.equal(quantizer(once), once)
    export(model, tmp_path / "out", inputs=[token])
    report = check_parity(model, read_packed(tmp_path / "out"), [token], backend="dequantize")
    assert [row["layer"] for row in report.layers] == ["0"] and report.layers[0]["relative_error"] <= 1e-6


# ---------------------------------------------------------------------- fixed-range (min/max, mse) weight quantizers
def _fake_quantized_rows(rows, scales, bits=4):
    """Symmetric round-to-nearest by hand: each row on its own scale."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return [[min(max(round(v / s), qmin), qmax) * s for v in row] for row, s in zip(rows, scales)]


def test_mse_ranges_are_chosen_once_and_then_kept():
    rows = [[-1.7, 0.7, 0.9, 0.6, 0.7, 1.0, -0.3, -2.9], [0.75, 0.0, -0.5, 0.25, 0.0, -0.25, 0.5, -0.5]]
    weight = torch.tensor(rows)
    quantizer = WeightFakeQuantizer(QuantSpec(4, "channel"), weight_range="mse")
    # before the first forward, the grid it will choose: row 0 clipped to 0.9 of its range
    scales = [0.9 * 2.9 / 7.5, 0.75 / 7.5]
    assert torch.allclose(quantizer.qparams(weight)[0], torch.tensor(scales))
    quantizer.enabled = True
    out = quantizer(weight)
    assert torch.allclose(quantizer.clip, torch.tensor([0.9, 1.0]))
    assert torch.allclose(out, torch.tensor(_fake_quantized_rows(rows, scales)), atol=1e-6)
    # the ratios stay: the range follows the weights at that ratio
    doubled = weight * 2
    assert torch.allclose(quantizer.qparams(doubled)[0], torch.tensor(scales) * 2)
    assert torch.allclose(quantizer(doubled), out * 2, atol=1e-6)
    swapped = weight.flip(0)  # a fresh choice would clip the other row now; the kept ratios do not
    assert torch.allclose(quantizer.qparams(swapped)[0], torch.tensor([0.9 * 0.75 / 7.5, 2.9 / 7.5]))


def test_a_bfloat16_weight_is_quantized_in_float32():
    rows = [[3.0, -1.25, 0.5, 2.0], [0.375, -0.75, 1.5, 0.0]]  # exact in bfloat16
    quantizer = WeightFakeQuantizer(QuantSpec(4, "channel"))
    quantizer.enabled = True
    out = quantizer(torch.tensor(rows, dtype=torch.bfloat16))
    expected = torch.tensor(_fake_quantized_rows(rows, [3.0 / 7.5, 1.5 / 7.5]), dtype=torch.float32)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected.to(torch.bfloat16))


def test_quantizer_state_follows_the_weights_device():
    # fixed ranges (learned scales are a Parameter, which cannot move to the meta device)
    fixed = WeightFakeQuantizer(QuantSpec(4, "channel"), weight_range="mse")
    fixed.enabled = True
    fixed(torch.randn(2, 8, generator=torch.Generator().manual_seed(0)))  # ranges chosen on the CPU
    assert fixed.qparams(torch.empty(2, 8, device="meta"))[0].device.type == "meta"
    assert fixed(torch.empty(2, 8, device="meta")).device.type == "meta" and fixed.clip.device.type == "meta"
    started = WeightFakeQuantizer(QuantSpec(4, "channel"), learned=True)
    started.create_parameters(torch.empty(2, 8))
    started.enabled = True
    started(torch.randn(2, 8, generator=torch.Generator().manual_seed(0)))
    scale, zero_point = started.qparams(torch.empty(2, 8, device="meta"))
    assert scale.device.type == "meta" and zero_point.device.type == "meta"


def test_codes_are_clamped_to_the_grid():
    codes = quantize_codes(torch.tensor([[-10.0, 10.0, 2.4]]), torch.tensor([1.0]), torch.tensor([0]), QuantSpec(4, "channel"))
    assert codes.tolist() == [[-8, 7, 2]] and codes.dtype == torch.int8


def test_quantized_weights_of_recurrent_and_bfloat16_layers():
    model = nn.Sequential(nn.LSTM(8, 4))
    round_to_nearest(model, QuantSpec(8, "channel"))
    weights = quantized_weights(model)
    assert sorted(weights) == ["0.weight_hh_l0", "0.weight_ih_l0"]
    assert weights["0.weight_ih_l0"].shape == (16, 8) and weights["0.weight_hh_l0"].shape == (16, 4)
    half = nn.Sequential(nn.Linear(8, 4)).to(torch.bfloat16)
    quantizers = round_to_nearest(half, QuantSpec(8, "channel"))
    assert quantizers["0"].weight_range == "minmax" and quantizers["0"].owner == "round_to_nearest"
    packed = quantized_weights(half)["0"]
    assert packed.dtype == torch.bfloat16 and packed.dequantize().dtype == torch.bfloat16
    assert torch.equal(packed.dequantize(), half[0].weight)  # the effective (fake-quantized) weight


def test_grouped_grids_are_checked_per_recurrent_weight_and_name_the_layer():
    model = nn.Sequential(nn.LSTM(32, 32))  # weight_ih_l0 [128, 32], weight_hh_l0 [128, 32]
    assert sorted(round_to_nearest(model, QuantSpec(4, "group", 16))) == ["0.weight_hh_l0", "0.weight_ih_l0"]
    with pytest.raises(ValueError) as caught:
        round_to_nearest(nn.Sequential(nn.Linear(48, 4)), QuantSpec(4, "group", 32))
    assert str(caught.value) == ("`group_size`=32 does not divide the input size 48 of layer '0'; use group_size=16"
                                 " for it with an override, or add it to `exclude`")


# ---------------------------------------------------------------------- general bit packing
def _stream_words(codes, bits):
    """The little-endian bit stream of one row, by hand (Python ints), as signed int32 words."""
    stream = 0
    for i, code in enumerate(codes):
        stream |= (code + (1 << (bits - 1))) << (i * bits)
    count = -(-len(codes) * bits // 32)
    words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(count)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


@pytest.mark.parametrize("bits", [1, 3, 5, 7])
def test_general_packing_by_hand(bits):
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = [high if i % 3 else low for i in range(23)] + [high] * 9  # 32 codes; top bits of words set
    packed = pack_codes(torch.tensor(codes, dtype=torch.int8), bits)  # 1-D stays 1-D
    assert packed.shape == (-(-32 * bits // 32),) and packed.tolist() == _stream_words(codes, bits)
    assert unpack_codes(packed, bits, 32).tolist() == codes
    assert pack_codes(torch.tensor(codes, dtype=torch.int8, device="meta"), bits).device.type == "meta"


def test_packing_refuses_bad_codes_and_bit_widths():
    with pytest.raises(TypeError) as caught:
        pack_codes(torch.zeros(2, dtype=torch.int16), 4)
    assert str(caught.value) == "codes must be int8, got torch.int16"
    with pytest.raises(ValueError) as caught:
        pack_codes(torch.zeros(1, 2, 3, dtype=torch.int8), 4)
    assert str(caught.value) == "codes must be 1-D or 2-D, got shape (1, 2, 3)"
    for bits in (0, 9, True, 2.0):
        with pytest.raises(ValueError) as caught:
            pack_codes(torch.zeros(2, dtype=torch.int8), bits)
        assert str(caught.value) == f"bits must be an int from 1 to 8, got {bits!r}"


def test_weight_quantizer_defaults():
    quantizer = WeightFakeQuantizer(QuantSpec(8, "channel"))
    # `enabled` is recorded in the QAT callback's state as it is: False, not just falsy
    assert quantizer.enabled is False and quantizer.learned is False and quantizer.weight_range == "minmax"
    assert quantizer.log_scale is None and quantizer.clip is None and quantizer.initialized is False
    assert quantizer.zero_point is None and quantizer.start_state() == (False, None, None, None)


@pytest.mark.parametrize(
    ("width", "group_size", "fix"),
    [(512, 3, "use group_size=256"), (384, 256, "use group_size=128"), (192, 128, "use group_size=64"),
     (96, 64, "use group_size=32"), (80, 32, "use group_size=16"), (24, 16, "use group_size=8"),
     (12, 8, "use granularity='channel'")],
)
def test_a_group_size_that_does_not_divide_suggests_the_largest_that_does(width, group_size, fix):
    with pytest.raises(ValueError) as caught:
        check_divisible("fc", torch.empty(4, width), QuantSpec(4, "group", group_size))
    assert str(caught.value) == (f"`group_size`={group_size} does not divide the input size {width} of layer 'fc';"
                                 f" {fix} for it with an override, or add it to `exclude`")
    assert check_divisible("fc", torch.empty(4, width), QuantSpec(4, "channel")) is None


def test_attached_quantizers_refuse_a_layer_another_active_callback_quantizes():
    model = nn.Sequential(nn.Linear(8, 4), nn.LSTM(8, 8))
    layers = {"0": model[0], "1.weight_ih_l0": model[1], "1.weight_hh_l0": model[1]}
    specs = {name: QuantSpec(4, "group", 8) for name in layers}
    first = attach_weight_quantizers(layers, specs, learned=True, weight_range="mse", owner="qat-a",
                                     active_owners={"qat-a"})
    assert all(q.learned and q.weight_range == "mse" and q.owner == "qat-a" for q in first.values())
    assert [tuple(first[name].log_scale.shape) for name in layers] == [(4,), (32,), (32,)]  # a scale per 8 inputs
    assert get_weight_transform(model[1], Stage.FAKE_QUANT, "weight_hh_l0") is first["1.weight_hh_l0"]
    with pytest.raises(ValueError) as caught:
        attach_weight_quantizers({"0": model[0]}, {"0": QuantSpec(8)}, owner="qat-b", active_owners={"qat-a", "qat-b"})
    assert str(caught.value) == ("layer '0' is already fake-quantized by another QuantizationAwareTraining callback"
                                 " in this Trainer; give them disjoint `targets`/`exclude`")
    with pytest.raises(ValueError, match="layer '1.weight_hh_l0' is already fake-quantized"):
        attach_weight_quantizers({"1.weight_hh_l0": model[1]}, {"1.weight_hh_l0": QuantSpec(8)}, owner="qat-b",
                                 active_owners={"qat-a", "qat-b"})
    # a quantizer left by a callback that no longer trains this model is replaced
    second = attach_weight_quantizers({"0": model[0]}, {"0": QuantSpec(8)}, owner="qat-b", active_owners={"qat-b"})
    assert get_weight_transform(model[0], Stage.FAKE_QUANT) is second["0"] and second["0"].learned is False


def test_a_transform_without_an_owner_is_replaced():
    layer = nn.Linear(4, 2)
    add_weight_transform(layer, Stage.FAKE_QUANT, lambda weight: weight)  # put there by hand, no owner
    quantizers = attach_weight_quantizers({"fc": layer}, {"fc": QuantSpec(8)}, owner="qat", active_owners={"qat"})
    assert get_weight_transform(layer, Stage.FAKE_QUANT) is quantizers["fc"]


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [(dict(bits="8"), "bits"), (dict(bits=9), "bits"), (dict(granularity="row"), "granularity"),
     (dict(granularity="group", group_size="32"), "group_size"), (dict(granularity="group", group_size=1), "group_size"),
     (dict(granularity="channel", group_size=16), "group_size"),
     (dict(symmetric=1), "symmetric"), (dict(scale_dtype="float64"), "scale_dtype")],
)
def test_spec_errors_name_the_field(kwargs, argument):
    with pytest.raises(ArgumentError) as caught:
        QuantSpec(**kwargs)
    assert caught.value.argument == argument


def test_the_smallest_group_is_two():
    assert QuantSpec(4, "group", 2).group_size == 2


# ---------------------------------------------------------------------- grids by hand
def test_symmetric_grids_by_hand():
    scale, zero_point = choose_qparams(torch.tensor([[1.5, -3.0], [0.75, 0.0]]), QuantSpec(4, "channel"))
    assert torch.allclose(scale, torch.tensor([0.4, 0.1])) and scale.dtype == torch.float32
    assert zero_point.tolist() == [0, 0] and zero_point.dtype == torch.int32
    scale, _ = choose_qparams(torch.tensor([[1.5, -3.0]], dtype=torch.bfloat16), QuantSpec(4, "channel"))
    assert scale.dtype == torch.float32  # scales are float32 whatever the weight


def test_asymmetric_grids_keep_zero_on_the_grid_by_hand():
    int4 = QuantSpec(4, "channel", symmetric=False)
    # [0.5, 2]: the range is widened to [0, 2] so 0 is a code: scale 2/15, zero point -8
    scale, zero_point = choose_qparams(torch.tensor([[0.5, 2.0]]), int4)
    assert scale.item() == pytest.approx(2 / 15) and zero_point.tolist() == [-8] and zero_point.dtype == torch.int32
    # clipped to half the range: [-0.5, 1], scale 1.5/15 = 0.1, zero point -8 - round(-5) = -3
    scale, zero_point = choose_qparams(torch.tensor([[-1.0, 2.0]]), int4, clip=torch.tensor([0.5]))
    assert scale.item() == pytest.approx(0.1) and zero_point.tolist() == [-3]
    # float16 scales: 3/15 = 0.2 is stored as 0.199951171875
    scale, _ = choose_qparams(torch.tensor([[-1.0, 2.0]]), QuantSpec(4, "channel", symmetric=False, scale_dtype="float16"))
    assert scale.item() == 0.199951171875
    # bfloat16 rounds the scale 255.8925 / 255 = 1.0035 down to 1.0, so the low end would need
    # zero point -128 + 256 = 128: it is clamped to the grid's 127
    _, zero_point = choose_qparams(torch.tensor([[-255.8925, -1.0]]),
                                   QuantSpec(8, "tensor", symmetric=False, scale_dtype="bfloat16"))
    assert zero_point.tolist() == [127]
