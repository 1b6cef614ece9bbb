"""A model whose LoRA adapters were merged, then asked to evaluate (or resume from) a
checkpoint written before the merge, which holds the adapters: LoRA puts fresh adapters
back for the checkpoint's values (Lightning's strict load failed on their keys), with a
warning, or refuses before touching the model where the frozen weights cannot be rebuilt."""

from __future__ import annotations

import pytest
from lightning.pytorch.callbacks import StochasticWeightAveraging

from lightning_compress import LoRA
from tests.conftest import TinyRegressor, make_trainer, tiny_loader


def fit_and_save(tmp_path, callbacks):
    model = TinyRegressor()
    trainer = make_trainer(callbacks=callbacks, max_epochs=3)
    trainer.fit(model, tiny_loader(batches=4))
    trainer.save_checkpoint(tmp_path / "fit.ckpt")
    return model, trainer


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
    with pytest.warns(UserWarning, match=r"adapters merged into \['fc1'\] are back.*call `merge\(\)` again"):
        (restored,) = trainer.validate(model, loader, ckpt_path=tmp_path / "fit.ckpt")
    assert adapter_names(model) == {"fc1.lora_A", "fc1.lora_B"}
    assert restored["val/loss"] == pytest.approx(adapted["val/loss"], rel=1e-6)
    assert merged["val/loss"] == pytest.approx(adapted["val/loss"], rel=1e-5)
    lora.merge()  # what the warning says: merged again, the model computes as before
    assert not adapter_names(model)
    assert trainer.validate(model, loader)[0]["val/loss"] == pytest.approx(adapted["val/loss"], rel=1e-5)


def test_two_merged_lora_callbacks_both_take_their_adapters_back(tmp_path, seeded):
    first = LoRA(r=2, target_modules=["fc1"], merge_on_fit_end=False, name="first")
    second = LoRA(r=2, target_modules=["fc2"], merge_on_fit_end=False, name="second")
    model, trainer = fit_and_save(tmp_path, [first, second])
    loader = tiny_loader(batches=2, seed=1)
    (adapted,) = trainer.validate(model, loader)
    first.merge(), second.merge()
    with pytest.warns(UserWarning, match="are back"):
        (restored,) = trainer.validate(model, loader, ckpt_path=tmp_path / "fit.ckpt")
    assert adapter_names(model) == {"fc1.lora_A", "fc1.lora_B", "fc2.lora_A", "fc2.lora_B"}
    assert restored["val/loss"] == pytest.approx(adapted["val/loss"], rel=1e-6)


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
