"""Merged LoRA models and checkpoints.

A model whose adapters were merged, asked to evaluate a checkpoint written before the
merge (which holds the adapters): LoRA puts fresh adapters back for the checkpoint's values
(Lightning's strict load failed on their keys) and merges them again after the load, or
refuses before touching the model where the frozen weights cannot be rebuilt. A checkpoint
written after the merge, evaluated with a LoRA callback: its fresh adapters are merged
before the load (Lightning's strict load missed their keys)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import StochasticWeightAveraging

from lightning_compress import LoRA, merge_adapters
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


def test_merge_adapters_counts_as_the_callbacks_merge(tmp_path, seeded):
    """``merge_adapters(model)`` (the README's step before ``save_pretrained``) merges the
    callback's adapters behind its back: a later evaluation of a pre-merge checkpoint must
    leave the model merged too, and a checkpoint saved after it must hold the merged
    weights (with ``adapter_only_checkpoints`` it held none of them)."""
    lora = LoRA(r=2, target_modules=["fc1"], merge_on_fit_end=False, adapter_only_checkpoints=True)
    model, trainer = fit_and_save(tmp_path, [lora])
    loader = tiny_loader(batches=2, seed=1)
    (adapted,) = trainer.validate(model, loader)
    assert merge_adapters(model) == ["fc1"]
    trainer.save_checkpoint(tmp_path / "merged.ckpt")
    saved = torch.load(tmp_path / "merged.ckpt", weights_only=True)["state_dict"]
    assert set(saved) == set(TinyRegressor().state_dict())  # every weight, the merged fc1 among them
    assert torch.equal(saved["fc1.weight"], model.fc1.weight.detach())
    (plain,) = make_trainer().validate(TinyRegressor(), loader, ckpt_path=tmp_path / "merged.ckpt")
    assert plain["val/loss"] == pytest.approx(adapted["val/loss"], rel=1e-5)
    (with_lora,) = make_trainer(callbacks=[LoRA(r=2, target_modules=["fc1"])]).validate(
        TinyRegressor(), loader, ckpt_path=tmp_path / "merged.ckpt")  # its LoRA state says merged, too
    assert with_lora["val/loss"] == plain["val/loss"]
    with pytest.raises(ValueError, match="merged into its weights"):  # adapter-only: its frozen weights are gone
        trainer.validate(model, loader, ckpt_path=tmp_path / "fit.ckpt")


def test_merge_adapters_then_a_pre_merge_checkpoint_leaves_the_model_merged(tmp_path, seeded):
    lora = LoRA(r=2, target_modules=["fc1"], merge_on_fit_end=False)
    model, trainer = fit_and_save(tmp_path, [lora])
    loader = tiny_loader(batches=2, seed=1)
    (adapted,) = trainer.validate(model, loader)
    merge_adapters(model)
    (restored,) = trainer.validate(model, loader, ckpt_path=tmp_path / "fit.ckpt")
    assert not adapter_names(model)
    assert restored["val/loss"] == pytest.approx(adapted["val/loss"], rel=1e-5)


def test_resuming_a_fit_from_a_checkpoint_saved_after_the_merge_is_refused(tmp_path, seeded):
    """Nothing is left to resume: the optimizer state is that of the merged adapters
    (torch failed on the parameter groups)."""
    model, trainer = fit_and_save(tmp_path, [LoRA(r=2, target_modules=["fc1"], merge_on_fit_end=True)])
    trainer = make_trainer(callbacks=[LoRA(r=2, target_modules=["fc1"])], max_epochs=4)
    with pytest.raises(ValueError, match=r"saved after LoRA merged its adapters.*start a new fit without `ckpt_path`"):
        trainer.fit(TinyRegressor(), tiny_loader(batches=4), ckpt_path=tmp_path / "fit.ckpt")
    assert trainer.global_step == 0


def test_a_refusal_by_one_of_two_merged_loras_leaves_the_model_untouched(tmp_path, seeded):
    """Every LoRA callback checks the checkpoint before any of them puts adapters back."""
    first = LoRA(r=2, target_modules=["fc1"], merge_on_fit_end=False, name="first")
    second = LoRA(r=2, target_modules=["fc2"], merge_on_fit_end=False, name="second", adapter_only_checkpoints=True)
    model, trainer = fit_and_save(tmp_path, [first, second])
    first.merge(), second.merge()
    loader = tiny_loader(batches=2, seed=1)
    (merged,) = make_trainer().validate(model, loader)
    with pytest.raises(ValueError, match="merged into its weights"):
        trainer.validate(model, loader, ckpt_path=tmp_path / "fit.ckpt")
    assert not adapter_names(model) and first.adapters == {} and second.adapters == {}
    assert make_trainer().validate(model, loader)[0]["val/loss"] == merged["val/loss"]


def test_a_merged_model_refuses_a_checkpoint_of_other_adapters_untouched(tmp_path, seeded):
    fit_and_save(tmp_path, [LoRA(r=2, target_modules=["fc1"], merge_on_fit_end=False)])
    other = LoRA(r=4, target_modules=["fc1"], merge_on_fit_end=True)
    (tmp_path / "other").mkdir()
    merged_model, merged_trainer = fit_and_save(tmp_path / "other", [other])
    with pytest.raises(ValueError, match=r"have r=2 but this callback has r=4"):
        merged_trainer.validate(merged_model, tiny_loader(batches=2, seed=1), ckpt_path=tmp_path / "fit.ckpt")
    assert not adapter_names(merged_model) and other.adapters == {}


def test_a_checkpoint_saved_after_the_merge_fits_a_lora_of_any_rank(tmp_path, seeded):
    """It holds no adapters, so the rank of the callback that evaluates it does not matter."""
    model, trainer = fit_and_save(tmp_path, [LoRA(r=2, target_modules=["fc1"], merge_on_fit_end=True)])
    loader = tiny_loader(batches=2, seed=1)
    (merged,) = trainer.validate(model, loader)
    (metrics,) = make_trainer(callbacks=[LoRA(r=8, target_modules=["fc1"])]).validate(
        TinyRegressor(), loader, ckpt_path=tmp_path / "fit.ckpt")
    assert metrics["val/loss"] == merged["val/loss"]


def test_swa_saved_after_the_merge_holds_the_merged_model(tmp_path, seeded):
    """SWA's copy from the fit holds the adapters; merged, it copies the merged model again,
    so a checkpoint saved then loads into any Trainer with SWA."""
    swa = StochasticWeightAveraging(swa_lrs=1e-2)
    model, trainer = fit_and_save(tmp_path, [LoRA(r=2, target_modules=["fc1"], merge_on_fit_end=True), swa])
    saved = torch.load(tmp_path / "fit.ckpt", weights_only=True)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("StochasticWeightAveraging")]
    assert not [k for k in state["average_model_state"] if "lora_" in k]
    loader = tiny_loader(batches=2, seed=1)
    (merged,) = make_trainer().validate(model, loader)
    for callbacks in ([StochasticWeightAveraging(swa_lrs=1e-2)],
                      [LoRA(r=2, target_modules=["fc1"]), StochasticWeightAveraging(swa_lrs=1e-2)]):
        (metrics,) = make_trainer(callbacks=callbacks).validate(TinyRegressor(), loader, ckpt_path=tmp_path / "fit.ckpt")
        assert metrics["val/loss"] == merged["val/loss"]


def test_a_refusal_after_the_adapters_went_back_merges_them_again(tmp_path, seeded):
    """SWA listed before LoRA cannot load the checkpoint's average: refused once LoRA put
    fresh adapters back for the checkpoint, which are merged again (zero B: the model as it
    was), so the callback still knows its adapters are merged, and no load hook is left
    on the model (Lightning skips teardown after an exception)."""
    lora = LoRA(r=2, target_modules=["fc1"], merge_on_fit_end=False)
    model, trainer = fit_and_save(tmp_path, [lora, StochasticWeightAveraging(swa_lrs=1e-2)])
    lora.merge()
    loader = tiny_loader(batches=2, seed=1)
    (merged,) = make_trainer().validate(model, loader)
    trainer = make_trainer(callbacks=[StochasticWeightAveraging(swa_lrs=1e-2), lora])
    with pytest.raises(Exception, match="List LoRA before StochasticWeightAveraging"):
        trainer.validate(model, loader, ckpt_path=tmp_path / "fit.ckpt")
    assert not adapter_names(model) and lora.adapters == {}
    assert "on_load_checkpoint" not in vars(model)
    with pytest.raises(ValueError, match="merge"):
        lora.save_adapters(tmp_path / "adapters")  # merged: nothing to save
    assert make_trainer().validate(model, loader)[0]["val/loss"] == pytest.approx(merged["val/loss"], rel=1e-6)
