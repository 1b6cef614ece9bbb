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
        ([pruning(), QuantizationAwareTraining("int8", start_step=4, ewgs_delta=0.2)],
         r"\(`ewgs_delta`: 0\.0 in the checkpoint, 0\.2 now\)"),
    ],
    ids=["final_sparsity", "end_step", "qat-start_step", "pruning-left-out", "qat-ewgs_delta"],
)
def test_changed_settings_or_a_left_out_method_are_refused(stopped, callbacks, message):
    with pytest.raises(ValueError, match=message):
        resume(stopped, *callbacks)


def test_a_checkpoint_from_before_settings_were_recorded_still_resumes(stopped):
    edit(stopped, lambda s: s.pop("settings"))
    prune = pruning()
    resume(stopped, prune, QuantizationAwareTraining("int8", start_step=4))
    assert prune.sparsity == pytest.approx(0.5, abs=0.01)


def _edit_qat(path, change):
    checkpoint = torch.load(path, weights_only=True)
    change(checkpoint["callbacks"][next(k for k in checkpoint["callbacks"] if k.startswith("QuantizationAware"))])
    torch.save(checkpoint, path)


def test_a_checkpoint_from_before_ewgs_delta_trained_with_the_plain_ste(stopped):
    """A new user's checkpoint without the key (written before the option existed)
    resumed with any `ewgs_delta`, silently: its run trained with the plain STE (0.0)."""
    _edit_qat(stopped, lambda state: state["settings"].pop("ewgs_delta"))
    with pytest.raises(ValueError, match=r"\(`ewgs_delta`: 0\.0 in the checkpoint, 0\.2 now\)"):
        resume(stopped, pruning(), QuantizationAwareTraining("int8", start_step=4, ewgs_delta=0.2))
    resume(stopped, pruning(), QuantizationAwareTraining("int8", start_step=4))  # as trained: continues


def test_an_evaluation_does_not_check_a_setting_of_the_backward_alone(stopped):
    """`ewgs_delta` changes only how training steps compute: validating the checkpoint with
    another value measures the same model (it was refused as a "resumed run")."""
    val = tiny_loader(batches=2, seed=3)
    as_trained = make_trainer(callbacks=[pruning(), QuantizationAwareTraining("int8", start_step=4)]).validate(
        TinyRegressor(), val, ckpt_path=stopped, verbose=False)
    other = make_trainer(callbacks=[pruning(), QuantizationAwareTraining("int8", start_step=4, ewgs_delta=0.3)]).validate(
        TinyRegressor(), val, ckpt_path=stopped, verbose=False)
    assert other == as_trained
    with pytest.raises(ValueError, match=r"`start_step`: 4 in the checkpoint, 6 now"):  # other settings still are
        make_trainer(callbacks=[pruning(), QuantizationAwareTraining("int8", start_step=6)]).validate(
            TinyRegressor(), val, ckpt_path=stopped, verbose=False)


def test_evaluating_with_a_subset_of_the_methods_is_allowed(stopped):
    # validate/test from a checkpoint may rebuild part of the stack on purpose
    trainer = make_trainer(callbacks=[QuantizationAwareTraining("int8", start_step=4)])
    trainer.validate(TinyRegressor(), tiny_loader(batches=2), ckpt_path=stopped)


def test_a_resume_with_more_epochs_continues_the_schedule_the_fractions_resolved_to(tmp_path):
    """Fractional steps resolve against the length of the run that started them: resumed
    with more epochs, the pruning window 0.25-0.75 and the QAT start 0.5 of a 3-epoch run
    (24 steps: 6-18, 12) stay where they were, as in a 4-epoch run given those steps.
    Resolved again against 32 steps (8-24, 16), the resumed run released masks the
    checkpoint held, and trained in float again until step 16."""
    def run(epochs, prune, qat, extra=(), ckpt_path=None):
        torch.manual_seed(0)
        model = TinyRegressor()
        make_trainer(max_epochs=epochs, callbacks=[prune, qat, *extra]).fit(model, tiny_loader(), ckpt_path=ckpt_path)
        return model

    def fractions():
        return (MagnitudePruning(0.5, start_step=0.25, end_step=0.75, update_every=2),
                QuantizationAwareTraining("int8", start_step=0.5))

    reference = run(4, MagnitudePruning(0.5, start_step=6, end_step=18, update_every=2),
                    QuantizationAwareTraining("int8", start_step=12))
    path = tmp_path / "epoch1.ckpt"
    run(3, *fractions(), extra=[StopAfterEpoch(1, path)])  # steps 0-15: pruned to 0.45, QAT on since 12
    prune, qat = fractions()
    with pytest.warns(UserWarning, match=r"MagnitudePruning: this run has 32 optimizer steps, the run it resumes had"
                                         r" 24; `start_step`=0\.25 at step 6, `end_step`=0\.75 at step 18 stay"):
        resumed = run(4, prune, qat, ckpt_path=path)
    assert qat._start == 12 and prune._window[:2] == (6, 18)
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    # The length is kept in the checkpoints of the resumed run too.
    assert torch.load(path, weights_only=True)["callbacks"][qat.state_key]["total_steps"] == 24


def test_a_run_length_that_is_not_a_number_is_refused(stopped):
    edit(stopped, lambda s: s.update(total_steps="24"))
    with pytest.raises(ValueError, match=r"MagnitudePruning state is malformed \(`total_steps` '24' is not a number\)"):
        resume(stopped, pruning(), QuantizationAwareTraining("int8", start_step=4))


def test_a_shorter_resume_keeps_the_window_and_says_it_will_not_end(tmp_path):
    """Resumed with 16 steps where the run had 24, the window 0.25-0.75 stays at steps 6-18,
    and the end-of-run warning is about this run: step 18 is past its 16 steps."""
    import warnings

    path = tmp_path / "epoch0.ckpt"
    torch.manual_seed(0)
    make_trainer(max_epochs=3, callbacks=[MagnitudePruning(0.5, start_step=0.25, end_step=0.75, update_every=2),
                                          StopAfterEpoch(0, path)]).fit(TinyRegressor(), tiny_loader())
    prune = MagnitudePruning(0.5, start_step=0.25, end_step=0.75, update_every=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(max_epochs=2, callbacks=[prune]).fit(TinyRegressor(), tiny_loader(), ckpt_path=path)
    messages = [str(w.message) for w in caught]
    assert prune._window[:2] == (6, 18)
    assert any("`end_step` is step 18 but the run has 16 optimizer steps; `final_sparsity`=0.5 will not be reached"
               in m for m in messages), messages
    assert any("the run it resumes had 24; `start_step`=0.25 at step 6, `end_step`=0.75 at step 18 stay" in m
               for m in messages), messages


def test_absolute_steps_keep_no_run_length_and_warn_about_this_run(tmp_path):
    """Steps given as ints do not depend on the length: nothing is kept, and a longer
    resume does not warn that `end_step` 20 lies past the first run's 16 steps."""
    import warnings

    path = tmp_path / "epoch0.ckpt"
    torch.manual_seed(0)
    first = MagnitudePruning(0.5, start_step=4, end_step=20, update_every=2)
    with pytest.warns(UserWarning, match="`end_step` is step 20 but the run has 16 optimizer steps"):
        make_trainer(max_epochs=2, callbacks=[first, StopAfterEpoch(0, path)]).fit(TinyRegressor(), tiny_loader())
    assert "total_steps" not in torch.load(path, weights_only=True)["callbacks"][first.state_key]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(will not be reached|the run it resumes had)")
        make_trainer(max_epochs=4, callbacks=[MagnitudePruning(0.5, start_step=4, end_step=20, update_every=2)]).fit(
            TinyRegressor(), tiny_loader(), ckpt_path=path)


def test_a_checkpoint_saved_after_validate_keeps_the_run_length(tmp_path):
    """validate() between fit and save_checkpoint set the callbacks up again; the length
    the fractions resolved against must survive it."""
    torch.manual_seed(0)
    qat = QuantizationAwareTraining("int8", start_step=0.5)
    trainer = make_trainer(max_epochs=3, callbacks=[qat])
    trainer.fit(TinyRegressor(), tiny_loader())
    trainer.validate(trainer.lightning_module, tiny_loader(batches=2), verbose=False)
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    assert torch.load(tmp_path / "after.ckpt", weights_only=True)["callbacks"][qat.state_key]["total_steps"] == 24


def test_changed_settings_and_layer_grids_are_refused_in_one_error(stopped):
    """The settings were refused first and the grids only once those were put back: one
    run per difference to find them all."""
    with pytest.raises(ValueError) as caught:
        resume(stopped, pruning(), QuantizationAwareTraining("int4", start_step=6))
    message = str(caught.value)
    assert message.startswith("QuantizationAwareTraining was trained with other settings (`start_step`: 4 in the"
                              " checkpoint, 6 now; layer ")
    assert "was trained with int8 channel sym but this callback quantizes it as int4 channel sym" in message
    # A grid alone is still refused by the restore, as before.
    with pytest.raises(ValueError, match=r"was trained with int8 channel sym but this callback quantizes it as int4"
                                         r" channel sym.*, so it would continue or be exported on a grid"):
        resume(stopped, pruning(), QuantizationAwareTraining("int4", start_step=4))
