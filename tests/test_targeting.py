import pytest
from torch import nn

from lightning_compress.core.targeting import select_layers, validate_targets

SUPPORTED = (nn.Linear, nn.Conv2d, nn.Embedding)
DEFAULT = (nn.Linear, nn.Conv2d)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(8, 8)
        self.value = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.stem = nn.Conv2d(1, 8, 3)
        self.encoder = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 2)


def select(targets=None, exclude=None):
    return list(select_layers(Net(), targets=targets, exclude=exclude, supported=SUPPORTED, default=DEFAULT))


def test_default_selects_default_types_in_model_order():
    assert select() == [
        "stem",
        "encoder.0.query",
        "encoder.0.value",
        "encoder.1.query",
        "encoder.1.value",
        "head",
    ]


def test_glob_matches_full_name_or_trailing_part():
    assert select(["query"]) == ["encoder.0.query", "encoder.1.query"]
    assert select(["encoder.1.*"]) == ["encoder.1.query", "encoder.1.value"]


def test_type_targets_and_excludes():
    assert select([nn.Embedding, "head"]) == ["embed", "head"]
    assert select(exclude=["encoder.*", nn.Conv2d]) == ["head"]


def test_glob_that_matches_nothing_lists_close_names():
    with pytest.raises(ValueError, match=r"'qurey' matches no module\. Close names: query"):
        select(["qurey"])
    with pytest.raises(ValueError, match=r"`exclude` pattern 'haed'.*Close names: head"):
        select(exclude=["haed"])


def test_glob_selecting_only_unsupported_layers_is_an_error():
    with pytest.raises(ValueError, match=r"'norm' matches only layers of unsupported types \(LayerNorm\)"):
        select(["norm"])


def test_excluding_everything_is_an_error():
    with pytest.raises(ValueError, match="selects no layer"):
        select(["head"], exclude=["head"])


@pytest.mark.parametrize(
    "targets, message",
    [
        ([nn.LayerNorm], "cannot compress"),
        ([""], "empty name pattern"),
        ([3], "layer types or name globs"),
        (3, "must be a list"),
    ],
)
def test_validate_targets(targets, message):
    with pytest.raises(ValueError, match=message):
        validate_targets("targets", targets, SUPPORTED)


def test_a_layer_with_several_weights_is_selected_and_excluded_weight_by_weight():
    """An attention layer with separate q/k/v weights (kdim/vdim other than embed_dim) and
    a recurrent layer are keyed one entry per weight; a glob in `targets` or `exclude` may
    name one weight (the fix a compatibility error suggests for one matrix)."""
    import pytest
    from torch import nn

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.cross = nn.MultiheadAttention(16, 2, kdim=8, vdim=8)
            self.rnn = nn.LSTM(4, 8, num_layers=2)
            self.fc = nn.Linear(4, 4)

    supported = (nn.Linear, nn.MultiheadAttention, nn.LSTM)

    def keys(targets=None, exclude=None):
        return list(select_layers(Mixed(), targets=targets, exclude=exclude, supported=supported, default=supported))

    projections = ["cross.q_proj_weight", "cross.k_proj_weight", "cross.v_proj_weight"]
    matrices = ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l1", "rnn.weight_hh_l1"]
    assert keys() == projections + ["cross.out_proj"] + matrices + ["fc"]
    assert keys(exclude=["rnn.weight_hh_l0", "cross.out_proj"]) == projections + [
        "rnn.weight_ih_l0", "rnn.weight_ih_l1", "rnn.weight_hh_l1", "fc"]
    assert keys(targets=["weight_hh_*", "cross"]) == projections + ["rnn.weight_hh_l0", "rnn.weight_hh_l1"]
    assert keys(targets=[nn.LSTM], exclude=["weight_ih_l1"]) == ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_hh_l1"]
    with pytest.raises(ValueError, match="selects no layer"):
        keys(targets=["rnn"], exclude=["rnn"])
    with pytest.raises(ValueError, match=r"pattern 'rnn\.weight_hh_l9' matches no module\. Close names: rnn\.weight_hh_l1"):
        keys(targets=["rnn.weight_hh_l9"])


def test_a_target_error_in_a_trainer_names_the_callback_it_came_from():
    """Two callbacks of one class (each with its own ``name``) may target apart: the error
    says which one's ``targets`` matched nothing."""
    import torch

    from lightning_compress import MagnitudePruning, QuantizationAwareTraining
    from tests.conftest import TinyRegressor, make_trainer, tiny_loader

    cases = [
        ([QuantizationAwareTraining("int8", targets=["fc1"], name="first"),
          QuantizationAwareTraining("int4", group_size=8, targets=["fc_2"], name="second")],
         r"^QuantizationAwareTraining\(name='second'\): `targets` pattern 'fc_2' matches no module\. Close names: fc2"),
        ([MagnitudePruning(0.5, targets=["fc1"], exclude=["fc1"])],
         r"^MagnitudePruning: `targets` selects no layer of TinyRegressor"),
    ]
    for callbacks, message in cases:
        torch.manual_seed(0)
        with pytest.raises(ValueError, match=message):
            make_trainer(max_steps=1, callbacks=callbacks).fit(TinyRegressor(), tiny_loader(batches=1))


def test_a_name_holding_glob_characters_is_matched_as_written():
    """A layer named 'fc[1]' (an nn.ModuleDict key): the compatibility error suggests
    exclude=['blocks.fc[1]'], which as a glob matched nothing ('[1]' is a character class)
    and was refused with 'Close names: blocks.fc[1]'. The name as written matches it, and
    as the last part of a longer name too; globs still work."""
    from lightning_compress import MagnitudePruning, QuantizationAwareTraining
    from tests.conftest import TinyRegressor, make_trainer, tiny_loader

    class Odd(TinyRegressor):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleDict({"fc[1]": nn.Linear(4, 4), "fc?": nn.Linear(4, 4)})

        def forward(self, x):
            return super().forward(x) + 0 * self.blocks["fc?"](self.blocks["fc[1]"](x[:, 0, :4])).sum()

    def selected(**options):
        return list(select_layers(Odd(), supported=(nn.Linear,), default=(nn.Linear,), **options))

    assert selected(targets=None, exclude=["blocks.fc[1]", "blocks.fc?"]) == ["fc1", "fc2"]
    assert selected(targets=["blocks.fc[1]"], exclude=None) == ["blocks.fc[1]"]
    assert selected(targets=["fc[1]"], exclude=None) == ["fc1", "blocks.fc[1]"]  # as a glob and as written
    assert selected(targets=["blocks.fc[?]"], exclude=None) == ["blocks.fc?"]  # still a glob
    model = Odd()
    qat = QuantizationAwareTraining("int8", targets=[nn.Linear], overrides={"blocks.fc[1]": {"bits": 4}})
    pruning = MagnitudePruning(0.5, exclude=["blocks.fc[1]"], schedule="one_shot", start_step=0)
    make_trainer(max_steps=1, callbacks=[qat, pruning]).fit(model, tiny_loader(batches=1))
    assert qat.layer_specs["blocks.fc[1]"].bits == 4 and qat.layer_specs["fc1"].bits == 8
    assert (model.blocks["fc[1]"].weight == 0).float().mean() < 0.25  # excluded from pruning (int4 rounds 1 to 0)
    assert (model.blocks["fc?"].weight == 0).float().mean() == 0.5
