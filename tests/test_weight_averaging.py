"""Lightning's weight averaging (``EMAWeightAveraging``, ``StochasticWeightAveraging``)
stacked with the compression callbacks.

Both copy the model in their ``setup`` and pair the copy's parameters with the model's by
position. QAT and pruning keep the model's parameters, so the average is of the latent
(raw) weights, the masks and fake quantization act on it, the export packs it, and a
resume restores it exactly. LoRA adds parameters and must set up first (unless its
adapters are on the model already); its NF4 base cannot be copied by ``copy.deepcopy``;
and the copy goes into every checkpoint whole, so adapter-only checkpoints cannot be
kept: all refused before training, in any order.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, StochasticWeightAveraging

from lightning_compress import (
    CompressedExport,
    KnowledgeDistillation,
    LoRA,
    MagnitudePruning,
    QuantizationAwareTraining,
    load_packed,
    quantized_weights,
)
from lightning_compress.callbacks.compatibility import IncompatibleSettings
from tests.conftest import StopAfterEpoch, TinyRegressor, fit_and_save, make_trainer, tiny_loader

DECAY, FROM_STEP = 0.8, 6


class RecordRawWeights(Callback):
    """The model's parameters (the latent weights, under QAT and pruning) after each
    optimizer step from ``FROM_STEP`` on: what the average is taken over."""

    def __init__(self) -> None:
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step - 1 >= FROM_STEP:
            self.steps.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def compression():
    return [
        MagnitudePruning(final_sparsity=0.5, start_step=0, end_step=4, update_every=2),
        QuantizationAwareTraining("int4", group_size=16, start_step=2, ewgs_delta=0.2,
                                  overrides={"conv": {"granularity": "channel"}}),
    ]


def hand_ema(steps):
    """The exponential moving average written out: the first recorded step, then
    ``decay * average + (1 - decay) * weights`` at each later one."""
    average = {n: w.clone() for n, w in steps[0].items()}
    for weights in steps[1:]:
        average = {n: DECAY * average[n] + (1 - DECAY) * weights[n] for n in average}
    return average


def test_the_average_is_of_the_latent_weights_and_compression_acts_on_it(tmp_path, seeded):
    model, recorder = TinyRegressor(), RecordRawWeights()
    export = CompressedExport(tmp_path / "packed")
    callbacks = [*compression(), EMAWeightAveraging(decay=DECAY, update_starting_at_step=FROM_STEP), recorder, export]
    make_trainer(callbacks=callbacks, max_steps=12, max_epochs=2).fit(model, tiny_loader(), tiny_loader(batches=2, seed=1))

    assert len(recorder.steps) == 12 - FROM_STEP
    expected, last = hand_ema(recorder.steps), recorder.steps[-1]
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.detach(), expected[name], rtol=0, atol=1e-6)
    assert any(not torch.allclose(expected[n], last[n]) for n in expected)  # the average is not the last step
    # The masks and the fake quantization still act on the averaged weights: half of each
    # layer exactly zero, on the int4 grid, and the export packs exactly that model.
    report = export.report
    assert report.parity.passed and report.parity.weights_exact
    loaded = load_packed(tmp_path / "packed", TinyRegressor())
    for name, q in quantized_weights(model).items():
        assert int((q.dequantize() == 0).sum()) >= q.codes.numel() // 2
        assert int(q.codes.abs().max()) <= 8
        assert torch.equal(loaded.get_submodule(name).weight, q.dequantize())
    x = next(iter(tiny_loader(batches=1, seed=2)))[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


@pytest.mark.parametrize("averaging", ["ema", "swa"])
def test_resume_restores_the_average_exactly(averaging, tmp_path, seeded):
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in TinyRegressor().state_dict().items()}

    def run(extra=(), ckpt_path=None):
        model = TinyRegressor()
        model.load_state_dict(initial)
        torch.manual_seed(1)
        average = (EMAWeightAveraging(decay=DECAY, update_starting_at_step=FROM_STEP) if averaging == "ema"
                   else StochasticWeightAveraging(swa_lrs=1e-2, swa_epoch_start=2))
        trainer = make_trainer(max_epochs=3, callbacks=[*compression(), average, *extra])
        trainer.fit(model, tiny_loader(batches=4), ckpt_path=ckpt_path)
        return model

    reference = run()
    checkpoint = tmp_path / "mid.ckpt"
    run([StopAfterEpoch(1, checkpoint)])  # 8 steps: EMA has taken 2 of them, SWA the weights of epoch 0
    resumed = run(ckpt_path=checkpoint)
    saved = torch.load(checkpoint, weights_only=True)
    if averaging == "ema":  # the checkpoint held both the model and its average
        assert "current_model_state" in saved
    else:
        (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("StochasticWeightAveraging")]
        assert state["n_averaged"] == 1 and state["average_model_state"] is not None
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


AVERAGING = {"ema": lambda: EMAWeightAveraging(decay=DECAY), "swa": lambda: StochasticWeightAveraging(swa_lrs=1e-2)}


@pytest.mark.parametrize("averaging", sorted(AVERAGING))
@pytest.mark.parametrize("order", ["averaging first", "lora first"])
def test_qlora_is_refused_before_training(order, averaging, seeded):
    lora = LoRA(r=2, base="nf4", target_modules=["fc1"], nf4_block_size=32, nf4_scaler_block_size=16)
    callbacks = [AVERAGING[averaging](), lora]
    model = TinyRegressor()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(callbacks=callbacks if order == "averaging first" else callbacks[::-1], max_steps=4)
    name = type(callbacks[0]).__name__
    with pytest.raises(IncompatibleSettings, match=rf"LoRA\(base='nf4'\).*{name}.*use LoRA\(base='float'\)"):
        trainer.fit(model, tiny_loader(batches=4))
    assert trainer.global_step == 0
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


class WideLinear(TinyRegressor):
    """fc1 64 -> 256: 16384 weights, which torchao's default NF4 blocks (64, in groups of
    256) divide, so its ``deepcopy`` (which quantizes again with them) works."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 256), nn.Linear(256, 8)


@pytest.mark.parametrize("averaging", sorted(AVERAGING))
def test_qlora_validates_beside_either_averaging_callback(averaging, seeded):
    """Outside fit nothing is averaged: EMA copies nothing, SWA copies the QLoRA model and
    leaves the copy unused, so the validation is the one without the callback."""
    model, loader = WideLinear(), tiny_loader(batches=2, seed=1)
    lora = LoRA(r=2, base="nf4", target_modules=["fc1"])
    (alone,) = make_trainer(callbacks=[lora]).validate(model, loader)
    (beside,) = make_trainer(callbacks=[lora, AVERAGING[averaging]()]).validate(model, loader)
    assert beside["val/loss"] == alone["val/loss"]


@pytest.mark.parametrize("averaging", sorted(AVERAGING))
def test_lora_after_the_averaging_callback_is_refused_with_the_order_that_works(averaging, seeded):
    trainer = make_trainer(callbacks=[AVERAGING[averaging](), LoRA(r=2, target_modules=["fc1"])], max_steps=4)
    with pytest.raises(IncompatibleSettings, match=r"callbacks\[0\].*LoRA \(callbacks\[1\]\).*List LoRA before"):
        trainer.fit(TinyRegressor(), tiny_loader(batches=4))
    assert trainer.global_step == 0


class LoRAFromTheModule(TinyRegressor):
    """A module that returns its callbacks from ``configure_callbacks``: Lightning puts them
    after the Trainer's, in the order returned."""

    def __init__(self, averaging_too: bool) -> None:
        super().__init__()
        self.averaging_too = averaging_too

    def configure_callbacks(self):
        lora = LoRA(r=2, target_modules=["fc1"], merge_on_fit_end=False)
        return [lora, EMAWeightAveraging(decay=DECAY)] if self.averaging_too else [lora]


def test_lora_from_configure_callbacks_is_refused_with_a_fix_that_can_be_followed(seeded):
    trainer = make_trainer(callbacks=[EMAWeightAveraging(decay=DECAY)], max_steps=4)
    with pytest.raises(IncompatibleSettings, match=r"configure_callbacks.*return EMAWeightAveraging from there too, after LoRA"):
        trainer.fit(LoRAFromTheModule(averaging_too=False), tiny_loader(batches=4))
    # the fix the message names: both from configure_callbacks (it replaces the Trainer's own)
    model = LoRAFromTheModule(averaging_too=True)
    trainer = make_trainer(callbacks=[EMAWeightAveraging(decay=DECAY)], max_steps=4)
    trainer.fit(model, tiny_loader(batches=4))
    assert trainer.global_step == 4 and not torch.equal(model.fc1.lora_B.detach(), torch.zeros_like(model.fc1.lora_B))


@pytest.mark.parametrize("averaging", sorted(AVERAGING))
def test_adapter_only_checkpoints_with_weight_averaging_are_refused(averaging, seeded):
    """The averaging callback saves its whole copy of the model in every checkpoint; with
    ``EMAWeightAveraging`` a resume then failed inside Lightning's strict load."""
    lora = LoRA(r=2, target_modules=["fc1"], adapter_only_checkpoints=True)
    trainer = make_trainer(callbacks=[lora, AVERAGING[averaging]()], max_steps=4)
    with pytest.raises(IncompatibleSettings, match=r"adapter_only_checkpoints=True.*Set adapter_only_checkpoints=False"):
        trainer.fit(TinyRegressor(), tiny_loader(batches=4))
    assert trainer.global_step == 0


def test_swa_averages_the_latent_weights_and_compression_acts_on_it(tmp_path, seeded):
    """``StochasticWeightAveraging``: the equal-weight average of the raw weights at the
    start of each epoch from ``swa_epoch_start`` on (1-based: 2 is the second epoch, whose
    start holds the weights the first one trained) replaces them at the end of fit."""

    class RecordAtEpochStart(Callback):
        def __init__(self) -> None:
            self.epochs = []

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch >= 1:
                self.epochs.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    model, recorder = TinyRegressor(), RecordAtEpochStart()
    swa, export = StochasticWeightAveraging(swa_lrs=1e-2, swa_epoch_start=2), CompressedExport(tmp_path / "packed")
    make_trainer(callbacks=[*compression(), swa, recorder, export], max_epochs=4).fit(model, tiny_loader(batches=4))
    assert len(recorder.epochs) == 3
    for name, parameter in model.named_parameters():
        expected = sum(epoch[name] for epoch in recorder.epochs) / len(recorder.epochs)
        torch.testing.assert_close(parameter.detach(), expected, rtol=0, atol=1e-6)
    assert export.report.parity.passed and export.report.parity.weights_exact
    loaded = load_packed(tmp_path / "packed", TinyRegressor())
    for name, q in quantized_weights(model).items():
        assert int((q.dequantize() == 0).sum()) >= q.codes.numel() // 2
        assert int(q.codes.abs().max()) <= 8
        assert torch.equal(loaded.get_submodule(name).weight, q.dequantize())


def test_lora_before_the_averaging_callback_averages_the_adapters(seeded):
    model, recorder = TinyRegressor(), RecordRawWeights()
    lora = LoRA(r=2, target_modules=["fc1"], merge_on_fit_end=False)
    trainer = make_trainer(callbacks=[lora, EMAWeightAveraging(decay=DECAY, update_starting_at_step=FROM_STEP), recorder],
                           max_steps=10)
    trainer.fit(model, tiny_loader())
    expected = hand_ema(recorder.steps)
    adapters = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(adapters) == 2
    for name, parameter in adapters.items():
        torch.testing.assert_close(parameter.detach(), expected[name], rtol=0, atol=1e-6)
    assert not torch.equal(adapters["fc1.lora_B"].detach(), torch.zeros_like(adapters["fc1.lora_B"]))


def test_validate_with_lora_after_the_averaging_callback_is_not_refused(seeded):
    """``WeightAveraging`` averages only while fitting, so a validation keeps any order."""
    trainer = make_trainer(callbacks=[EMAWeightAveraging(decay=DECAY), LoRA(r=2, target_modules=["fc1"])])
    (metrics,) = trainer.validate(TinyRegressor(), tiny_loader(batches=2, seed=1))
    assert metrics["val/loss"] > 0


@pytest.mark.parametrize("instance", ["same LoRA", "new LoRA"])
def test_a_refit_with_the_adapters_in_place_averages_them_in_any_order(instance, seeded):
    """A second fit of a model whose adapters an earlier fit added (the same callback, or a
    new one that takes them over): the averaging callback copies them with the model, so
    its place in the list does not matter."""
    model, lora = TinyRegressor(), LoRA(r=2, target_modules=["fc1"], merge_on_fit_end=False)
    make_trainer(callbacks=[lora], max_steps=4).fit(model, tiny_loader(batches=4))
    names = [n for n, _ in model.named_parameters()]
    if instance == "new LoRA":
        lora = LoRA(r=2, target_modules=["fc1"], merge_on_fit_end=False)
    recorder = RecordRawWeights()
    averaging = EMAWeightAveraging(decay=DECAY, update_starting_at_step=FROM_STEP)
    make_trainer(callbacks=[averaging, lora, recorder], max_steps=10).fit(model, tiny_loader())
    assert [n for n, _ in model.named_parameters()] == names
    expected = hand_ema(recorder.steps)
    for name in ("fc1.lora_A", "fc1.lora_B"):
        torch.testing.assert_close(model.get_parameter(name).detach(), expected[name], rtol=0, atol=1e-6)


class BuiltInConfigureModel(TinyRegressor):
    """Overrides ``configure_model`` (a no-op), so LoRA adds its adapters after it."""

    def configure_model(self) -> None:
        pass


@pytest.mark.parametrize("order", ["averaging first", "lora first"])
def test_swa_with_adapters_added_after_configure_model_is_refused_in_any_order(order, seeded):
    """SWA copies in its setup, before ``configure_model``: its copy would lack the adapters
    (targeting the last layer, the positional pairing then silently skipped them)."""
    callbacks = [StochasticWeightAveraging(swa_lrs=1e-2), LoRA(r=2, target_modules=["fc2"])]
    trainer = make_trainer(callbacks=callbacks if order == "averaging first" else callbacks[::-1], max_epochs=3)
    with pytest.raises(IncompatibleSettings, match=r"before `configure_model`.*Use Lightning's WeightAveraging\(\)"):
        trainer.fit(BuiltInConfigureModel(), tiny_loader(batches=4))
    assert trainer.global_step == 0


def test_a_new_lora_taking_over_adapters_on_a_configure_model_module_is_not_refused(seeded):
    """The adapters an earlier fit left are on the model before `configure_model`: a new
    LoRA callback takes them over and adds nothing, so the averaging callback's copy holds them."""
    model = BuiltInConfigureModel()
    make_trainer(callbacks=[LoRA(r=2, target_modules=["fc2"], merge_on_fit_end=False)], max_steps=4).fit(
        model, tiny_loader(batches=4))
    recorder = RecordRawWeights()
    callbacks = [EMAWeightAveraging(decay=DECAY, update_starting_at_step=FROM_STEP),
                 LoRA(r=2, target_modules=["fc2"], merge_on_fit_end=False), recorder]
    make_trainer(callbacks=callbacks, max_steps=10).fit(model, tiny_loader())
    expected = hand_ema(recorder.steps)
    for name in ("fc2.lora_A", "fc2.lora_B"):
        torch.testing.assert_close(model.get_parameter(name).detach(), expected[name], rtol=0, atol=1e-6)


def test_ema_after_lora_averages_adapters_added_after_configure_model(seeded):
    """The fix that message names: ``WeightAveraging`` calls ``configure_model`` (and so
    LoRA's injection) before it copies."""
    model, recorder = BuiltInConfigureModel(), RecordRawWeights()
    callbacks = [LoRA(r=2, target_modules=["fc2"], merge_on_fit_end=False),
                 EMAWeightAveraging(decay=DECAY, update_starting_at_step=FROM_STEP), recorder]
    make_trainer(callbacks=callbacks, max_steps=10).fit(model, tiny_loader())
    expected = hand_ema(recorder.steps)
    for name in ("fc2.lora_A", "fc2.lora_B"):
        torch.testing.assert_close(model.get_parameter(name).detach(), expected[name], rtol=0, atol=1e-6)


def test_evaluating_a_swa_checkpoint_with_swa_listed_before_lora_is_refused(tmp_path, seeded):
    """SWA copies the model in every stage and loads the checkpoint's average into its copy:
    listed before LoRA, its copy lacks the adapters (Lightning's strict load failed)."""
    fit_and_save(tmp_path, [LoRA(r=2, target_modules=["fc1"]), StochasticWeightAveraging(swa_lrs=1e-2)])
    loader, checkpoint = tiny_loader(batches=2, seed=1), tmp_path / "fit.ckpt"
    (reference,) = make_trainer(callbacks=[LoRA(r=2, target_modules=["fc1"])]).validate(TinyRegressor(), loader,
                                                                                       ckpt_path=checkpoint)
    trainer = make_trainer(callbacks=[LoRA(r=2, target_modules=["fc1"]), StochasticWeightAveraging(swa_lrs=1e-2)])
    (metrics,) = trainer.validate(TinyRegressor(), loader, ckpt_path=checkpoint)
    assert metrics["val/loss"] == reference["val/loss"]
    trainer = make_trainer(callbacks=[StochasticWeightAveraging(swa_lrs=1e-2), LoRA(r=2, target_modules=["fc1"])])
    with pytest.raises(IncompatibleSettings, match=r"callbacks\[0\].*List LoRA before StochasticWeightAveraging"):
        trainer.validate(TinyRegressor(), loader, ckpt_path=checkpoint)
    # without a checkpoint to load, SWA's copy is never used outside fit: any order validates
    trainer = make_trainer(callbacks=[StochasticWeightAveraging(swa_lrs=1e-2), LoRA(r=2, target_modules=["fc1"])])
    (metrics,) = trainer.validate(TinyRegressor(), loader)
    assert metrics["val/loss"] > 0


def test_swa_listed_before_lora_evaluates_a_checkpoint_without_an_average(tmp_path, seeded):
    """The checkpoint of a fit without SWA holds no average to load into SWA's copy."""
    fit_and_save(tmp_path, [LoRA(r=2, target_modules=["fc1"])])
    loader, checkpoint = tiny_loader(batches=2, seed=1), tmp_path / "fit.ckpt"
    (reference,) = make_trainer(callbacks=[LoRA(r=2, target_modules=["fc1"])]).validate(TinyRegressor(), loader,
                                                                                       ckpt_path=checkpoint)
    trainer = make_trainer(callbacks=[StochasticWeightAveraging(swa_lrs=1e-2), LoRA(r=2, target_modules=["fc1"])])
    (metrics,) = trainer.validate(TinyRegressor(), loader, ckpt_path=checkpoint)
    assert metrics["val/loss"] == reference["val/loss"]


def test_swa_after_lora_copies_again_where_the_adapters_came_after_configure_model(tmp_path, seeded):
    """Outside fit SWA copies before `configure_model`; listed after LoRA it copies again,
    with the adapters, before the checkpoint's average is loaded into the copy."""

    def evaluate(extra):
        model = BuiltInConfigureModel()
        trainer = make_trainer(callbacks=[LoRA(r=2, target_modules=["fc2"]), *extra])
        return trainer.validate(model, tiny_loader(batches=2, seed=1), ckpt_path=tmp_path / "fit.ckpt")[0]

    model = TinyRegressor()
    trainer = make_trainer(callbacks=[LoRA(r=2, target_modules=["fc2"]), StochasticWeightAveraging(swa_lrs=1e-2)],
                           max_epochs=3)
    trainer.fit(model, tiny_loader(batches=4))
    trainer.save_checkpoint(tmp_path / "fit.ckpt")
    swa = StochasticWeightAveraging(swa_lrs=1e-2)
    assert evaluate([swa])["val/loss"] == evaluate([])["val/loss"]
    assert {n for n, _ in swa._average_model.named_parameters() if "lora_" in n} == {"fc2.lora_A", "fc2.lora_B"}


def test_qlora_validated_with_swa_where_its_copy_would_fail_is_refused(seeded):
    """torchao's NF4 deepcopy quantizes again with its default blocks: fc1's 2048 weights
    are no multiple of 64 * 256, so SWA's copy would fail with torchao's AssertionError."""
    lora = LoRA(r=2, base="nf4", target_modules=["fc1"], nf4_block_size=32, nf4_scaler_block_size=16)
    trainer = make_trainer(callbacks=[lora, StochasticWeightAveraging(swa_lrs=1e-2)])
    with pytest.raises(IncompatibleSettings, match=r"\['fc1'\].*Leave StochasticWeightAveraging out"):
        trainer.validate(TinyRegressor(), tiny_loader(batches=2))


@pytest.mark.parametrize("averaging", sorted(AVERAGING))
def test_adapter_only_checkpoints_evaluate_beside_either_averaging_callback(averaging, seeded):
    """Outside fit no checkpoint is written: adapter-only checkpoints are no reason to refuse."""
    model, loader = TinyRegressor(), tiny_loader(batches=2, seed=1)
    lora = LoRA(r=2, target_modules=["fc1"], adapter_only_checkpoints=True)
    (alone,) = make_trainer(callbacks=[lora]).validate(model, loader)
    (beside,) = make_trainer(callbacks=[lora, AVERAGING[averaging]()]).validate(model, loader)
    assert beside["val/loss"] == alone["val/loss"]


@pytest.mark.parametrize("merge", ["merge_on_fit_end", "lora.merge()"])
def test_a_checkpoint_saved_after_the_merge_holds_the_merged_model(merge, tmp_path, seeded):
    """EMA's copy from the fit still holds the adapters; saved after the merge, the
    checkpoint must hold the merged model that the Trainer evaluates, not that copy."""
    model, loader = TinyRegressor(), tiny_loader(batches=2, seed=1)
    lora = LoRA(r=2, target_modules=["fc1"], merge_on_fit_end=merge == "merge_on_fit_end")
    trainer = make_trainer(callbacks=[lora, EMAWeightAveraging(decay=0.5)], max_steps=8)
    trainer.fit(model, tiny_loader(batches=4))
    if merge == "lora.merge()":
        lora.merge()
    trainer.save_checkpoint(tmp_path / "merged.ckpt")
    saved = torch.load(tmp_path / "merged.ckpt", weights_only=True)["state_dict"]
    assert not [k for k in saved if "lora_" in k]
    for key, value in model.state_dict().items():
        assert torch.equal(saved[key], value), key
    (merged,) = make_trainer().validate(model, loader)
    (evaluated,) = make_trainer().validate(TinyRegressor(), loader, ckpt_path=tmp_path / "merged.ckpt")
    assert evaluated["val/loss"] == merged["val/loss"]


def test_validating_after_the_merge_ignores_the_averages_stale_copy(seeded):
    """EMA swaps its copy in at every validation, even after the fit; once LoRA has merged
    the adapters the copy no longer pairs with the model (shapes failed, or other tensors
    were evaluated in silence), so the validation is that of the merged model alone."""
    model, loader = TinyRegressor(), tiny_loader(batches=2, seed=1)
    lora = LoRA(r=2, target_modules=["fc1"], merge_on_fit_end=True)
    trainer = make_trainer(callbacks=[lora, EMAWeightAveraging(decay=0.5)], max_steps=8)
    trainer.fit(model, tiny_loader(batches=4))
    assert not any("lora_" in n for n, _ in model.named_parameters())  # merged
    (same_trainer,) = trainer.validate(model, loader)
    (fresh_trainer,) = make_trainer().validate(model, loader)
    assert same_trainer["val/loss"] == fresh_trainer["val/loss"]


def test_the_same_lora_on_a_copy_of_its_model_acts_on_the_copy(seeded):
    """A ``copy.deepcopy`` of an adapted model carries the adapters' marks; the callback
    that fits the copy must then merge (and save) the copy's adapters, not the original's."""
    original, lora = TinyRegressor(), LoRA(r=2, target_modules=["fc1"], merge_on_fit_end=False)
    make_trainer(callbacks=[lora], max_steps=4).fit(original, tiny_loader(batches=4))
    twin = copy.deepcopy(original)
    make_trainer(callbacks=[lora], max_steps=4).fit(twin, tiny_loader(batches=4, seed=3))
    assert not torch.equal(twin.fc1.lora_B.detach(), original.fc1.lora_B.detach())
    lora.merge()
    assert not any("lora_" in n for n, _ in twin.named_parameters())
    assert {n for n, _ in original.named_parameters() if "lora_" in n} == {"fc1.lora_A", "fc1.lora_B"}


class WithBatchNorm(TinyRegressor):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(8)

    def forward(self, x):
        h = torch.relu(self.norm(self.conv(x))).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


@pytest.mark.parametrize("model_class", [WithBatchNorm, TinyRegressor])
def test_swa_with_qat_freezing_batch_norm_is_refused_on_a_model_with_batch_norm(model_class, seeded):
    """SWA recomputes the BatchNorm statistics in an extra epoch in train mode; QAT's
    ``freeze_bn_step`` keeps BatchNorm in eval mode, which left them at mean 0, variance 1."""
    qat = QuantizationAwareTraining("int8", start_step=0, freeze_bn_step=2)
    model = model_class()
    trainer = make_trainer(callbacks=[qat, StochasticWeightAveraging(swa_lrs=1e-2, swa_epoch_start=2)], max_epochs=3)
    if model_class is TinyRegressor:  # no BatchNorm: nothing to recompute
        trainer.fit(model, tiny_loader(batches=4))
        assert trainer.global_step == 12
        return
    with pytest.raises(IncompatibleSettings, match=r"freeze_bn_step=2.*Set freeze_bn_step=None, or use EMAWeightAveraging"):
        trainer.fit(model, tiny_loader(batches=4))
    assert trainer.global_step == 0


def test_distillation_stacks_with_ema(seeded):
    """The teacher is not a parameter of the model, so the average is of the student's
    latent weights alone."""
    model, recorder = TinyRegressor(), RecordRawWeights()
    teacher = TinyRegressor()
    kd = KnowledgeDistillation(teacher, loss="mse", alpha=0.5)
    callbacks = [kd, *compression(), EMAWeightAveraging(decay=DECAY, update_starting_at_step=FROM_STEP), recorder]
    make_trainer(callbacks=callbacks, max_steps=10).fit(model, tiny_loader())
    expected = hand_ema(recorder.steps)
    assert set(expected) == {n for n, _ in TinyRegressor().named_parameters()}
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.detach(), expected[name], rtol=0, atol=1e-6)
