"""Per-layer sensitivity, the bit-budget solver, the mixed-precision recipe and the
``lightning-compress sensitivity`` command.

Deltas are checked against the loss of a model quantized (or pruned) by hand in the test;
the solver against brute force over every assignment; the recipe by training with it.
"""

from __future__ import annotations

import copy
import csv
import itertools
import math
import re
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn import functional as F

import lightning_compress.sensitivity
from lightning_compress.callbacks.qat import QuantizationAwareTraining
from lightning_compress.cli import main
from lightning_compress.core.transforms import Stage, get_weight_transform, is_transformed
from lightning_compress.core.validate import ArgumentError
from lightning_compress.quant.config import QATConfig
from lightning_compress.quant.fake_quant import as_matrix, choose_qparams, fake_quantize
from lightning_compress.quant.spec import QuantSpec
from lightning_compress.quant.weights import round_to_nearest
from lightning_compress.recipes import RecipeError, load_recipe
from lightning_compress.sensitivity import (
    COLUMNS,
    TABLE_KEY,
    SensitivityReport,
    SensitivityRow,
    allocate_bits,
    layer_sensitivity,
    mixed_precision_recipe,
)
from lightning_compress.sensitivity import budget
from tests.cli_models import RecipeData, RecipeMLP
from tests.conftest import make_trainer
from tests.wandb_offline import read_offline_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These models are tiny: on a busy 2-core machine two OpenMP threads made them 40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Fragile(pl.LightningModule):
    """Three Linear layers; ``b`` has one input column 30x larger than the rest, so on a
    3-bit per-channel grid its other weights round to zero: the known fragile layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)
        with torch.no_grad():
            self.b.weight[:, 0] *= 30

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)  # outside a Trainer this would warn: the default loss silences it
        return loss


def fragile_batches(model, count=3):
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        x = torch.randn(16, 16, generator=generator)
        with torch.no_grad():
            y = model(x).argmax(1)
        y[:4] = torch.randint(0, 4, (4,), generator=generator)
        out.append((x, y))
    return out


def hand_loss(model, batches):
    with torch.no_grad():
        return math.fsum(float(F.cross_entropy(model(x), y).double()) for x, y in batches) / len(batches)


def quantized_by_hand(model, layer, bits, group_size=None):
    copied = copy.deepcopy(model)
    weight = getattr(copied, layer).weight
    spec = QuantSpec(bits, "channel" if group_size is None else "group", group_size)
    scale, zero_point = choose_qparams(as_matrix(weight.detach()), spec)
    with torch.no_grad():
        weight.copy_(fake_quantize(as_matrix(weight.detach()), scale, zero_point, spec).view_as(weight))
    return copied


@pytest.fixture(scope="module")
def fragile():
    model = Fragile()
    batches = fragile_batches(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "You are trying to self.log()" warning either
        report = layer_sensitivity(model, batches, bits=(8, 4, 3), sparsities=(0.5,), group_size=8)
    return model, batches, report


# ---------------------------------------------------------------------- measurement
def test_the_fragile_layer_ranks_first_and_deltas_match_a_hand_computation(fragile):
    model, batches, report = fragile
    assert [layer for layer, _ in report.ranking(bits=3)][0] == "b"
    assert report.delta("b", bits=3) > 10 * max(report.delta("a", bits=3), report.delta("c", bits=3))
    baseline = hand_loss(model, batches)
    assert report.baseline == baseline
    for layer, bits in (("b", 3), ("a", 4), ("c", 8)):
        expected = hand_loss(quantized_by_hand(model, layer, bits, group_size=8), batches) - baseline
        assert report.delta(layer, bits=bits) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # Pruning rows: half of a's weights, the smallest magnitudes, set to zero by hand.
    pruned = copy.deepcopy(model)
    weight = pruned.a.weight
    with torch.no_grad():
        weight.view(-1)[weight.abs().view(-1).argsort()[: weight.numel() // 2]] = 0
    assert report.delta("a", sparsity=0.5) == pytest.approx(hand_loss(pruned, batches) - baseline, rel=1e-12)
    rows = [(r.layer, r.params, r.bits, r.sparsity) for r in report.rows]
    assert rows[:4] == [("a", 512, 8, 0.0), ("a", 512, 4, 0.0), ("a", 512, 3, 0.0), ("a", 512, None, 0.5)]
    assert report.layers == {"a": 512, "b": 1024, "c": 128}


def test_kl_reference_matches_a_hand_computation(fragile):
    model, batches, _ = fragile
    report = layer_sensitivity(model, batches, bits=(4,), reference="kl", targets=["b"])
    assert [r.layer for r in report.rows] == ["b"] and report.baseline == 0.0
    quantized = quantized_by_hand(model, "b", 4)
    with torch.no_grad():
        kls = [F.kl_div(F.log_softmax(quantized(x).double(), -1), F.log_softmax(model(x).double(), -1),
                        log_target=True, reduction="batchmean") for x, _ in batches]
    assert report.delta("b", bits=4) == pytest.approx(float(sum(kls)) / len(kls), rel=1e-9)


def test_the_model_is_restored_exactly_even_after_an_error():
    model = Fragile()
    batches = fragile_batches(model, 2)
    model.train()
    model.c.eval()  # mixed modes come back as they were
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer_sensitivity(model, batches, bits=(4, 2), sparsities=(0.3, 0.9))
    calls = []

    def failing(module, batch):
        calls.append(1)
        if len(calls) == 5:  # in the middle of a candidate of layer b
            raise RuntimeError("boom")
        return F.cross_entropy(module(batch[0]), batch[1])

    with pytest.raises(RuntimeError, match="boom"):
        layer_sensitivity(model, batches, failing, bits=(4, 3))
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(is_transformed(m) for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, True, False]
    assert "log" not in model.__dict__ and "log_dict" not in model.__dict__


def test_layers_under_compression_are_refused_and_kept():
    model = Fragile()
    quantizers = round_to_nearest(model, QuantSpec(8), targets=["a"])
    with pytest.raises(ValueError, match="layer 'a' already has a FAKE_QUANT stage"):
        layer_sensitivity(model, fragile_batches(model, 1), bits=(4,))
    assert get_weight_transform(model.a, Stage.FAKE_QUANT) is quantizers["a"]
    # Pruning candidates on the other layers still work, and leave a's quantizer alone.
    report = layer_sensitivity(model, fragile_batches(model, 1), bits=(), sparsities=(0.5,), exclude=["a"])
    assert [r.layer for r in report.rows] == ["b", "c"] and get_weight_transform(model.a, Stage.FAKE_QUANT) is quantizers["a"]


class EveryKind(nn.Module):
    """One layer of each kind QAT quantizes: Embedding, Conv, attention, LSTM, Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.conv = nn.Embedding(10, 4), nn.Conv1d(4, 8, 3, padding=1)
        self.attn, self.rnn = nn.MultiheadAttention(8, 2, batch_first=True), nn.LSTM(8, 8, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, ids):
        x = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        x, _ = self.rnn(self.attn(x, x, x)[0])
        return self.head(x)


def test_every_layer_kind_is_measured_restored_and_planned():
    model = EveryKind()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [nn.Embedding, nn.Conv1d, nn.MultiheadAttention, nn.LSTM, nn.Linear]
    batches = [torch.randint(0, 10, (2, 6), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    report = layer_sensitivity(model, batches, bits=(8, 2), sparsities=(0.5,), reference="kl", targets=kinds)
    assert list(report.layers) == ["emb", "conv", "attn", "attn.out_proj", "rnn.weight_ih_l0", "rnn.weight_hh_l0", "head"]
    assert all(row.delta > 0 for row in report.rows)  # a KL divergence, and every case changes the outputs
    assert all(report.delta(layer, bits=2) > report.delta(layer, bits=8) for layer in report.layers)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(is_transformed(m) for m in model.modules())
    recipe = mixed_precision_recipe(report, 5.0)  # loads: types are written as import paths
    assert recipe["qat"]["targets"] == [f"torch.nn.{kind.__name__}" for kind in kinds]


# ---------------------------------------------------------------------- validation
def _model():
    return Fragile()


def _batches():
    return fragile_batches(_model(), 1)


BAD_MEASUREMENTS = [
    (dict(batches=[]), "batches", "is empty"),
    (dict(batches=torch.randn(4, 16)), "batches", "iterable of batches"),
    (dict(bits=(9,)), "bits", "from 2 to 8"),
    (dict(bits=(1, 4)), "bits", "from 2 to 8"),
    (dict(bits=(4, 4)), "bits", "twice"),
    (dict(bits=(), sparsities=()), "bits", "at least one candidate"),
    (dict(sparsities=(1.0,)), "sparsities", "in (0, 1)"),
    (dict(sparsities=(0,)), "sparsities", "in (0, 1)"),
    (dict(group_size=1), "group_size", "int >= 2"),
    (dict(group_size=True), "group_size", "int >= 2"),
    (dict(reference="mse"), "reference", "choose one of ('loss', 'kl')"),
    (dict(loss_fn="cross_entropy"), "loss_fn", "a function"),
    (dict(reference="kl", loss_fn=lambda m, b: m(b[0]).sum()), "loss_fn", "drop one"),
    (dict(model=nn.Sequential(nn.Linear(16, 4))), "loss_fn", "reference='kl'"),
    (dict(model="Fragile"), "model", "nn.Module"),
    (dict(targets=[nn.ReLU]), "targets", "cannot compress"),
    (dict(exclude=[""]), "exclude", "empty name pattern"),
]


@pytest.mark.parametrize(("changes", "argument", "fragment"), BAD_MEASUREMENTS,
                         ids=[f"{a}-{i}" for i, (_, a, _) in enumerate(BAD_MEASUREMENTS)])
def test_bad_measurement_arguments_name_the_argument(changes, argument, fragment):
    kwargs = {"model": _model(), "batches": _batches(), **changes}
    with pytest.raises(ArgumentError, match=re.escape(fragment)) as caught:
        layer_sensitivity(**kwargs)
    assert caught.value.argument == argument


def test_a_float_model_whose_loss_is_not_finite_on_a_batch_is_refused_naming_it():
    # A new user's trial: a batch with every label ignored gave nan for the baseline and every
    # delta, no warning, then an IndexError from the budget's solver.
    batches = fragile_batches(_model(), 3)
    batches[1][1][:] = -100
    with pytest.raises(ArgumentError, match=r"the float model's loss on batch\(es\) \[1\] \(counting from 0\) is not"
                                            r" finite.*labels are all ignored") as caught:
        layer_sensitivity(_model(), batches)
    assert caught.value.argument == "batches"
    batches = fragile_batches(_model(), 2)
    batches[0] = (torch.full_like(batches[0][0], float("inf")), batches[0][1])
    with pytest.raises(ArgumentError, match=r"the float model's outputs on batch\(es\) \[0\].*masked vocabulary"):
        layer_sensitivity(_model(), batches, reference="kl")


def test_ranking_names_what_was_not_measured(fragile):
    _, _, report = fragile
    assert [layer for layer, _ in report.ranking(bits=8)] and report.ranking(sparsity=0.5)
    for kwargs, argument, message in [(dict(bits=2), "bits", r"bits=2 was not measured; the report has \[8, 4, 3\]"),
                                      (dict(sparsity=0.7), "sparsity", r"sparsity=0.7 was not measured"),
                                      (dict(bits=4, sparsity=0.5), "sparsity", r"rank bits=4 or sparsity=0.5, not both")]:
        with pytest.raises(ArgumentError, match=message) as caught:
            report.ranking(**kwargs)
        assert caught.value.argument == argument
    pruning_only = SensitivityReport([SensitivityRow("x", "Linear", 4, None, 0.5, 0.1)], "loss", 0.0, (), (0.5,),
                                     None, None, None, 1)
    with pytest.raises(ArgumentError, match=r"measured no bit widths, only sparsities \[0.5\]"):
        pruning_only.ranking()
    assert pruning_only.ranking(sparsity=0.5) == [("x", 0.1)]
    # A candidate whose delta is not finite is no choice; the others still are.
    # The least average a message names is rounded up, so passing it is accepted (26/7 bits).
    inf = float("inf")
    tight = toy_report([1, 6], [[0, inf, inf], [0, 1, 2]])
    with pytest.raises(ArgumentError, match=r"the fewest bits average 3.715 \(rounded up\)"):
        allocate_bits(tight, 3.714)
    assert allocate_bits(tight, 3.715).bits == {"layer0": 8, "layer1": 3}
    # (4 bits each would fit 4.0 exactly: layer1 cannot take 4)
    assert allocate_bits(toy_report([10, 20], [[0, 1, 2], [0, float("nan"), 2]]), 4.0).bits == {"layer0": 4, "layer1": 3}
    broken = toy_report([10, 20, 30], [[0, 1, 2], [0, float("nan"), 2], [0, 3, 4]])
    assert [layer for layer, _ in broken.ranking(bits=4)] == ["layer1", "layer2", "layer0"]  # nan: broke the loss


def test_layer_problems_name_the_layer():
    with pytest.raises(ValueError, match=r"`group_size`=12 does not divide the input size 16 of layer 'a'; every layer"
                                         r" is measured on one grid: leave it out"):
        layer_sensitivity(_model(), _batches(), group_size=12)
    with pytest.raises(ValueError, match="pattern 'nope' matches no module"):
        layer_sensitivity(_model(), _batches(), targets=["nope"])

    class NoLoss(Fragile):
        def training_step(self, batch, batch_idx):
            return None

    with pytest.raises(ArgumentError, match="training_step returned None") as caught:
        layer_sensitivity(NoLoss(), _batches())
    assert caught.value.argument == "loss_fn"


def toy_report(params, deltas, bits=(8, 4, 3), group_size=None):
    rows = [SensitivityRow(f"layer{i}", "Linear", n, b, 0.0, deltas[i][j])
            for i, n in enumerate(params) for j, b in enumerate(bits)]
    return SensitivityReport(rows, "loss", 1.0, tuple(bits), (), group_size, None, None, 1)


BAD_BUDGETS = [
    (dict(budget_bits=2.9), "budget_bits", "below the smallest candidate (3 bits)"),
    (dict(budget_bits=33), "budget_bits", "(0, 32]"),
    (dict(budget_bits="4"), "budget_bits", "(0, 32]"),
    (dict(budget_bits=float("nan")), "budget_bits", "(0, 32]"),
    (dict(report=None), "report", "SensitivityReport"),
    (dict(report=SensitivityReport([], "loss", 0.0, (), (0.5,), None, None, None, 1)), "report", "bit-width candidates"),
    (dict(report=SensitivityReport([SensitivityRow("x", "Linear", 4, 8, 0.0, 0.0)], "loss", 0.0, (8, 4), (), None, None, None, 1)),
     "report", "no row for some of the bits (8, 4) of layers ['x']"),
    (dict(report=toy_report([10, 20], [[0, 1, 2], [float("nan"), float("inf"), float("nan")]])), "report",
     "every candidate of ['layer1'] gave a delta (loss or KL) that is not finite"),
    (dict(report=toy_report([10, 20], [[0, 1, 2], [0, 1, float("inf")]]), budget_bits=3.5), "budget_bits",
     "`budget_bits`=3.5 cannot be met: without the candidates whose delta is not finite, the fewest bits average 3.667 (rounded up)"),
    (dict(base="int4"), "base", "a recipe as a dict"),
    (dict(base={"qat": {"group_size": 64}}), "base", "sets ['group_size']"),
    (dict(base={"qat": "int4"}), "base", "dict of QAT settings"),
]


@pytest.mark.parametrize(("changes", "argument", "fragment"), BAD_BUDGETS,
                         ids=[f"{a}-{i}" for i, (_, a, _) in enumerate(BAD_BUDGETS)])
def test_bad_budget_arguments_name_the_argument(changes, argument, fragment):
    kwargs = {"report": toy_report([10, 20], [[0, 1, 2], [0, 1, 2]]), "budget_bits": 4.0, **changes}
    with pytest.raises(ArgumentError, match=re.escape(fragment)) as caught:
        mixed_precision_recipe(**kwargs)
    assert caught.value.argument == argument


def test_a_bad_base_is_checked_as_a_recipe():
    with pytest.raises(RecipeError, match="qat.start_stp"):
        mixed_precision_recipe(toy_report([1], [[0, 1, 2]]), 4.0, base={"qat": {"start_stp": 3}})


# ---------------------------------------------------------------------- budget solver
@pytest.mark.parametrize("seed", range(6))
def test_the_solver_agrees_with_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    params = [int(n) for n in torch.randint(5, 400, (4,), generator=generator)]
    bits = (8, 4, 3)
    # Increasing as bits drop, plus noise that can make them negative or out of order.
    deltas = [[float(v) for v in torch.rand(3, generator=generator).cumsum(0) - 0.3 * torch.rand(1, generator=generator)]
              for _ in params]
    report = toy_report(params, deltas, bits)
    total = sum(params)
    for budget_bits in [3.0, 3.1, 3.5, 4.0, 4.4, 5.0, 5.9, 6.5, 7.75, 8.0, 12.0]:
        best = min(
            (sum(deltas[i][bits.index(b)] for i, b in enumerate(choice)), choice)
            for choice in itertools.product(bits, repeat=len(params))
            if sum(n * b for n, b in zip(params, choice)) <= budget_bits * total
        )
        allocation = allocate_bits(report, budget_bits)
        assert allocation.estimated_delta == pytest.approx(best[0], abs=1e-12), (budget_bits, best, allocation)
        assert allocation.average_bits <= budget_bits and allocation.exact
        chosen = sum(deltas[i][bits.index(b)] for i, b in enumerate(allocation.bits.values()))
        assert chosen == pytest.approx(allocation.estimated_delta, abs=1e-12)


def test_the_solver_at_the_limits_and_beats_greedy():
    params = [100, 37, 250, 13]
    deltas = [[0.0, 0.5, 2.0], [0.01, 0.2, 0.3], [0.0, 0.1, 0.4], [0.02, 0.9, 5.0]]
    report = toy_report(params, deltas)
    assert set(allocate_bits(report, 8.0).bits.values()) == {8}  # deltas rise as bits drop: all at the top
    assert set(allocate_bits(report, 3.0).bits.values()) == {3}  # exactly the smallest candidate fits
    # Greedy by loss per bit saved moves layer0 (1.0 for 4000 bits) before layer1 (0.5 for
    # 400 bits) and stops at 1.0; saving the 300 bits needed costs only 0.5 on layer1.
    report = toy_report([1000, 100], [[0.0, 1.0, 5.0], [0.0, 0.5, 0.6]])
    allocation = allocate_bits(report, (8 * 1100 - 300) / 1100)
    assert allocation.bits == {"layer0": 8, "layer1": 4} and allocation.estimated_delta == 0.5


def test_a_thinned_search_still_meets_the_budget(monkeypatch):
    monkeypatch.setattr(budget, "MAX_FRONT", 3)
    generator = torch.Generator().manual_seed(3)
    params = [int(n) for n in torch.randint(5, 400, (7,), generator=generator)]
    report = toy_report(params, [sorted(torch.rand(3, generator=generator).tolist()) for _ in params])
    allocation = allocate_bits(report, 4.6)
    assert allocation.average_bits <= 4.6 and not allocation.exact


# ---------------------------------------------------------------------- recipe
def test_overrides_give_each_layer_its_bits_even_when_names_end_alike():
    # QAT takes the first glob matching a name or its trailing part: "head" also matches
    # "block.head", and "x[1]" is a glob character class.
    bits = {"head": 3, "block.head": 4, "deep.block.head": 8, "x[1]": 8, "other": 4, "more": 4}
    report = SensitivityReport([SensitivityRow(name, "Linear", 10, b, 0.0, 0.0) for name in bits for b in (8, 4, 3)],
                               "loss", 0.0, (8, 4, 3), (), None, None, None, 1)
    overrides = budget._overrides(bits, main=4)
    config = QATConfig(4, overrides=overrides)
    assert {name: config.spec_for(name)[0].bits for name in bits} == bits
    assert list(overrides)[0] == "deep.block.head" and "x[[]1]" in overrides and "other" not in overrides
    assert report.layers == dict.fromkeys(bits, 10)


def test_the_written_recipe_loads_and_trains_with_the_chosen_bits(tmp_path):
    # RecipeMLP's layers; net.0 is fragile at 3 and 4 bits, net.4 is tiny.
    params = {"net.0": 128 * 128, "net.2": 128 * 128, "net.4": 8 * 128}
    deltas = {"net.0": [0.0, 0.5, 3.0], "net.2": [0.0, 0.01, 0.05], "net.4": [0.0, 0.2, 0.4]}
    report = SensitivityReport(
        [SensitivityRow(name, "Linear", params[name], b, 0.0, deltas[name][j]) for name in params for j, b in enumerate((8, 4, 3))],
        "loss", 2.0, (8, 4, 3), (), 32, ("net.*",), None, 2,
    )
    recipe = mixed_precision_recipe(report, 6.0, base={"qat": {"start_step": 0}, "export": {"dirpath": str(tmp_path / "packed")}})
    chosen = allocate_bits(report, 6.0)
    # net.0 at 8 leaves 6 * 33792 - 8 * 16384 = 71680 bits: net.2 at 3 and net.4 at 8 fit (delta 0.05).
    assert chosen.bits == {"net.0": 8, "net.2": 3, "net.4": 8} and chosen.estimated_delta == pytest.approx(0.05)
    assert chosen.average_bits == pytest.approx((8 * 16384 + 3 * 16384 + 8 * 1024) / 33792)
    path = tmp_path / "mixed_precision.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(recipe)))
    loaded = load_recipe(path)
    assert loaded.config["qat"] == {"weights": 8, "group_size": 32, "start_step": 0, "targets": ["net.*"],
                                    "overrides": {"net.2": {"bits": 3}}}
    callbacks = loaded.callbacks()
    (qat,) = [c for c in callbacks if isinstance(c, QuantizationAwareTraining)]
    pl.seed_everything(0)
    model = RecipeMLP()
    trainer = make_trainer(max_steps=2, callbacks=callbacks)
    trainer.fit(model, RecipeData(samples=128))
    assert trainer.global_step == 2
    assert {name: spec.bits for name, spec in qat.layer_specs.items()} == chosen.bits
    assert {spec.group_size for spec in qat.layer_specs.values()} == {32}
    assert (tmp_path / "packed" / "compression.json").exists()


# ---------------------------------------------------------------------- command line
@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    for variable in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home" / variable.lower()))
    for variable in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_MODE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no.netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_the_command_writes_the_table_csv_recipe_and_wandb_table(tmp_path, monkeypatch, capsys, wandb_env):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    torch.manual_seed(0)
    trained = RecipeMLP(hidden=32)
    torch.save({"state_dict": trained.state_dict(), "hyper_parameters": {"hidden": 32}}, tmp_path / "float.ckpt")
    argv = ["sensitivity", "--model", "tests.cli_models.RecipeMLP", "--checkpoint", "float.ckpt", "--data",
            "tests.cli_models.RecipeData", "--batches", "2", "--group-size", "32", "--sparsity", "0.5",
            "--budget-bits", "4.5", "-o", "out", "--wandb"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    dm = RecipeData()
    dm.setup("validate")
    expected = layer_sensitivity(trained, list(dm.val_dataloader())[:2], group_size=32, sparsities=(0.5,))
    assert expected.table() in out
    with open(tmp_path / "out" / "sensitivity.csv") as handle:
        rows = list(csv.reader(handle))
    assert tuple(rows[0]) == COLUMNS
    assert [(r[0], r[3], float(r[4]), float(r[5])) for r in rows[1:]] == [
        (e.layer, "" if e.bits is None else str(e.bits), e.sparsity, e.delta) for e in expected.rows]
    assert load_recipe(tmp_path / "out" / "mixed_precision.yaml").config == mixed_precision_recipe(expected, 4.5)
    assert ("sensitivity.png not written: matplotlib is not installed" in out) != (tmp_path / "out" / "sensitivity.png").exists()

    run_dir = Path(re.search(r"W&B run written to (\S+)", out).group(1))
    run = read_offline_run(run_dir if run_dir.is_absolute() else tmp_path / run_dir)
    (table,) = run["tables"][TABLE_KEY]
    assert table["columns"] == list(COLUMNS)
    assert table["data"] == [list(row.values()) for row in expected.rows]
    assert run["config"]["compression_recipe"] == mixed_precision_recipe(expected, 4.5)

    # A second run does not replace the files unless told to.
    assert main(argv[:-1]) == 2
    assert "already exist; pass --overwrite" in capsys.readouterr().err
    assert main([*argv[:-1], "--overwrite", "--bits", "9"]) == 2
    assert "`bits` must be 'int2'..'int8'" in capsys.readouterr().err
    assert main(["sensitivity", "--model", "tests.cli_models.RecipeMLP", "-o", "other"]) == 2
    assert "no batches: pass --data" in capsys.readouterr().err
    # Without --budget-bits the earlier run's recipe (measured on other candidates) is no
    # longer beside the table: refused without --overwrite, removed with it.
    without_budget = [a for a in argv[:-1] if a not in ("--budget-bits", "4.5")]
    assert main(without_budget) == 2
    assert "mixed_precision.yaml already exist" in capsys.readouterr().err.replace("exists", "exist")
    assert main([*without_budget, "--overwrite"]) == 0
    assert not (tmp_path / "out" / "mixed_precision.yaml").exists() and (tmp_path / "out" / "sensitivity.csv").exists()


def test_the_command_refuses_a_budget_before_measuring_and_keeps_the_table_when_the_choice_fails(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    argv = ["sensitivity", "--model", "tests.cli_models.RecipeMLP", "--data", "tests.cli_models.RecipeData",
            "--batches", "1", "--bits", "8", "4"]
    measured = []
    real = lightning_compress.sensitivity.layer_sensitivity
    monkeypatch.setattr(lightning_compress.sensitivity, "layer_sensitivity",
                        lambda *a, **k: measured.append(1) or real(*a, **k))
    assert main([*argv, "--budget-bits", "2", "-o", "a"]) == 2  # no assignment of 8 and 4 bits averages 2
    assert "`budget_bits`=2.0 is below the smallest candidate (4 bits)" in capsys.readouterr().err
    assert measured == [] and not (tmp_path / "a").exists()
    # An -o that cannot be written stops the command before the measurement, naming -o.
    (tmp_path / "a_file").write_text("mine")
    for output, why in (("a_file", "is a file, not a directory"), ("a_file/sub", "cannot be written (Not a directory)")):
        assert main([*argv, "-o", output]) == 2
        assert f"-o {output} {why}" in capsys.readouterr().err
    assert measured == [] and (tmp_path / "a_file").read_text() == "mine"

    def no_choice(report, budget):
        raise ArgumentError("report", "no choice")

    monkeypatch.setattr(lightning_compress.sensitivity, "allocate_bits", no_choice)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mixed_precision.yaml").write_text("qat: {}\n")  # an earlier run's choice
    assert main([*argv, "--budget-bits", "6", "-o", "b", "--overwrite"]) == 2
    assert measured == [1] and (tmp_path / "b" / "sensitivity.csv").is_file()  # the measurement is kept
    assert not (tmp_path / "b" / "mixed_precision.yaml").exists()  # and no choice of other measurements beside it


def test_data_without_validation_batches_is_measured_on_training_batches_with_a_warning(tmp_path, monkeypatch):
    # A new user's trial: the training batches were used without a word.
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    torch.manual_seed(0)
    torch.save({"state_dict": RecipeMLP(hidden=16).state_dict(), "hyper_parameters": {"hidden": 16}}, "float.ckpt")
    argv = ["sensitivity", "--model", "tests.cli_models.RecipeMLP", "--checkpoint", "float.ckpt", "--data",
            "tests.cli_models.TrainOnlyData", "--batches", "1", "--bits", "4", "-o", "t"]
    with pytest.warns(UserWarning, match="TrainOnlyData has no val_dataloader: its training batches are used instead"):
        assert main(argv) == 0
    torch.manual_seed(0)
    model = RecipeMLP(hidden=16)
    expected = layer_sensitivity(model, [next(iter(RecipeData().train_dataloader()))], bits=(4,))
    rows = list(csv.reader(open(tmp_path / "t" / "sensitivity.csv")))[1:]
    assert [float(r[5]) for r in rows] == pytest.approx([e.delta for e in expected.rows], rel=1e-6)


@pytest.mark.parametrize("trained_with", [["QuantizationAwareTraining"], ["MagnitudePruning", "QuantizationAwareTraining"]])
def test_a_checkpoint_trained_with_qat_or_pruning_is_measured_as_float_with_a_warning(tmp_path, monkeypatch,
                                                                                      trained_with):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    states = {f"{name}{{'name': None}}": {} for name in trained_with}
    torch.save({"state_dict": RecipeMLP(hidden=16).state_dict(), "hyper_parameters": {"hidden": 16},
                "callbacks": states}, "qat.ckpt")
    argv = ["sensitivity", "--model", "tests.cli_models.RecipeMLP", "--checkpoint", "qat.ckpt", "--data",
            "tests.cli_models.RecipeData", "--batches", "1", "--bits", "4", "-o", "q"]
    with pytest.warns(UserWarning, match=rf"trained with {' and '.join(trained_with)}: sensitivity measures its"
                      " weights as a float, dense model"):
        assert main(argv) == 0


class _TinyDemoLSTM(pl.LightningModule):
    """Lightning's demo LightningLSTM (its training_step carries `self.hidden` over from one
    call to the next) on a tiny SimpleLSTM."""

    def __new__(cls):
        from lightning.pytorch.demos import LightningLSTM, SimpleLSTM

        model = LightningLSTM(vocab_size=40)
        model.model = SimpleLSTM(vocab_size=40, ninp=16, nhid=16, nlayers=1, dropout=0.0)
        return model


def test_a_model_whose_loss_drifts_between_calls_is_refused_and_a_fresh_loss_fn_measures_it():
    torch.manual_seed(0)
    model = _TinyDemoLSTM()
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 40, (4, 10), generator=generator), torch.randint(0, 40, (4, 10), generator=generator))
               for _ in range(2)]
    with pytest.raises(ArgumentError, match=r"changed between two evaluations \(batch 0: .* then .*LightningLSTM.*"
                       r"reference='kl'") as error:
        layer_sensitivity(model, batches, bits=(8, 4))
    assert error.value.argument == "loss_fn"
    first, second = map(float, re.search(r"batch 0: (\S+) then (\S+?)[,)]", str(error.value)).groups())
    drift = abs(second - first)
    # A loss_fn that starts every batch from a fresh hidden state measures: each 8-bit delta
    # is far below the drift the default loss would have reported as every layer's delta.
    def fresh(module, batch):
        output, _ = module.model(batch[0], module.model.init_hidden(batch[0].size(0)))
        return F.nll_loss(output, batch[1].view(-1))

    report = layer_sensitivity(model, batches, fresh, bits=(8, 2))
    for layer in {row.layer for row in report.rows}:
        delta = {row.bits: row.delta for row in report.rows if row.layer == layer}
        assert abs(delta[8]) < drift / 20 and delta[8] != delta[2], (layer, delta, drift)


def test_outputs_that_drift_between_calls_are_refused_for_reference_kl():
    class Running(nn.Module):  # a running state in forward: each call answers differently
        def __init__(self):
            super().__init__()
            self.fc, self.calls = nn.Linear(4, 3), 0

        def forward(self, x):
            self.calls += 1
            return self.fc(x) * self.calls

    batches = [torch.randn(5, 4, generator=torch.Generator().manual_seed(0))]
    with pytest.raises(ArgumentError, match=r"outputs on the same batches changed between two evaluations \(batch\(es\)"
                       r" \[0\]\).*reset that state") as error:
        layer_sensitivity(Running(), batches, bits=(8,), reference="kl")
    assert error.value.argument == "batches"


def test_a_loss_that_samples_is_measured_on_the_same_draws_and_the_callers_rng_is_untouched():
    """A denoising loss draws noise: each case sees batch i's noise (seeded with i), so the
    drift check passes and an 8-bit delta is the quantization's alone, not a new noise draw.
    The caller's generator state is as it was."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    batches = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def denoising(module, x):
        return F.mse_loss(module(x + 0.5 * torch.randn_like(x)), x)

    state = torch.get_rng_state()
    report = layer_sensitivity(model, batches, denoising, bits=(8,))
    assert torch.equal(torch.get_rng_state(), state)
    # the reference by hand: batch i's noise is what torch.manual_seed(i) draws
    expected = []
    for name in ("0", "2"):
        quantized = copy.deepcopy(model)
        layer = quantized.get_submodule(name)
        spec = QuantSpec(8, "channel")
        scale, zero_point = choose_qparams(as_matrix(layer.weight.data), spec)
        layer.weight.data = fake_quantize(layer.weight.data, scale, zero_point, spec)

        def mean_loss(module):
            losses = []
            for i, x in enumerate(batches):
                torch.manual_seed(i)
                losses.append(float(denoising(module, x).detach().double()))
            return math.fsum(losses) / len(losses)

        expected.append(mean_loss(quantized) - mean_loss(model))
    torch.set_rng_state(state)
    assert [row.delta for row in report.rows] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_a_loss_drawing_from_numpy_and_python_is_measured_on_the_same_draws():
    import random

    import numpy

    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    batches = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def noisy(module, x):  # numpy's and Python's generators: seeded per batch as torch's are
        noise = torch.from_numpy(numpy.random.rand(*x.shape).astype("float32")) * random.random()
        return F.mse_loss(module(x + noise), x)

    states = random.getstate(), numpy.random.get_state()
    report = layer_sensitivity(model, batches, noisy, bits=(8, 2))
    assert random.getstate() == states[0] and numpy.array_equal(numpy.random.get_state()[1], states[1][1])
    for layer in ("0", "2"):
        delta = {row.bits: row.delta for row in report.rows if row.layer == layer}
        assert abs(delta[8]) < abs(delta[2])


def test_a_half_precision_loss_is_warned_about_and_kl_on_dict_batches_names_its_call():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)).bfloat16()
    batches = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)).bfloat16() for i in range(2)]
    with pytest.warns(UserWarning, match=r"the loss is a bfloat16 number, whose rounding step .* hides most layers'"
                                         r" deltas .*\(copy.deepcopy\(model\).float\(\)\)"):
        layer_sensitivity(model, batches, lambda m, x: F.mse_loss(m(x), x), bits=(8,))
    with pytest.raises(TypeError) as error:
        layer_sensitivity(nn.Sequential(nn.Linear(16, 4)), [{"input_ids": torch.randn(2, 16)}], bits=(8,), reference="kl")
    assert "reference='kl' calls model(batch) for a tensor batch, model(batch[0]) for a tuple or list," \
           " model(**batch) for a dict" in " ".join(error.value.__notes__)
