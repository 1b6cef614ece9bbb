"""Statistics gathered from training forwards under activation checkpointing.

Checkpointing runs a block's forward again inside the backward (the reentrant kind runs
the first forward under no_grad). A static activation observer, a GPTQ start's Hessians
and wanda's input norms must count each training forward once, and see what the forward
saw, so a checkpointed run ends exactly where the same run without checkpointing ends.
"""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from lightning_compress import MagnitudePruning, QuantizationAwareTraining
from lightning_compress.quant.activations import input_quantizer_of
from tests.conftest import TinyRegressor, make_trainer, tiny_loader


class CheckpointedRegressor(TinyRegressor):
    """TinyRegressor with ``fc1`` run under activation checkpointing (``reentrant``), or
    without (None)."""

    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        if self.reentrant is not None:  # the reentrant kind only trains fc1 for an input needing grad
            h = checkpoint(self.fc1, h, use_reentrant=self.reentrant)
        else:
            h = self.fc1(h)
        return self.fc2(torch.relu(h))


CALLBACKS = {
    "static observer": lambda: QuantizationAwareTraining("int8", activations="int8_static",
                                                         observer="moving_average", calibration_steps=6),
    "gptq start": lambda: QuantizationAwareTraining("int4", group_size=16, init="gptq", calibration_batches=2,
                                                    start_step=3, targets=["fc1", "fc2"]),
    "wanda": lambda: MagnitudePruning(0.5, score="wanda", start_step=1, end_step=4, update_every=1,
                                      targets=["fc1", "fc2"]),
}


def trained(reentrant, make_callback, **trainer_options):
    torch.manual_seed(0)
    model = CheckpointedRegressor(reentrant)
    trainer = make_trainer(max_steps=6, callbacks=[make_callback()], **trainer_options)
    trainer.fit(model, tiny_loader(batches=8))
    return model


@pytest.mark.parametrize("setting", sorted(CALLBACKS))
@pytest.mark.parametrize("reentrant", [False, True])
def test_a_checkpointed_run_ends_where_the_run_without_checkpointing_ends(setting, reentrant):
    reference = trained(None, CALLBACKS[setting])
    model = trained(reentrant, CALLBACKS[setting])
    result = model.state_dict()
    assert reference.state_dict().keys() == result.keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(result[key], value), key
    assert torch.equal(model.fc1.weight, reference.fc1.weight)  # the effective weight
    # The checkpointed layer's statistics were gathered (the checks above would also pass
    # if neither run gathered any).
    effective = model.fc1.weight.detach()
    if setting == "wanda":
        assert (effective == 0).float().mean() == 0.5
    elif setting == "gptq start":  # int4 group 16: at most 16 values a group
        groups = effective.reshape(-1, 16).sort(dim=1).values
        assert int((1 + (groups[:, 1:] != groups[:, :-1]).sum(dim=1)).max()) <= 16
    else:
        observer, expected = input_quantizer_of(model.fc1), input_quantizer_of(reference.fc1)
        assert observer.high > 0 and (observer.low, observer.high) == (expected.low, expected.high)


@pytest.mark.parametrize("setting", ["gptq start", "static observer"])
def test_validation_inside_the_calibration_window_is_not_recorded(setting):
    """Validation after every batch, under no_grad (``inference_mode=False``) and in
    training mode for the modules (what no_grad alone does not tell apart from reentrant
    checkpointing's forward), leaves the GPTQ start and the observed range unchanged; so
    does a forward in train mode after fit."""

    class ValidatesInTrainMode(CheckpointedRegressor):
        def validation_step(self, batch, batch_idx):
            self.train()
            return super().validation_step(batch, batch_idx)

    reference = trained(None, CALLBACKS[setting])
    torch.manual_seed(0)
    model = ValidatesInTrainMode(None)
    trainer = make_trainer(max_steps=6, callbacks=[CALLBACKS[setting]()], val_check_interval=1,
                           limit_val_batches=2, num_sanity_val_steps=0, inference_mode=False)
    trainer.fit(model, tiny_loader(batches=8), tiny_loader(batches=2, seed=1, scale=10.0))
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    if setting == "static observer":
        observer, expected = input_quantizer_of(model.fc1), input_quantizer_of(reference.fc1)
        assert (observer.low, observer.high) == (expected.low, expected.high)
        model.train()
        with torch.no_grad():
            model(tiny_loader(batches=1, seed=2, scale=10.0).dataset.tensors[0])
        assert (observer.low, observer.high) == (expected.low, expected.high)


def test_the_export_checks_inside_the_calibration_window_are_not_recorded(tmp_path):
    """The dry export before the first step (parity check and ONNX trace, no_grad, the
    model's hooks on its copies) runs inside the first training batch: with a GPTQ start
    recording from step 0, the run ends where the run without the export ends."""
    from lightning_compress import CompressedExport

    def gptq():
        return QuantizationAwareTraining("int4", group_size=16, init="gptq", calibration_batches=2,
                                         targets=["fc1", "fc2"])

    reference = trained(None, gptq)
    torch.manual_seed(0)
    model = CheckpointedRegressor(None)
    export = CompressedExport(tmp_path / "out", formats=["safetensors", "onnx"], dry_export=True)
    make_trainer(max_steps=6, callbacks=[gptq(), export]).fit(model, tiny_loader(batches=8))
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert export.dry_report is not None and (tmp_path / "out" / "model.onnx").is_file()


@pytest.mark.parametrize("export_first", [False, True])
def test_a_run_resumed_at_the_start_step_applies_the_start_after_the_dry_export(tmp_path, export_first):
    """A checkpoint saved at the end of the calibration window (the next step is the start
    step): the resumed run's dry export runs inside its first training batch, after QAT
    armed the start (QAT listed first) or before (listed second). Either way the dry export
    checks the model as it is, and the start applies at the training forward: the run ends
    where the uninterrupted run ends."""
    from lightning_compress import CompressedExport
    from tests.conftest import StopAfterEpoch

    def run(extra, ckpt_path=None):
        torch.manual_seed(0)
        model = CheckpointedRegressor(None)
        qat = QuantizationAwareTraining("int4", group_size=16, init="gptq", calibration_batches=2, start_step=4,
                                        targets=["fc1", "fc2"])
        export = CompressedExport(tmp_path / "out", overwrite=True)
        callbacks = [export, qat] if export_first else [qat, export]
        make_trainer(max_epochs=3, callbacks=[*callbacks, *extra]).fit(model, tiny_loader(batches=4),
                                                                       ckpt_path=ckpt_path)
        return model, export, qat

    reference, _, _ = run([])
    checkpoint = tmp_path / "at_start.ckpt"
    run([StopAfterEpoch(0, checkpoint)])  # epoch 0 is steps 0-3: the window records steps 2 and 3
    resumed, export, qat = run([], checkpoint)
    assert export.dry_report is not None and export.dry_report.parity.relative_error == 0.0
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert qat._calibration.applied  # by the resumed run, from the two batches the checkpoint holds


class FailsAtStep2(CheckpointedRegressor):
    def training_step(self, batch, batch_idx):
        if self.global_step == 2:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("setting", ["gptq start", "wanda"])
def test_a_fit_that_raises_leaves_no_statistics_hook_behind(setting):
    """No teardown follows an exception: a calibrated start's recording hooks or wanda's
    input-norm hooks (and its step hook zeroing pruned weights) would count every later
    forward of the user's model. Step 2 is inside both windows."""
    torch.manual_seed(0)
    model = FailsAtStep2(None)
    callback = CALLBACKS[setting]()
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer(max_steps=6, callbacks=[callback]).fit(model, tiny_loader(batches=8))
    for layer in (model.fc1, model.fc2):
        assert not layer._forward_pre_hooks and not layer._forward_hooks
    if setting == "wanda":
        assert not callback._hook_handles and not callback._norms.collecting
    else:
        assert not callback._calibration.calibration._handles
