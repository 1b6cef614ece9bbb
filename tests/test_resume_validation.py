"""A resume continues the run it resumes, or is refused naming what differs: emptied or
edited masks, a method left out, changed settings, state that is not what we write."""

import pytest
import torch

from lightning_compress import MagnitudePruning, QuantizationAwareTraining
from tests.conftest import StopAfterEpoch, TinyRegressor, make_trainer, tiny_loader


def pruning(**changes):
    return MagnitudePruning(**{"final_sparsity": 0.5, "start_step": 0, "end_step": 8, "update_every": 2, **changes})


@pytest.fixture
def stopped(tmp_path):
    """A pruning + QAT run stopped after its first epoch (8 steps, masks at 50%)."""
    torch.manual_seed(0)
    path = tmp_path / "mid.ckpt"
    make_trainer(max_epochs=3, callbacks=[pruning(), QuantizationAwareTraining("int8", start_step=4),
                                          StopAfterEpoch(1, path)]).fit(TinyRegressor(), tiny_loader())
    return path


def resume(path, *callbacks):
    trainer = make_trainer(max_epochs=3, callbacks=list(callbacks))
    trainer.fit(TinyRegressor(), tiny_loader(), ckpt_path=path)
    return trainer


def edit(path, change):
    checkpoint = torch.load(path, weights_only=True)
    key = next(k for k in checkpoint["callbacks"] if k.startswith("MagnitudePruning"))
    change(checkpoint["callbacks"][key])
    torch.save(checkpoint, path)


def test_an_unchanged_resume_continues(stopped):
    prune = pruning()
    resume(stopped, prune, QuantizationAwareTraining("int8", start_step=4))
    assert prune.sparsity == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s["masks"].clear(), r"masks prune 0\.0000 of the targeted weights but its state records 0\.5"),
        (lambda s: [m["packed"].fill_(0) for m in s["masks"].values()], r"masks prune 1\.0000 .* records 0\.5"),
        (lambda s: s["masks"]["fc1"].update(shape=[8, 64]), r"mask of layer 'fc1' has shape \[8, 64\] but the layer's weight is \[32, 64\]"),
        (lambda s: s["masks"]["fc1"].update(packed=s["masks"]["fc1"]["packed"][:-1]), r"mask of layer 'fc1'.*do not fill it"),
        (lambda s: s.pop("masks"), r"MagnitudePruning state is malformed \(KeyError: 'masks'\)"),
        (lambda s: s.update(settings=[1]), r"MagnitudePruning settings are malformed"),
    ],
    ids=["emptied", "all-pruned", "shape", "truncated", "missing-key", "settings-type"],
)
def test_edited_masks_are_refused(stopped, change, message):
    edit(stopped, change)
    with pytest.raises(ValueError, match=message):
        resume(stopped, pruning(), QuantizationAwareTraining("int8", start_step=4))


@pytest.mark.parametrize(
    "callbacks, message",
    [
        ([pruning(final_sparsity=0.8), QuantizationAwareTraining("int8", start_step=4)],
         r"MagnitudePruning was trained with other settings \(`final_sparsity`: 0\.5 in the checkpoint, 0\.8 now\)"),
        ([pruning(end_step=16), QuantizationAwareTraining("int8", start_step=4)], r"`end_step`: 8 in the checkpoint, 16 now"),
        ([pruning(), QuantizationAwareTraining("int8", start_step=6)],
         r"QuantizationAwareTraining was trained with other settings \(`start_step`: 4 in the checkpoint, 6 now\)"),
        ([QuantizationAwareTraining("int8", start_step=4)],
         r"holds state of MagnitudePruning .* no callback of this Trainer takes it"),
    ],
    ids=["final_sparsity", "end_step", "qat-start_step", "pruning-left-out"],
)
def test_changed_settings_or_a_left_out_method_are_refused(stopped, callbacks, message):
    with pytest.raises(ValueError, match=message):
        resume(stopped, *callbacks)


def test_a_checkpoint_from_before_settings_were_recorded_still_resumes(stopped):
    edit(stopped, lambda s: s.pop("settings"))
    prune = pruning()
    resume(stopped, prune, QuantizationAwareTraining("int8", start_step=4))
    assert prune.sparsity == pytest.approx(0.5, abs=0.01)


def test_evaluating_with_a_subset_of_the_methods_is_allowed(stopped):
    # validate/test from a checkpoint may rebuild part of the stack on purpose
    trainer = make_trainer(callbacks=[QuantizationAwareTraining("int8", start_step=4)])
    trainer.validate(TinyRegressor(), tiny_loader(batches=2), ckpt_path=stopped)
