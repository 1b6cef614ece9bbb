"""Nothing lost at the end, problems before training (issue 16).

- A final export whose check fails keeps the trained model's packed files in
  ``<dir>.failed-parity/`` (with its report), names it in the error, and loaders treat
  that directory as failed.
- ``CompressedExport`` runs a dry export before the first training step: a model the
  export cannot take stops there, with the error the end of the run would give; a run
  with the dry export trains to the same bits as one without it.

The expected numbers come from outside the code under test: the trained model's own
forward and effective weights, SQNR computed here from outputs, onnxruntime run here.
"""

from __future__ import annotations

import json
import random
import tempfile

import lightning.pytorch as pl
import numpy
import pytest
import torch
from torch import nn

from lightning_compress import (
    ArgumentError,
    CompressedExport,
    ExportError,
    MagnitudePruning,
    ParityError,
    QuantizationAwareTraining,
    export,
    from_recipe,
    load_packed,
)
from lightning_compress.core.atomic import remove_directory, write_lock
from lightning_compress.core.filesystem import DirectoryLockedError
from lightning_compress.formats import dry_export as dry_module
from lightning_compress.formats import export as export_module
from lightning_compress.formats.dry_export import dry_export
from lightning_compress.formats.errors import FailedExportError
from lightning_compress.formats.inspection import inspect_path, verify_path
from lightning_compress.formats.packed import METADATA_FILE, WEIGHTS_FILE
from lightning_compress.quant.spec import QuantSpec
from lightning_compress.quant.weights import round_to_nearest
from lightning_compress.recipes import RecipeError
from tests.conftest import TinyRegressor, make_trainer, tiny_loader


class Probe(pl.Callback):
    """Counts optimizer steps; lists the export's folder after the first training batch."""

    def __init__(self, folder):
        self.folder, self.steps, self.after_first_batch = folder, 0, None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.after_first_batch is None:
            self.after_first_batch = sorted(p.name for p in self.folder.iterdir())


def _sqnr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    reference, other = reference.double(), other.double()
    return float(20 * torch.log10(reference.norm() / (reference - other).norm()))


# ====================================================================== nothing lost at the end
def test_failed_final_parity_keeps_the_trained_model_in_a_failed_parity_directory(tmp_path, seeded, recwarn,
                                                                                   int8_gemm_runs):
    """min_sqnr_db=200: the int8 GEMM rounds activations, so no trained model meets it. The
    dry export only warns about that figure (it depends on the trained weights), so the
    run trains, fails at the end, and its packed files land beside the export directory."""
    model = TinyRegressor()
    export_cb = CompressedExport(tmp_path / "packed", backend="fbgemm", min_sqnr_db=200)
    probe = Probe(tmp_path)
    trainer = make_trainer(callbacks=[QuantizationAwareTraining("int8", activations="int8_dynamic"), export_cb, probe],
                           max_steps=4)
    validation = [x for x, _ in tiny_loader(batches=2, seed=1)]
    with pytest.raises(ParityError) as caught:
        trainer.fit(model, tiny_loader(), tiny_loader(batches=2, seed=1))
    failed = tmp_path / "packed.failed-parity"
    assert probe.steps == 4  # trained to the end: the failure is the final check's
    assert caught.value.directory == failed and str(failed) in str(caught.value)
    assert "int8-GEMM SQNR" in str(caught.value) and "nothing was written to" in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed.failed-parity"]  # no debris, no lock
    assert any("dry export before training" in str(w.message) for w in recwarn)

    with pytest.raises(FailedExportError, match="allow_failed_parity=True"):
        load_packed(failed, TinyRegressor())
    with pytest.warns(UserWarning, match="failed its check"):
        exact = load_packed(failed, TinyRegressor(), backend="dequantize", allow_failed_parity=True)
    with pytest.warns(UserWarning, match="failed its check"):
        fast = load_packed(failed, TinyRegressor(), backend="fbgemm", allow_failed_parity=True)
    model.eval()
    with torch.no_grad():
        for name in ("conv", "fc1", "fc2"):  # the effective weights training computed with
            assert torch.equal(exact.get_submodule(name).weight, model.get_submodule(name).weight), name
            assert torch.equal(exact.get_submodule(name).bias, model.get_submodule(name).bias), name
        reference = torch.cat([model(x).reshape(-1) for x in validation])
        assert torch.equal(torch.cat([exact(x).reshape(-1) for x in validation]), reference)
        fast_out = torch.cat([fast(x).reshape(-1) for x in validation])
    report = json.loads((failed / "parity.json").read_text())
    assert report["parity"]["passed"] is False and report["parity"]["relative_error"] == 0.0
    assert report["parity"]["sqnr_db"] == pytest.approx(_sqnr_db(reference, fast_out), rel=1e-9)
    assert report["parity"]["sqnr_db"] < 200 and report["failed"].startswith("ParityError: parity check failed")
    assert "min_sqnr_db" not in report["failed"] and report["parity"]["min_sqnr_db"] == 200
    metadata = json.loads((failed / METADATA_FILE).read_text())
    assert metadata["failed_check"] == report["failed"]
    assert inspect_path(failed).startswith("WARNING: ") and "failed its check" in inspect_path(failed)
    assert verify_path(failed).startswith("WARNING: ") and "verified:" in verify_path(failed)
    assert (failed / "report.txt").read_text().startswith("EXPORT FAILED ITS CHECK")


def _mlp(seed=0, inputs=32):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(inputs, 64), nn.ReLU(), nn.Linear(64, 8))
    round_to_nearest(model, QuantSpec(4, "group", 16))
    return model


def test_a_failed_onnx_check_keeps_the_onnx_file_too(tmp_path):
    """max_relative_error=0: the packed model is exact (0.0), onnxruntime's float GEMM is not.
    256 inputs: onnxruntime 1.32 sums 32 the way PyTorch does (relative error 0.0), 96 or
    more in another order (measured 2e-7 to 5e-7)."""
    import onnxruntime

    model, x = _mlp(inputs=256), torch.randn(4, 256)
    with pytest.raises(ParityError, match=r"model.onnx in onnxruntime differs from the fake-quant model: relative error"
                                          r" \S+ \(> max_relative_error=0; raise it to accept the file\)") as caught:
        export(model, tmp_path / "out", inputs=[x], formats=["safetensors", "onnx"], max_relative_error=0.0)
    failed = tmp_path / "out.failed-parity"
    assert caught.value.directory == failed and not (tmp_path / "out").exists()
    assert sorted(p.name for p in failed.iterdir()) == [METADATA_FILE, "model.onnx", WEIGHTS_FILE, "parity.json",
                                                       "report.txt"]
    report = json.loads((failed / "parity.json").read_text())
    assert report["parity"]["passed"] is True and report["failed"].startswith("ParityError: model.onnx")
    session = onnxruntime.InferenceSession(str(failed / "model.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        expected = model(x)
    assert 0 < (got - expected).norm() / expected.norm() < 1e-5  # close, not exact: why the check failed


def test_a_crashed_check_keeps_the_files_and_names_them(tmp_path, monkeypatch):
    def broken_kernel(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(export_module, "check_parity", broken_kernel)
    with pytest.raises(ExportError, match="the check of the packed files failed \\(RuntimeError: kernel exploded\\)") \
            as caught:
        export(_mlp(), tmp_path / "out", inputs=[torch.randn(2, 32)])
    assert caught.value.directory == tmp_path / "out.failed-parity" and "out.failed-parity" in str(caught.value)
    assert json.loads((tmp_path / "out.failed-parity" / "parity.json").read_text()) == {
        "failed": "RuntimeError: kernel exploded"}
    fresh = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    with pytest.warns(UserWarning):
        loaded = load_packed(tmp_path / "out.failed-parity", fresh, allow_failed_parity=True)
    assert torch.equal(loaded[0].weight, _mlp()[0].weight)


def test_files_that_cannot_be_kept_beside_the_export_go_to_the_temporary_directory(tmp_path, monkeypatch,
                                                                                  int8_gemm_runs):
    """A directory of that name appears while the export checks: it is not replaced
    (no overwrite); the packed files go to a new folder of the system's temporary
    directory, marked failed like the sibling, and the error says so. If that fails too,
    it says nothing was written."""
    real = export_module.check_parity
    system_temp = tmp_path / "system-tmp"
    system_temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_temp))

    def check_while_someone_writes(*args, **kwargs):
        (tmp_path / "out.failed-parity").mkdir()
        (tmp_path / "out.failed-parity" / "theirs.txt").write_text("keep me")
        return real(*args, **kwargs)

    monkeypatch.setattr(export_module, "check_parity", check_while_someone_writes)
    model = _int8_mlp(0)
    error = _failing_export(tmp_path, model)
    assert "could not be kept in" in str(error) and "out.failed-parity either (FileExistsError" in str(error)
    kept = error.directory
    assert kept.parent.parent == system_temp and kept.name == "out.failed-parity" and f"kept in {kept} instead" in str(error)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in (tmp_path / "out.failed-parity").iterdir()) == ["theirs.txt"]
    with pytest.raises(FailedExportError):
        load_packed(kept, nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)))
    with pytest.warns(UserWarning):
        loaded = load_packed(kept, nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)),
                             backend="dequantize", allow_failed_parity=True)
    assert torch.equal(loaded[0].weight, model[0].weight)

    # Nowhere to write: the error says so and where the model still is.
    (tmp_path / "out.failed-parity" / "theirs.txt").unlink()
    (tmp_path / "out.failed-parity").rmdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    error = _failing_export(tmp_path, model)
    assert error.directory is None and "nor in the system's temporary directory" in str(error)
    assert "The trained model is still in memory" in str(error)


def _int8_mlp(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    round_to_nearest(model, QuantSpec(8))
    return model


def _failing_export(tmp_path, model, **options) -> ParityError:
    """Export ``model`` with a threshold the int8 GEMM cannot meet (200 dB); returns the error."""
    with pytest.raises(ParityError, match="int8-GEMM SQNR") as caught:
        export(model, tmp_path / "out", inputs=[torch.randn(4, 32)], backend="fbgemm", min_sqnr_db=200, **options)
    return caught.value


def test_a_stale_failed_parity_directory_is_refused_replaced_or_removed(tmp_path, int8_gemm_runs):
    first = _int8_mlp(0)
    _failing_export(tmp_path, first)
    failed = tmp_path / "out.failed-parity"
    stale = (failed / WEIGHTS_FILE).read_bytes()
    # Without overwrite: refused before packing, so an old failure is never taken for this run's.
    with pytest.raises(ExportError, match="out.failed-parity exists.*overwrite=True"):
        export(first, tmp_path / "out")
    assert (failed / WEIGHTS_FILE).read_bytes() == stale and not (tmp_path / "out").exists()
    # overwrite=True and a failing export: the sibling now holds this export's files.
    second = _int8_mlp(1)
    assert _failing_export(tmp_path, second, overwrite=True).directory == failed
    with pytest.warns(UserWarning):
        loaded = load_packed(failed, nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)),
                             backend="dequantize", allow_failed_parity=True)
    assert torch.equal(loaded[0].weight, second[0].weight) and not torch.equal(loaded[0].weight, first[0].weight)
    # overwrite=True and a passing export: the out directory is written and the stale sibling removed.
    export(second, tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert torch.equal(load_packed(tmp_path / "out", nn.Sequential(nn.Linear(32, 64), nn.ReLU(),
                                                                   nn.Linear(64, 8)))[0].weight, second[0].weight)


def test_a_stale_failed_parity_directory_that_cannot_be_removed_is_a_warning(tmp_path, monkeypatch, int8_gemm_runs):
    _failing_export(tmp_path, _int8_mlp(0))

    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(export_module, "remove_directory", refuse)
    with pytest.warns(RuntimeWarning, match="out is written, but .*out.failed-parity could not be removed"):
        export(_mlp(), tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / WEIGHTS_FILE).is_file() and (tmp_path / "out.failed-parity").is_dir()


def test_remove_directory_takes_the_write_lock_and_leaves_nothing(tmp_path):
    target = tmp_path / "gone"
    (target / "sub").mkdir(parents=True)
    (target / "sub" / "file").write_bytes(b"x")
    with write_lock(target):
        with pytest.raises(DirectoryLockedError):
            remove_directory(target)
    assert remove_directory(target) is True and list(tmp_path.iterdir()) == []
    assert remove_directory(target) is False
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        remove_directory(tmp_path / "file")


def test_the_callback_refuses_a_stale_failed_parity_directory_before_training(tmp_path):
    (tmp_path / "packed.failed-parity").mkdir()
    probe = Probe(tmp_path)
    trainer = make_trainer(callbacks=[CompressedExport(tmp_path / "packed"), probe], max_steps=2)
    with pytest.raises(FileExistsError, match="packed.failed-parity exists.*overwrite=True"):
        trainer.fit(TinyRegressor(), tiny_loader())
    assert probe.steps == 0


# ====================================================================== problems before training
class RotaryRegressor(TinyRegressor):
    """TinyRegressor with a complex64 rotary table as a buffer, as LLaMA implementations
    keep ``freqs_cis`` (torchtitan registers it persistent): a dtype the packed format
    cannot store."""

    def __init__(self) -> None:
        super().__init__()
        angles = torch.outer(torch.arange(8.0), torch.tensor([1.0, 0.01]))
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles))

    def forward(self, x):
        return super().forward(x) * self.freqs_cis.abs().mean()  # |e^(i*theta)| = 1


def test_an_unexportable_model_fails_before_the_first_step_as_the_end_would(tmp_path):
    def run(dry: bool):
        torch.manual_seed(0)
        probe = Probe(tmp_path)
        trainer = make_trainer(callbacks=[CompressedExport(tmp_path / f"packed-{dry}", dry_export=dry), probe],
                               max_steps=3)
        with pytest.raises(ExportError, match="cannot store a tensor of dtype torch.complex64") as caught:
            trainer.fit(RotaryRegressor(), tiny_loader())
        return caught.value, probe, trainer

    early, probe, trainer = run(dry=True)
    assert probe.steps == 0 and trainer.global_step == 0
    assert any("dry export before the first training step" in note for note in early.__notes__)
    late, late_probe, _ = run(dry=False)
    assert late_probe.steps == 3  # without it, the same error comes after the whole run
    assert type(early) is type(late) and str(early) == str(late)
    assert list(tmp_path.iterdir()) == []  # neither run wrote anything


def test_a_dry_parity_failure_stops_the_run_and_keeps_nothing(tmp_path, monkeypatch):
    """Packed weights that do not read back as trained (a corrupted code, injected) are
    fatal before training: unlike the int8 GEMM's SQNR, they do not depend on training."""
    real = dry_module.decode_packed

    def corrupted(*args):
        packed = real(*args)
        codes = packed.layers["fc1"].weight.codes
        codes[0, 0] = 1 if codes[0, 0] != 1 else 2
        return packed

    monkeypatch.setattr(dry_module, "decode_packed", corrupted)
    probe = Probe(tmp_path)
    trainer = make_trainer(callbacks=[QuantizationAwareTraining("int8"), CompressedExport(tmp_path / "packed"), probe],
                           max_steps=2)
    with pytest.raises(ParityError, match=r"weights differ in \['fc1'\]") as caught:
        trainer.fit(TinyRegressor(), tiny_loader(), tiny_loader(batches=2, seed=1))
    assert probe.steps == 0 and caught.value.directory is None and list(tmp_path.iterdir()) == []


class DropoutRegressor(TinyRegressor):
    def __init__(self) -> None:
        super().__init__()
        self.dropout = nn.Dropout(0.3)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(self.dropout(torch.relu(self.fc1(h))))


def test_the_dry_export_changes_nothing_the_run_trains(tmp_path):
    """Same seed, same start, with and without the dry export: bit-identical weights, QAT
    and pruning state, export bytes and random generators. The stack is chosen to be
    fragile: dropout and a shuffled loader draw random numbers, and QAT (listed before the
    export) enables at step 0 with ranges chosen on the first forward, while pruning
    (listed after) updates its masks after the export's hook; choosing the ranges during
    the dry export would choose them from the unpruned weights."""
    torch.manual_seed(0)
    initial = DropoutRegressor().state_dict()

    def run(dry: bool):
        pl.seed_everything(1, verbose=False)
        model = DropoutRegressor()
        model.load_state_dict(initial)
        qat = QuantizationAwareTraining("int4", group_size=16, start_step=0, weight_range="mse", learn_ranges=True,
                                        activations="int8_static", calibration_steps=2,
                                        overrides={"conv": {"granularity": "channel"}})
        pruning = MagnitudePruning(0.5, schedule="one_shot", start_step=0)
        export_cb = CompressedExport(tmp_path / f"packed-{dry}", dry_export=dry, parity_batches=1,
                                     formats=["safetensors", "onnx"])
        probe = Probe(tmp_path)
        loader = torch.utils.data.DataLoader(tiny_loader().dataset, batch_size=16, shuffle=True)
        make_trainer(callbacks=[qat, export_cb, pruning, probe], max_steps=6).fit(model, loader)
        rng = (torch.get_rng_state(), random.getstate(), numpy.random.get_state()[1])
        return model, qat, pruning, export_cb, probe, rng

    plain, plain_qat, plain_pruning, plain_export, _, plain_rng = run(dry=False)
    checked, qat, pruning, export_cb, probe, rng = run(dry=True)
    assert plain_export.dry_report is None and export_cb.dry_report is not None  # it ran, once
    assert any("model.onnx" in note for note in export_cb.dry_report.notes)  # the ONNX path included
    assert probe.after_first_batch == ["packed-False"]  # nothing in the folder but the earlier run's export
    for key, value in plain.state_dict().items():
        assert torch.equal(value, checked.state_dict()[key]), key
    for mine, theirs in ((plain_qat, qat), (plain_pruning, pruning)):
        _assert_identical(mine.state_dict(), theirs.state_dict())
    assert torch.equal(plain_rng[0], rng[0]) and plain_rng[1] == rng[1] and (plain_rng[2] == rng[2]).all()
    written = [(tmp_path / f"packed-{dry}" / WEIGHTS_FILE).read_bytes() for dry in (False, True)]
    assert written[0] == written[1]


def _assert_identical(a, b, where="state"):
    """Same structure, tensors equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_dry_export_restores_random_generators_itself():
    model = _mlp()
    x = torch.randn(4, 32)
    before = (torch.get_rng_state(), random.getstate(), numpy.random.get_state()[1].copy())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    report = dry_export(model, [x], formats=["safetensors", "onnx"])
    assert report.parity.passed and report.parity.relative_error == 0.0
    after = (torch.get_rng_state(), random.getstate(), numpy.random.get_state()[1])
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and (before[2] == after[2]).all()
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key


def test_parity_off_still_traces_onnx_with_a_batch(tmp_path, seeded):
    """parity=False with ONNX: the export still needs one batch to trace (it used to get
    none and fail after training); the dry export checks that path before training."""
    import onnxruntime

    model = TinyRegressor()
    export_cb = CompressedExport(tmp_path / "packed", parity=False, formats=["safetensors", "onnx"])
    trainer = make_trainer(
        callbacks=[QuantizationAwareTraining("int4", group_size=16,
                                             overrides={"conv": {"bits": 8, "granularity": "channel"}}), export_cb],
        max_steps=2,
    )
    trainer.fit(model, tiny_loader(), tiny_loader(batches=2, seed=1))
    assert export_cb.dry_report.parity is None and export_cb.report.parity is None
    x = next(iter(tiny_loader(batches=1, seed=2)))[0]
    session = onnxruntime.InferenceSession(str(tmp_path / "packed" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        expected = model.eval()(x)
    assert (got - expected).norm() / expected.norm() < 1e-5


@pytest.mark.parametrize("value", ["no", 0, None])
def test_dry_export_must_be_a_bool_naming_the_argument_and_the_fix(tmp_path, value):
    with pytest.raises(ArgumentError, match="`dry_export` must be True .* or False .*dry_export=False") as caught:
        CompressedExport(tmp_path / "x", dry_export=value)
    assert caught.value.argument == "dry_export"


def test_a_recipe_names_the_dry_export_key(tmp_path):
    with pytest.raises(RecipeError, match="export.dry_export"):
        from_recipe({"export": {"dirpath": str(tmp_path / "x"), "dry_export": [1]}})
    export_cb = next(cb for cb in from_recipe({"export": {"dirpath": str(tmp_path / "x"), "dry_export": False}})
                     if isinstance(cb, CompressedExport))
    assert export_cb.dry_export is False
