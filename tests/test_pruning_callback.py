"""MagnitudePruning under a real Lightning Trainer on CPU."""

import csv

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from torch import nn

from lightning_compress import MagnitudePruning
from lightning_compress.core.transforms import raw_weight
from tests.conftest import StopAfterEpoch, TinyRegressor, fit_interrupted_and_resumed, make_trainer, tiny_loader

LAYERS = ("conv", "fc1", "fc2")


def weight_sparsity(model, names=LAYERS):
    return {n: float((getattr(model, n).weight == 0).double().mean()) for n in names}


class Recorder(Callback):
    """Records (global_step, per-layer sparsity of the stored weights) at each batch start."""

    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append((trainer.global_step, weight_sparsity(pl_module)))


def test_schedule_counts_optimizer_steps_under_gradient_accumulation(tmp_path, seeded):
    pruning = MagnitudePruning(0.6, schedule="linear", start_step=0, end_step=6, update_every=2)
    recorder = Recorder()
    logger = CSVLogger(tmp_path)
    trainer = make_trainer(
        max_epochs=3, accumulate_grad_batches=4, callbacks=[pruning, recorder], logger=logger, log_every_n_steps=1
    )
    model = TinyRegressor()
    trainer.fit(model, tiny_loader(batches=8))
    assert trainer.global_step == 6

    expected = {0: 0.0, 1: 0.0, 2: 0.2, 3: 0.2, 4: 0.4, 5: 0.4}
    assert [step for step, _ in recorder.rows] == [s for s in range(6) for _ in range(4)]
    for step, sparsity in recorder.rows:
        for name, value in sparsity.items():
            numel = getattr(model, name).weight.numel()
            assert value == pytest.approx(round(expected[step] * numel) / numel, abs=1e-9), (step, name)

    with open(next(tmp_path.rglob("metrics.csv"))) as handle:
        logged = {
            int(row["step"]): float(row["pruning/sparsity_scheduled"])
            for row in csv.DictReader(handle)
            if row.get("pruning/sparsity_scheduled")
        }
    assert logged == pytest.approx(expected)
    assert pruning.sparsity == pytest.approx(0.6, abs=1e-3)


@pytest.mark.parametrize(
    "pattern, scope",
    [
        ("unstructured", "layer"),
        ("unstructured", "global"),
        ("structured", "layer"),
        ("structured", "global"),
        ("2:4", "layer"),
    ],
)
def test_final_sparsity_is_reached_for_each_pattern_and_scope(pattern, scope, seeded):
    final = None if pattern == "2:4" else 0.75
    pruning = MagnitudePruning(final, pattern=pattern, scope=scope, start_step=2, end_step=12, update_every=2)
    model = TinyRegressor()
    make_trainer(max_epochs=2, callbacks=[pruning]).fit(model, tiny_loader(batches=8))
    weights = {n: getattr(model, n).weight.detach() for n in LAYERS}

    if pattern == "2:4":
        for name, weight in weights.items():
            zeros_per_group = (weight == 0).movedim(1, -1).reshape(-1, 4).sum(-1)
            assert bool((zeros_per_group >= 2).all()), name
            assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
        return
    if pattern == "structured":
        for name, weight in weights.items():
            rows = (weight == 0).flatten(1)
            assert bool((rows.all(1) | ~rows.any(1)).all()), f"{name} has partly pruned channels"
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    if scope == "global":
        widest = max(w[0].numel() for w in weights.values()) if pattern == "structured" else 1
        assert abs(zeros - 0.75 * total) <= widest
    else:
        for name, weight in weights.items():
            unit = weight[0].numel() if pattern == "structured" else 1
            assert abs(int((weight == 0).sum()) - 0.75 * weight.numel()) <= unit, name
    assert pruning.sparsity == pytest.approx(zeros / total)


class MaskWatcher(Callback):
    """After every batch, checks that weights pruned at the one-shot step are still zero."""

    def __init__(self, pruning):
        self.pruning = pruning
        self.pruned = None
        self.checked = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.pruned is None and trainer.global_step > 2:
            self.pruned = {n: pl_module.get_submodule(n).weight.detach() == 0 for n in LAYERS}
        if self.pruned is not None:
            for name, pruned in self.pruned.items():
                assert bool((raw_weight(pl_module.get_submodule(name))[pruned] == 0).all()), name
            self.checked += 1


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_pruned_weights_stay_zero_under_momentum_and_adam(optimizer, seeded):
    pruning = MagnitudePruning(0.7, schedule="one_shot", start_step=2)
    watcher = MaskWatcher(pruning)
    model = TinyRegressor(optimizer=optimizer, lr=0.05)
    make_trainer(max_epochs=3, callbacks=[pruning, watcher]).fit(model, tiny_loader(batches=8))
    assert watcher.checked >= 20
    # Momentum/Adam state was built before pruning; the weights still never came back.
    for name in LAYERS:
        assert float((getattr(model, name).weight == 0).float().mean()) == pytest.approx(0.7, abs=0.01)


def _pruning():
    return MagnitudePruning(0.8, start_step=4, end_step=40, update_every=4, scope="global")


def test_resume_inside_the_schedule_is_bit_identical(tmp_path):
    reference, uninterrupted, resumed_model, resumed, ckpt = fit_interrupted_and_resumed(
        _pruning, tmp_path, epochs=6, stop_after=1
    )
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] == 16 and 0 < state["callbacks"][_pruning().state_key]["applied_sparsity"] < 0.8

    for key, value in reference.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key
    assert resumed.state_dict()["masks"].keys() == uninterrupted.state_dict()["masks"].keys()
    for name, entry in uninterrupted.state_dict()["masks"].items():
        assert torch.equal(resumed.state_dict()["masks"][name]["packed"], entry["packed"]), name


def test_final_checkpoint_loads_strictly_into_the_unmodified_class(tmp_path, seeded):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = TinyRegressor()
    trainer = make_trainer(max_epochs=2, callbacks=[MagnitudePruning(0.5, end_step=8), checkpoint], enable_checkpointing=True)
    trainer.fit(model, tiny_loader(batches=8))
    assert type(model.fc1) is nn.Linear  # the stack is removed at the end of fit

    loaded = TinyRegressor.load_from_checkpoint(tmp_path / "last.ckpt", strict=True, map_location="cpu")
    assert set(loaded.state_dict()) == set(TinyRegressor().state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert weight_sparsity(loaded) == pytest.approx({n: 0.5 for n in LAYERS}, abs=0.01)


@pytest.mark.parametrize(
    "changed, message",
    [
        (dict(pattern="structured"), "pruned with pattern 'unstructured'"),
        (dict(targets=["fc1"]), r"only in the checkpoint: \['conv', 'fc2'\]"),
    ],
)
def test_resume_with_changed_settings_is_refused(tmp_path, seeded, changed, message):
    ckpt = tmp_path / "a.ckpt"
    make_trainer(max_epochs=2, callbacks=[MagnitudePruning(0.5, end_step=8), StopAfterEpoch(0, ckpt)]).fit(
        TinyRegressor(), tiny_loader(batches=8)
    )
    settings = dict(final_sparsity=0.5, end_step=8, **changed)
    with pytest.raises(ValueError, match=message):
        make_trainer(max_epochs=2, callbacks=[MagnitudePruning(**settings)]).fit(
            TinyRegressor(), tiny_loader(batches=8), ckpt_path=ckpt
        )


def test_end_step_on_the_last_step_is_in_the_last_checkpoint(tmp_path, seeded):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = TinyRegressor()
    pruning = MagnitudePruning(0.8, end_step=1.0, update_every=4)
    make_trainer(max_epochs=2, callbacks=[pruning, checkpoint], enable_checkpointing=True).fit(
        model, tiny_loader(batches=8)
    )
    assert pruning.sparsity == pytest.approx(0.8, abs=1e-3)
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert state["callbacks"][pruning.state_key]["applied_sparsity"] == 0.8
    loaded = TinyRegressor.load_from_checkpoint(tmp_path / "last.ckpt")
    assert weight_sparsity(loaded) == pytest.approx({n: 0.8 for n in LAYERS}, abs=0.01)


def test_a_callback_reused_for_another_model_starts_from_its_dense_weights(seeded):
    pruning = MagnitudePruning(0.5, start_step=4, end_step=8)
    first, second = TinyRegressor(), TinyRegressor()
    make_trainer(max_epochs=2, callbacks=[pruning]).fit(first, tiny_loader(batches=8))
    seen = Recorder()
    make_trainer(max_epochs=2, callbacks=[pruning, seen]).fit(second, tiny_loader(batches=8))
    assert seen.rows[0][1] == {n: 0.0 for n in LAYERS}  # nothing of the first model's masks
    assert weight_sparsity(second) == pytest.approx({n: 0.5 for n in LAYERS}, abs=0.01)


def test_a_failed_setup_changes_nothing_and_the_suggested_fix_works(seeded):
    model = TinyRegressor()
    model.fc1 = nn.Linear(64, 30)
    model.fc2 = nn.Linear(30, 8)
    with pytest.raises(ValueError, match="exclude"):
        make_trainer(callbacks=[MagnitudePruning(pattern="2:4")]).fit(model, tiny_loader())
    assert all(type(model.get_submodule(n)) in (nn.Conv1d, nn.Linear) for n in LAYERS)
    make_trainer(callbacks=[MagnitudePruning(pattern="2:4", exclude=["fc2"], end_step=2)]).fit(model, tiny_loader())
    assert weight_sparsity(model, ["conv", "fc1"]) == pytest.approx({"conv": 0.5, "fc1": 0.5}, abs=0.01)


def test_two_pruning_callbacks_on_one_layer_conflict(seeded):
    callbacks = [MagnitudePruning(0.5, name="a"), MagnitudePruning(0.7, targets=["fc1"], name="b")]
    with pytest.raises(ValueError, match="two active callbacks put a MASK transform"):
        make_trainer(callbacks=callbacks).fit(TinyRegressor(), tiny_loader())


def test_fraction_steps_resolve_against_estimated_stepping_batches(seeded):
    pruning = MagnitudePruning(0.5, start_step=0.25, end_step=0.5)
    make_trainer(max_epochs=2, callbacks=[pruning]).fit(TinyRegressor(), tiny_loader(batches=8))
    assert pruning._window[:2] == (4, 8)


class TableLogger(Logger):
    """A Lightning logger that keeps what it is given, tables included."""

    def __init__(self):
        super().__init__()
        self.tables = {}

    @property
    def name(self):
        return "tables"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def log_table(self, key, columns, data):
        self.tables[key] = (columns, data)


def test_per_layer_table_at_the_end_of_fit_counts_pruned_not_quantized_zeros(seeded):
    from lightning_compress import QuantizationAwareTraining

    logger = TableLogger()
    pruning = MagnitudePruning(0.3, end_step=4, targets=["fc1", nn.Conv1d])
    qat = QuantizationAwareTraining("int2", start_step=0)  # rounds many small weights to zero
    model = TinyRegressor()
    make_trainer(max_epochs=1, callbacks=[pruning, qat], logger=logger).fit(model, tiny_loader(batches=8))
    columns, rows = logger.tables["compression/layers"]
    assert columns[:5] == ["layer", "type", "params", "sparsity", "weight_bits"]
    rows = {row[0]: row for row in rows}
    assert set(rows) == {"conv", "fc1", "fc2"}  # fc2 is quantized, not pruned
    assert rows["fc1"][2:5] == [2048, round(0.3 * 2048) / 2048, 2]
    assert rows["fc2"][3] == 0.0
    assert float((model.fc1.weight == 0).double().mean()) > 0.35  # quantized zeros exist


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(final_sparsity=1.0), "`final_sparsity` must be a number in \\[0, 1\\)"),
        (dict(final_sparsity=-0.1), "`final_sparsity`"),
        (dict(final_sparsity=True), "`final_sparsity`"),
        (dict(initial_sparsity=0.6, final_sparsity=0.5), "`initial_sparsity`=0.6 exceeds"),
        (dict(start_step=10, end_step=10), "`end_step`=10 must come after `start_step`=10"),
        (dict(start_step=0.5, end_step=0.2), "`end_step`=0.2 must come after"),
        (dict(start_step=-1), "`start_step` must be >= 0"),
        (dict(end_step=1.5), "`end_step`=1.5 is a float"),
        (dict(pattern="blocks"), "unknown `pattern`"),
        (dict(pattern="4:4"), "1 <= N < M"),
        (dict(pattern="2:4", final_sparsity=0.7), "fixes the sparsity at 0.5"),
        (dict(pattern="2:4", scope="global"), "`scope`='global' cannot be combined"),
        (dict(scope="model"), "unknown `scope`"),
        (dict(schedule="exp"), "unknown `schedule`"),
        (dict(update_every=0), "`update_every` must be a positive int"),
        (dict(norm=3), "`norm` must be 1 or 2"),
        (dict(targets=[nn.LayerNorm]), "`targets` names the layer type LayerNorm"),
        (dict(name=""), "`name` must be a non-empty string"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MagnitudePruning(**kwargs)


def test_target_that_matches_nothing_fails_before_training(seeded):
    model = TinyRegressor()
    trainer = make_trainer(callbacks=[MagnitudePruning(0.5, targets=["fc_1"])])
    with pytest.raises(ValueError, match=r"'fc_1' matches no module\. Close names: fc1"):
        trainer.fit(model, tiny_loader())
    assert trainer.global_step == 0


def test_n_m_on_a_layer_whose_input_is_not_divisible_names_the_layer(seeded):
    model = TinyRegressor()
    model.fc2 = nn.Linear(32, 8)
    model.fc1 = nn.Linear(64, 30)
    model.fc2 = nn.Linear(30, 8)
    with pytest.raises(ValueError, match=r"layer 'fc2' has input size 30, not divisible by M=4.*exclude"):
        make_trainer(callbacks=[MagnitudePruning(pattern="2:4")]).fit(model, tiny_loader())


def test_end_step_fraction_resolving_before_start_is_refused(seeded):
    pruning = MagnitudePruning(0.5, start_step=10, end_step=0.5)
    with pytest.raises(ValueError, match="`end_step` resolves to step 4"):
        make_trainer(callbacks=[pruning]).fit(TinyRegressor(), tiny_loader())
    # Reached on the start step itself: an int start_step is no run too short for fractions.
    pruning = MagnitudePruning(0.5, start_step=4, end_step=0.5)
    with pytest.raises(ValueError, match=r"`end_step` resolves to step 4, not after `start_step` \(step 4\)"):
        make_trainer(callbacks=[pruning]).fit(TinyRegressor(), tiny_loader())


def test_validate_from_a_checkpoint_masks_lora_layers(tmp_path, seeded):
    """An unmerged LoRA layer computes mask * (W + B·A): validate/test with ckpt_path must
    install the masks too, or the adapter makes the pruned weights non-zero again."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_compress import LoRA

    model = TinyRegressor()
    trainer = make_trainer(
        max_epochs=2,
        enable_checkpointing=True,
        callbacks=[LoRA(r=4, target_modules=["fc1", "fc2"]), MagnitudePruning(0.5, end_step=0.5),
                   ModelCheckpoint(dirpath=tmp_path, save_last=True)],
    )
    val = tiny_loader(batches=2, seed=5)
    trainer.fit(model, tiny_loader(batches=8))
    trained_loss = trainer.validate(model, val)[0]["val/loss"]
    assert float((model.fc1.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)

    fresh = TinyRegressor()
    evaluator = make_trainer(callbacks=[MagnitudePruning(0.5, end_step=0.5), LoRA(r=4, target_modules=["fc1", "fc2"])])
    assert evaluator.validate(fresh, val, ckpt_path=tmp_path / "last.ckpt")[0]["val/loss"] == trained_loss
    for name in ("fc1", "fc2"):
        assert torch.equal(fresh.get_submodule(name).weight, model.get_submodule(name).weight)


def test_numpy_scalars_are_the_numbers_they_hold(tmp_path, seeded):
    """np.int64 steps are absolute steps and np.float32 a sparsity (they were refused:
    isinstance(np.int64(2), int) is False)."""
    import numpy as np

    pruning = MagnitudePruning(np.float32(0.5), start_step=np.int64(2), end_step=np.int64(6), update_every=np.int64(1))
    assert type(pruning.config.start_step) is int and type(pruning.config.final_sparsity) is float
    make_trainer(max_steps=8, callbacks=[pruning]).fit(TinyRegressor(), tiny_loader())
    assert pruning._window == (2, 6, 1)
    assert pruning.sparsity == pytest.approx(0.5, abs=0.01)
    # In a recipe and in what an export records, as numbers.
    from lightning_compress import from_recipe
    from lightning_compress.formats.export import export
    from lightning_compress.formats.packed import METADATA_FILE

    assert from_recipe({"qat": {"weights": 4, "group_size": np.int64(32)}})[0].config.group_size == 32
    model = nn.Sequential(nn.Linear(8, 4))
    export(model, tmp_path / "out", inputs=[torch.randn(2, 8)], recipe={"qat": {"weights": np.int64(8), "flag": np.bool_(True)}})
    import json

    assert json.loads((tmp_path / "out" / METADATA_FILE).read_text())["recipe"] == {"qat": {"weights": 8, "flag": True}}


def test_a_fast_dev_run_too_short_for_the_fractions_ramps_over_one_step(seeded):
    pruning = MagnitudePruning(0.8, start_step=0.05, end_step=0.5)
    with pytest.warns(UserWarning, match=r"too short for `start_step`=0\.05 and `end_step`=0\.5: both resolve to"
                                         r" step 0, so the schedule ramps from step 0 to step 1"):
        make_trainer(fast_dev_run=True, callbacks=[pruning]).fit(TinyRegressor(), tiny_loader())
    assert pruning._window[:2] == (0, 1)


@pytest.mark.parametrize("rows, sparsity", [(2, 0.8), (3, 0.9)])
def test_rounding_never_prunes_a_layer_whole(rows, sparsity, seeded):
    """0.8 of two rows rounds to both: the model's output would no longer depend on its
    input. One row stays, the one of the largest mean |w|; unstructured, one weight."""
    model = TinyRegressor()
    model.fc1, model.fc2 = nn.Linear(64, rows), nn.Linear(rows, 8)
    before = model.fc1.weight.detach().clone()
    pruning = MagnitudePruning(sparsity, pattern="structured", targets=["fc1"], schedule="one_shot", start_step=1)
    make_trainer(max_steps=2, callbacks=[pruning]).fit(model, tiny_loader(batches=2))
    kept = model.fc1.weight.detach() != 0
    assert kept.all(dim=1).sum() == 1 and (~kept).all(dim=1).sum() == rows - 1
    assert bool(kept[before.abs().mean(dim=1).argmax()].all())
    from lightning_compress.sparsity.masks import SparsityPattern, layer_mask

    assert layer_mask(torch.tensor([[0.3, -0.5]]), 0.8, SparsityPattern.parse("unstructured")).tolist() == [[False, True]]
