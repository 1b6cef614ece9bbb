import warnings

import pytest
import torch

from lightning_compress.sparsity.masks import (
    _RADIX_MIN_SCORES,
    SparsityPattern,
    _kth_smallest,
    global_masks,
    layer_mask,
    pack_mask,
    unpack_mask,
)
from lightning_compress.sparsity.schedules import scheduled_sparsity

UNSTRUCTURED = SparsityPattern.parse("unstructured")
STRUCTURED = SparsityPattern.parse("structured")
TWO_FOUR = SparsityPattern.parse("2:4")


def test_cubic_schedule_matches_zhu_gupta_by_hand():
    # s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3 with s_i=0.1, s_f=0.9, t0=10, n dt=40.
    kwargs = dict(initial=0.1, final=0.9, start=10, end=50, update_every=10, kind="cubic")
    assert scheduled_sparsity(9, **kwargs) is None
    assert scheduled_sparsity(10, **kwargs) == pytest.approx(0.1)
    assert scheduled_sparsity(20, **kwargs) == pytest.approx(0.9 - 0.8 * 0.75**3)  # 0.5625
    assert scheduled_sparsity(29, **kwargs) == pytest.approx(0.5625)  # holds between updates
    assert scheduled_sparsity(30, **kwargs) == pytest.approx(0.9 - 0.8 * 0.5**3)  # 0.8
    assert scheduled_sparsity(40, **kwargs) == pytest.approx(0.9 - 0.8 * 0.25**3)  # 0.8875
    assert scheduled_sparsity(50, **kwargs) == pytest.approx(0.9)
    assert scheduled_sparsity(10_000, **kwargs) == pytest.approx(0.9)


def test_linear_and_one_shot_schedules():
    linear = dict(initial=0.0, final=0.8, start=0, end=100, update_every=25, kind="linear")
    assert [scheduled_sparsity(t, **linear) for t in (0, 30, 50, 99, 100)] == pytest.approx(
        [0.0, 0.2, 0.4, 0.6, 0.8]
    )
    one_shot = dict(initial=0.0, final=0.7, start=5, end=5, update_every=1, kind="one_shot")
    assert scheduled_sparsity(4, **one_shot) is None
    assert scheduled_sparsity(5, **one_shot) == 0.7


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_layer_mask_prunes_exact_count_of_smallest(sparsity):
    weight = torch.randn(37, 19)
    keep = layer_mask(weight, sparsity, UNSTRUCTURED)
    assert int((~keep).sum()) == round(sparsity * weight.numel())
    if 0 < sparsity:
        assert weight[~keep].abs().max() <= weight[keep].abs().min()


def test_large_global_masks_prune_exactly_the_smallest():
    # Over _RADIX_MIN_SCORES weights: the counts and the threshold of the radix select.
    g = torch.Generator().manual_seed(1)
    weights = {"a": torch.randn(300, 256, generator=g), "b": torch.randn(128, 300, generator=g).round(decimals=1)}
    keeps = global_masks(weights, 0.7, UNSTRUCTURED)
    pruned = torch.cat([w[~keeps[n]].abs() for n, w in weights.items()])
    kept = torch.cat([w[keeps[n]].abs() for n, w in weights.items()])
    assert pruned.numel() == round(0.7 * (300 * 256 + 128 * 300))
    assert pruned.max() <= kept.min()


def test_ties_are_broken_deterministically_with_exact_count():
    weight = torch.ones(4, 4)
    keep = layer_mask(weight, 0.5, UNSTRUCTURED)
    assert int((~keep).sum()) == 8
    assert torch.equal(keep, layer_mask(weight.clone(), 0.5, UNSTRUCTURED))


SCORE_SETS = {
    "gaussian magnitudes": lambda g: torch.randn(300_000, generator=g).abs(),
    # A pruned layer: most scores exactly 0, the rest spread over many exponents.
    "mostly zeros": lambda g: torch.where(torch.rand(200_000, generator=g) < 0.8, 0.0,
                                          torch.rand(200_000, generator=g) * 10.0 ** torch.randint(-6, 6, (200_000,), generator=g)),
    # Few distinct values: the k-th sits in a long run of ties.
    "ties": lambda g: torch.randint(0, 5, (100_000,), generator=g).float(),
    "denormals and infinity": lambda g: torch.cat([torch.full((70_000,), 1e-42), torch.rand(70_000, generator=g),
                                                   torch.full((10,), float("inf"))]),
    # sqrt(mean(NaN**2)) of a NaN channel may keep NaN's sign bit; kthvalue orders NaN last.
    "signed NaN": lambda g: torch.cat([torch.rand(70_000, generator=g), -torch.full((3,), float("nan"))]),
}


@pytest.mark.parametrize("name", SCORE_SETS)
def test_radix_select_equals_kthvalue(name):
    scores = SCORE_SETS[name](torch.Generator().manual_seed(0))
    assert scores.numel() >= _RADIX_MIN_SCORES  # the radix path, not the small-input fallback
    n = scores.numel()
    for k in (1, 2, n // 3, n // 2, n - 1, n):
        assert _same(_kth_smallest(scores, k), torch.kthvalue(scores, k).values), k


def _same(a, b):
    """Equal values, or both NaN (NaN's sign and payload are not part of the order)."""
    return bool(torch.equal(a, b) or (a.isnan() and b.isnan()))


@pytest.mark.parametrize("norm", [1, 2])
def test_structured_mask_zeroes_whole_output_channels_by_norm(norm):
    weight = torch.randn(10, 3, 3, 3)
    weight[[2, 7]] *= 0.01  # the two weakest filters
    keep = layer_mask(weight, 0.2, STRUCTURED, norm=norm)
    per_channel = keep.flatten(1)
    assert torch.equal(per_channel.all(1) | (~per_channel).all(1), torch.ones(10, dtype=torch.bool))
    assert sorted(torch.nonzero(~per_channel.all(1)).flatten().tolist()) == [2, 7]


def test_two_four_mask_keeps_two_in_every_group_along_input_dim():
    weight = torch.randn(16, 32)
    keep = layer_mask(weight, 0.5, TWO_FOUR)
    groups = keep.view(16, 8, 4)
    assert torch.equal(groups.sum(-1), torch.full((16, 8), 2))
    # Within each group the two largest magnitudes survive.
    magnitudes = weight.abs().view(16, 8, 4)
    kept_min = torch.where(groups, magnitudes, torch.inf).amin(-1)
    pruned_max = torch.where(~groups, magnitudes, -torch.inf).amax(-1)
    assert bool((kept_min >= pruned_max).all())


def test_two_four_on_conv_groups_input_channels():
    weight = torch.randn(6, 8, 3, 3)
    keep = layer_mask(weight, 0.5, TWO_FOUR)
    groups = keep.movedim(1, -1).reshape(-1, 4)
    assert torch.equal(groups.sum(-1), torch.full((groups.shape[0],), 2))


def test_gradual_two_four_prunes_only_candidates_and_is_monotone():
    weight = torch.randn(8, 16)
    quarter = layer_mask(weight, 0.25, TWO_FOUR)
    assert int((~quarter).sum()) == 32
    assert int((~quarter).view(8, 4, 4).sum(-1).max()) <= 2
    pruned_weight = weight * quarter
    final = layer_mask(pruned_weight, 0.5, TWO_FOUR)
    assert bool((final <= quarter).all())  # what was pruned stays pruned


def test_global_unstructured_uses_one_threshold_over_layers():
    weights = {"a": torch.randn(20, 10), "b": torch.randn(5, 10) * 10}
    masks = global_masks(weights, 0.6, UNSTRUCTURED)
    pruned = torch.cat([weights[n][~masks[n]].abs() for n in weights])
    kept = torch.cat([weights[n][masks[n]].abs() for n in weights])
    assert pruned.numel() == round(0.6 * 250)
    assert pruned.max() <= kept.min()
    # The small-magnitude layer carries most of the pruning.
    assert (~masks["a"]).float().mean() > (~masks["b"]).float().mean()


def test_global_structured_reaches_target_within_one_channel():
    weights = {"a": torch.randn(12, 8), "b": torch.randn(6, 16)}
    masks = global_masks(weights, 0.5, STRUCTURED)
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert 0 <= 96 - pruned < 16
    for name, mask in masks.items():
        rows = mask.all(1) | (~mask).all(1)
        assert bool(rows.all()), name


@pytest.mark.parametrize("pattern", [UNSTRUCTURED, STRUCTURED], ids=["unstructured", "structured"])
def test_global_pruning_that_empties_a_layer_warns_naming_it(pattern):
    # "small" holds 40 of 140 weights, all below every weight of "big": at 40% it loses all.
    weights = {"big": torch.rand(10, 10) + 1.0, "small": torch.rand(4, 10) * 1e-3}
    with pytest.warns(UserWarning, match=r"scope='global' pruned every weight of \['small'\]"):
        masks = global_masks(weights, 0.4, pattern)
    assert not masks["small"].any() and masks["big"].any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        global_masks(weights, 0.2, pattern)  # a part of "small" stays: no warning


def test_global_refuses_n_m():
    with pytest.raises(ValueError, match="scope='layer'"):
        global_masks({"a": torch.randn(4, 4)}, 0.5, TWO_FOUR)


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 4, 5)])
def test_mask_packing_round_trips(shape):
    mask = torch.rand(shape) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_mask(packed, shape), mask)


def test_mask_packing_bit_order_is_low_bit_first():
    mask = torch.tensor([True, False, False, False, False, False, False, False, False, True])
    assert pack_mask(mask).tolist() == [1, 2]


@pytest.mark.parametrize(
    "text, message",
    [("2:2", "1 <= N < M"), ("4:2", "1 <= N < M"), ("0:4", "1 <= N < M"), ("blocks", "unknown `pattern`")],
)
def test_bad_patterns(text, message):
    with pytest.raises(ValueError, match=message):
        SparsityPattern.parse(text)


@pytest.mark.parametrize("sparsity", [0.0, 0.35, 0.7, 1.0])
def test_global_masks_rank_layer_by_layer_exactly_as_over_the_concatenation(sparsity):
    # Reference: the `count` lowest magnitudes of all weights laid end to end, ties by
    # position (a stable sort). Rounded weights tie often, also across the layers.
    g = torch.Generator().manual_seed(2)
    weights = {"a": torch.randn(300, 200, generator=g).round(decimals=1),
               "b": torch.randn(64, 300, generator=g).round(decimals=1).to(torch.bfloat16),
               "c": torch.randn(7, 3, 5, generator=g).round(decimals=1)}
    keeps = global_masks(weights, sparsity, UNSTRUCTURED)
    scores = torch.cat([w.abs().float().flatten() for w in weights.values()])
    count = round(sparsity * scores.numel())
    expected = torch.ones_like(scores, dtype=torch.bool)
    expected[torch.sort(scores, stable=True).indices[:count]] = False
    got = torch.cat([keeps[name].flatten() for name in weights])
    assert torch.equal(got, expected)
    assert all(keeps[name].shape == w.shape and keeps[name].dtype == torch.bool for name, w in weights.items())
