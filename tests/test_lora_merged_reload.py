"""Merged LoRA models and checkpoints.

A model whose adapters were merged, asked to evaluate a checkpoint written before the
merge (which holds the adapters): LoRA puts fresh adapters back for the checkpoint's values
(Lightning's strict load failed on their keys) and merges them again after the load, or
refuses before touching the model where the frozen weights cannot be rebuilt. A checkpoint
written after the merge, evaluated with a LoRA callback: its fresh adapters are merged
before the load (Lightning's strict load missed their keys)."""

from __future__ import annotations

import pytest
from lightning.pytorch.callbacks import StochasticWeightAveraging

from lightning_compress import LoRA
from tests.conftest import TinyRegressor, fit_and_save, make_trainer, tiny_loader


def adapter_names(model):
    return {n for n, _ in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("averaging", ["none", "swa"])
def test_a_merged_model_evaluates_a_checkpoint_that_holds_its_adapters(averaging, tmp_path, seeded):
    extra = [StochasticWeightAveraging(swa_lrs=1e-2)] if averaging == "swa" else []
    lora = LoRA(r=2, target_modules=["fc1"], merge_on_fit_end=False)
    model, trainer = fit_and_save(tmp_path, [lora, *extra])
    loader = tiny_loader(batches=2, seed=1)
    (adapted,) = trainer.validate(model, loader)
    lora.merge()
    (merged,) = trainer.validate(model, loader)
    (restored,) = trainer.validate(model, loader, ckpt_path=tmp_path / "fit.ckpt")
    assert not adapter_names(model) and lora.adapters == {}  # merged again after the load, as the user left it
    assert restored["val/loss"] == pytest.approx(adapted["val/loss"], rel=1e-5)
    assert merged["val/loss"] == pytest.approx(adapted["val/loss"], rel=1e-5)
    assert make_trainer().validate(model, loader)[0]["val/loss"] == restored["val/loss"]


def test_two_merged_lora_callbacks_both_take_their_adapters_back(tmp_path, seeded):
    first = LoRA(r=2, target_modules=["fc1"], merge_on_fit_end=False, name="first")
    second = LoRA(r=2, target_modules=["fc2"], merge_on_fit_end=False, name="second")
    model, trainer = fit_and_save(tmp_path, [first, second])
    loader = tiny_loader(batches=2, seed=1)
    (adapted,) = trainer.validate(model, loader)
    first.merge(), second.merge()
    model.fc1.weight.data.zero_(), model.fc2.weight.data.zero_()  # the checkpoint's weights must come back
    (restored,) = trainer.validate(model, loader, ckpt_path=tmp_path / "fit.ckpt")
    assert not adapter_names(model)
    assert restored["val/loss"] == pytest.approx(adapted["val/loss"], rel=1e-5)


def test_a_checkpoint_written_after_the_merge_evaluates_with_a_lora_callback(tmp_path, seeded):
    """The checkpoint holds the merged weights and no adapter: the fresh adapters a LoRA
    callback adds for it are merged before the load."""
    model, trainer = fit_and_save(tmp_path, [LoRA(r=2, target_modules=["fc1"], merge_on_fit_end=True)])
    assert not adapter_names(model)
    loader = tiny_loader(batches=2, seed=1)
    (merged,) = trainer.validate(model, loader)
    fresh = TinyRegressor()
    (metrics,) = make_trainer(callbacks=[LoRA(r=2, target_modules=["fc1"])]).validate(
        fresh, loader, ckpt_path=tmp_path / "fit.ckpt")
    assert metrics["val/loss"] == merged["val/loss"]
    assert not adapter_names(fresh)


@pytest.mark.parametrize("setting", ["adapter_only_checkpoints", "nf4"])
def test_a_merged_model_refuses_a_checkpoint_without_its_frozen_weights_untouched(setting, tmp_path, seeded):
    """The checkpoint leaves the frozen weights out; the model's own now hold the merged
    adapters, so they cannot stand in for them. Refused before any adapter is put back."""
    options = ({"adapter_only_checkpoints": True} if setting == "adapter_only_checkpoints" else
               {"base": "nf4", "nf4_block_size": 32, "nf4_scaler_block_size": 16})
    lora = LoRA(r=2, target_modules=["fc1"], merge_on_fit_end=False, **options)
    model, trainer = fit_and_save(tmp_path, [lora])
    lora.merge()
    loader = tiny_loader(batches=2, seed=1)
    (merged,) = trainer.validate(model, loader)
    with pytest.raises(ValueError, match=r"merged into its weights.*built anew from the same pretrained weights"):
        trainer.validate(model, loader, ckpt_path=tmp_path / "fit.ckpt")
    assert not adapter_names(model)
    assert make_trainer().validate(model, loader)[0]["val/loss"] == merged["val/loss"]  # the model is as it was
