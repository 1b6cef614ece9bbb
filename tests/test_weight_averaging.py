"""Lightning's weight averaging (``EMAWeightAveraging``) stacked with the compression callbacks.

``WeightAveraging`` copies the model in its ``setup`` and pairs the copy's parameters with
the model's by position. QAT and pruning keep the model's parameters, so the average is of
the latent (raw) weights, the masks and fake quantization act on it, the export packs it,
and a resume restores it exactly. LoRA adds parameters and must set up first; its NF4 base
cannot be copied by ``copy.deepcopy``: both refused before training, in any order.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging

from lightning_compress import (
    CompressedExport,
    LoRA,
    MagnitudePruning,
    QuantizationAwareTraining,
    load_packed,
    quantized_weights,
)
from lightning_compress.callbacks.compatibility import IncompatibleSettings
from tests.conftest import StopAfterEpoch, TinyRegressor, make_trainer, tiny_loader

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


def test_resume_restores_the_average_exactly(tmp_path, seeded):
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in TinyRegressor().state_dict().items()}

    def run(extra=(), ckpt_path=None):
        model = TinyRegressor()
        model.load_state_dict(initial)
        torch.manual_seed(1)
        averaging = EMAWeightAveraging(decay=DECAY, update_starting_at_step=FROM_STEP)
        trainer = make_trainer(max_epochs=3, callbacks=[*compression(), averaging, *extra])
        trainer.fit(model, tiny_loader(batches=4), ckpt_path=ckpt_path)
        return model

    reference = run()
    checkpoint = tmp_path / "mid.ckpt"
    run([StopAfterEpoch(1, checkpoint)])  # 8 steps: the average has taken 2 of them
    resumed = run(ckpt_path=checkpoint)
    saved = torch.load(checkpoint, weights_only=True)
    assert "current_model_state" in saved  # the checkpoint held both the model and its average
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


@pytest.mark.parametrize("order", ["averaging first", "lora first"])
def test_qlora_is_refused_before_training(order, seeded):
    lora = LoRA(r=2, base="nf4", target_modules=["fc1"], nf4_block_size=32, nf4_scaler_block_size=16)
    callbacks = [EMAWeightAveraging(decay=DECAY), lora]
    model = TinyRegressor()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(callbacks=callbacks if order == "averaging first" else callbacks[::-1], max_steps=4)
    with pytest.raises(IncompatibleSettings, match=r"LoRA\(base='nf4'\).*EMAWeightAveraging.*use LoRA\(base='float'\)"):
        trainer.fit(model, tiny_loader(batches=4))
    assert trainer.global_step == 0
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_lora_after_the_averaging_callback_is_refused_with_the_order_that_works(seeded):
    trainer = make_trainer(callbacks=[EMAWeightAveraging(decay=DECAY), LoRA(r=2, target_modules=["fc1"])], max_steps=4)
    with pytest.raises(IncompatibleSettings, match=r"callbacks\[0\].*LoRA \(callbacks\[1\]\).*Put LoRA before"):
        trainer.fit(TinyRegressor(), tiny_loader(batches=4))
    assert trainer.global_step == 0


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
