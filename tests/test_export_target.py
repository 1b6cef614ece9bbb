"""An export path that cannot be written (issue 16, found by a new-user trial).

- Before training: ``CompressedExport`` refuses a ``dirpath`` that is a file (whatever
  ``overwrite`` says), under a file, in a folder this process cannot create files in, or
  (with ``overwrite``) the current working directory, with an ``ArgumentError`` naming
  ``dirpath`` and the fix; no step is run and nothing is created.
- At the end: when writing ``dirpath`` fails (a full disk, injected through the atomic
  writer's stage seam), the trained model is not lost: the export is written and checked
  in a new folder of the system's temporary directory, which the ``ExportError`` names;
  loaded from there it computes what the trained model computes. Only when nothing can
  be written anywhere does the error say the model is only in memory.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
import sys
import tempfile

import lightning.pytorch as pl
import pytest
import torch

from lightning_compress import ArgumentError, CompressedExport, ExportError, QuantizationAwareTraining, load_packed
from lightning_compress.core import atomic
from lightning_compress.formats.packed import WEIGHTS_FILE
from tests.conftest import TinyRegressor, make_trainer, tiny_loader


class Steps(pl.Callback):
    def __init__(self):
        self.count = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.count += 1


def fit(dirpath, **options):
    """Two steps of int8 QAT and the export; returns (model, export callback, step counter)."""
    model, steps = TinyRegressor(), Steps()
    export_cb = CompressedExport(dirpath, **options)
    trainer = make_trainer(max_steps=2, callbacks=[QuantizationAwareTraining("int8"), export_cb, steps])
    try:
        trainer.fit(model, tiny_loader(batches=2), tiny_loader(batches=1, seed=1))
    finally:
        fit.steps = steps.count
    return model, export_cb


@pytest.fixture
def system_temp(tmp_path, monkeypatch):
    """The system's temporary directory, moved into ``tmp_path`` (``tempfile.tempdir``)."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


# ====================================================================== before training
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_file_at_dirpath_is_refused_before_training_whatever_overwrite_says(tmp_path, overwrite):
    (tmp_path / "out").write_text("not a directory")
    with pytest.raises(ArgumentError, match=r"`dirpath` .*out is a file, not a directory.*overwrite=True replaces only"
                                            r" a directory.*choose another `dirpath` \(in a recipe: export.dirpath\)"
                                            r".*move the file away") as caught:
        fit(tmp_path / "out", overwrite=overwrite)
    assert caught.value.argument == "dirpath" and fit.steps == 0
    assert (tmp_path / "out").read_text() == "not a directory"


def test_overwrite_replaces_an_earlier_export_or_an_empty_folder_never_other_files(tmp_path):
    """overwrite=True on a folder of the user's files (a home directory, say) would have
    deleted them at the end of fit: refused before training, naming what it holds; an
    empty folder and an earlier export are replaced."""
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "thesis.txt").write_text("keep me")
    with pytest.raises(ArgumentError, match=r"`dirpath` .*photos cannot be replaced: it holds thesis.txt but no"
                                            r" compression.json, so it is not an earlier export.*empty that folder")\
            as caught:
        fit(tmp_path / "photos", overwrite=True)
    assert caught.value.argument == "dirpath" and fit.steps == 0
    assert (tmp_path / "photos" / "thesis.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    fit(tmp_path / "empty", overwrite=True)
    first = (tmp_path / "empty" / WEIGHTS_FILE).read_bytes()
    fit(tmp_path / "empty", overwrite=True)  # now an earlier export
    assert (tmp_path / "empty" / WEIGHTS_FILE).is_file() and fit.steps > 0 and first
    # An earlier export with a file of the user's added: it would have been deleted with it.
    (tmp_path / "empty" / "my_eval_results.txt").write_text("keep me")
    with pytest.raises(ArgumentError, match=r"cannot be replaced: it holds an earlier export and my_eval_results.txt,"
                                            r" which no export writes and overwrite=True would delete with it"):
        fit(tmp_path / "empty", overwrite=True)
    assert (tmp_path / "empty" / "my_eval_results.txt").read_text() == "keep me"


def test_export_with_overwrite_refuses_a_folder_of_other_files(tmp_path):
    from lightning_compress import export
    from lightning_compress.quant.spec import QuantSpec
    from lightning_compress.quant.weights import round_to_nearest

    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    round_to_nearest(model, QuantSpec(8))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".bashrc").write_text("keep me")
    with pytest.raises(ExportError, match=r"home cannot be replaced: it holds .bashrc but no compression.json"):
        export(model, tmp_path / "home", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == [".bashrc"]


def test_a_dirpath_under_a_file_is_refused_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArgumentError, match=r"`dirpath` .*file/sub/out cannot be created: .*file is a file, not a"
                                            r" folder: choose another `dirpath`") as caught:
        fit(tmp_path / "file" / "sub" / "out")
    assert caught.value.argument == "dirpath" and fit.steps == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_a_folder_that_cannot_be_created_is_refused_before_training():
    """The trial's case: ``/proc`` refuses new entries even to root, for whom ``os.access``
    says yes; the nearest existing folder is named."""
    with pytest.raises(ArgumentError, match=r"`dirpath` /proc/lightning-compress-test/x cannot be written: this process"
                                            r" cannot create files in /proc, its nearest existing folder \(.*\);"
                                            r" choose another `dirpath` .* in a folder you can write to") as caught:
        fit("/proc/lightning-compress-test/x")
    assert caught.value.argument == "dirpath" and fit.steps == 0


def test_a_read_only_folder_is_refused_before_training(tmp_path, monkeypatch):
    """A folder without write permission (``os.access`` says no: faked here, since root,
    which the tests may run as, writes to read-only folders anyway)."""
    from lightning_compress.formats import target as target_module

    folder = tmp_path / "read-only"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(target_module.os, "access",
                        lambda path, mode, **kw: False if Path(path) == folder else real_access(path, mode, **kw))
    with pytest.raises(ArgumentError, match=r"cannot create files in .*read-only, its folder \(no write permission\)"):
        fit(folder / "out")
    assert fit.steps == 0 and list(folder.iterdir()) == []


def test_overwriting_the_working_directory_is_refused_before_training(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    with pytest.raises(ArgumentError, match=r"`dirpath` \. is \(or holds\) the current working directory"):
        fit(".", overwrite=True)
    assert fit.steps == 0


def test_a_writable_dirpath_with_missing_parents_passes_and_leaves_no_probe(tmp_path):
    _, export_cb = fit(tmp_path / "a" / "b" / "out", parity=False, dry_export=False)
    assert fit.steps == 2 and (tmp_path / "a" / "b" / "out" / WEIGHTS_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # the probe folder is gone


def test_a_dirpath_starting_with_a_tilde_is_in_the_home_directory(tmp_path, monkeypatch):
    """As ModelCheckpoint's: ``~/packed`` made a folder named ``~`` in the working directory."""
    from lightning_compress import export
    from lightning_compress.quant import QuantSpec, round_to_nearest

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    _, export_cb = fit("~/packed", parity=False, dry_export=False)
    assert export_cb.dirpath == tmp_path / "home" / "packed" and (tmp_path / "home" / "packed" / WEIGHTS_FILE).is_file()
    model = TinyRegressor()
    round_to_nearest(model, QuantSpec(8, "channel"))
    export(model, "~/by_hand")
    assert (tmp_path / "home" / "by_hand" / WEIGHTS_FILE).is_file() and not (tmp_path / "~").exists()
    x = tiny_loader(batches=1).dataset.tensors[0]
    with torch.no_grad():  # and the loaders read it back from there
        assert torch.equal(load_packed("~/by_hand", TinyRegressor())(x), model(x))
    from lightning_compress.formats.inspection import inspect_path

    assert "by_hand" in inspect_path("~/by_hand")
    with pytest.raises(ArgumentError, match=r"`dirpath`='~no_such_user_here/packed': its leading ~ names no home"):
        CompressedExport("~no_such_user_here/packed")


# ====================================================================== at the end
def full_disk_once(monkeypatch, times=1):
    """The next ``times`` directory writes fail with ENOSPC while their files are written."""
    left = [times]

    def stage(reached):
        if reached == "building" and left[0] > 0:
            left[0] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "on_stage", stage)


def test_a_full_disk_at_the_end_keeps_the_trained_model_in_the_temporary_directory(tmp_path, system_temp,
                                                                                    monkeypatch, seeded):
    full_disk_once(monkeypatch)
    with pytest.raises(ExportError) as caught:
        fit(tmp_path / "out")
    error, kept = caught.value, caught.value.directory
    assert fit.steps == 2 and not (tmp_path / "out").exists()
    assert kept is not None and kept.parent.parent == system_temp and kept.name == "out"
    assert f"{tmp_path / 'out'} could not be written (OSError: [Errno {errno.ENOSPC}] No space left on device)" in str(error)
    assert f"the export is complete and checked in {kept} instead" in str(error) and "move the folder" in str(error)
    model = fit_model_again(tmp_path)
    x, _ = next(iter(tiny_loader(batches=1, seed=2)))
    model.eval()
    with torch.no_grad():
        assert torch.equal(load_packed(kept, TinyRegressor(), backend="dequantize")(x), model(x))


def fit_model_again(tmp_path):
    """The same run (seeded the same, no disk fault): the model the kept export must equal."""
    pl.seed_everything(0, verbose=False)
    model, _ = fit(tmp_path / "again")
    return model


def test_when_nothing_can_be_written_the_error_says_the_model_is_in_memory(tmp_path, system_temp, monkeypatch):
    full_disk_once(monkeypatch, times=2)  # dirpath, then the folder in the temporary directory
    with pytest.raises(ExportError, match=r"could not be written .*No space left on device.*nor could a folder in the"
                                          r" system's temporary directory .*nothing was written\. The trained model is"
                                          r" still in memory") as caught:
        fit(tmp_path / "out")
    assert caught.value.directory is None and fit.steps == 2
    assert list(system_temp.iterdir()) == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_made_at_dirpath_during_training_does_not_lose_the_trained_model(tmp_path, system_temp, seeded,
                                                                                   overwrite):
    """Another process (or a ModelCheckpoint saving there) makes `dirpath` after the setup
    check: the export goes to the temporary directory, not nowhere. With overwrite=True
    too, which replaces only an export's folder: another's files are kept, and so is the
    trained model (it raised before packing, and nothing was written anywhere)."""
    out = tmp_path / "out"
    if overwrite:
        out.mkdir()  # empty at setup: replaceable then

    class MakesTheFolder(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            out.mkdir(exist_ok=True)
            (out / "theirs.txt").write_text("kept")

    model, steps = TinyRegressor(), Steps()
    trainer = make_trainer(max_steps=2, callbacks=[QuantizationAwareTraining("int8"),
                                                   CompressedExport(out, overwrite=overwrite), MakesTheFolder(), steps])
    with pytest.raises(ExportError) as caught:
        trainer.fit(model, tiny_loader(batches=2), tiny_loader(batches=1, seed=1))
    kept = caught.value.directory
    assert steps.count == 2 and sorted(p.name for p in out.iterdir()) == ["theirs.txt"]  # theirs untouched
    assert kept is not None and kept.parent.parent == system_temp and kept.name == "out"
    why = (f"{out} cannot be replaced: it holds theirs.txt but no compression.json" if overwrite else
           f"{out} was made during training")
    assert f"{out} could not be written (FileExistsError: {why}" in str(caught.value)
    x, _ = next(iter(tiny_loader(batches=1, seed=2)))
    model.eval()
    with torch.no_grad():
        assert torch.equal(load_packed(kept, TinyRegressor(), backend="dequantize")(x), model(x))


@pytest.mark.parametrize("overwrite", [True, False])
@pytest.mark.parametrize("inside", [".", "ckpt", "ckpt/deeper"])
def test_a_dirpath_holding_the_runs_checkpoints_is_refused_before_training(tmp_path, inside, overwrite):
    """overwrite=True replaces `dirpath` whole at the end: the checkpoints saved in it
    during the run would go with it; without it, the checkpoints make `dirpath` exist and
    the export cannot write there."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    out, steps = tmp_path / "out", Steps()
    trainer = make_trainer(max_steps=2, enable_checkpointing=True, callbacks=[
        QuantizationAwareTraining("int8"), CompressedExport(out, overwrite=overwrite),
        ModelCheckpoint(dirpath=out / inside), steps])
    fate = "which overwrite=True would delete" if overwrite else "which the run creates, so the export at the end"
    with pytest.raises(ArgumentError, match=rf"`dirpath` {out} holds ModelCheckpoint's dirpath \({out / inside}\),"
                                            rf" {fate}"):
        trainer.fit(TinyRegressor(), tiny_loader(batches=2))
    assert steps.count == 0
    make_trainer(max_steps=2, enable_checkpointing=True, callbacks=[  # beside it: fine
        QuantizationAwareTraining("int8"), CompressedExport(out, overwrite=True, parity=False, dry_export=False),
        ModelCheckpoint(dirpath=tmp_path / "ckpt")]).fit(TinyRegressor(), tiny_loader(batches=2))
    assert (out / WEIGHTS_FILE).is_file() and any((tmp_path / "ckpt").iterdir())


@pytest.mark.parametrize("overwrite", [True, False])
def test_a_dirpath_holding_the_loggers_folder_is_refused_before_training(tmp_path, overwrite):
    """A CSVLogger writing inside the export folder: overwrite=True deleted its logs at
    the end, and without it the export found the folder the logger made."""
    from lightning.pytorch.loggers import CSVLogger

    out, steps = tmp_path / "out", Steps()
    trainer = make_trainer(max_steps=2, logger=CSVLogger(out, name="logs"), callbacks=[
        QuantizationAwareTraining("int8"), CompressedExport(out, overwrite=overwrite), steps])
    with pytest.raises(ArgumentError, match=rf"`dirpath` {out} holds CSVLogger's folder \({out}/logs/version_0\)"):
        trainer.fit(TinyRegressor(), tiny_loader(batches=2))
    assert steps.count == 0


@pytest.mark.parametrize("overwrite", [True, False])
def test_a_dirpath_holding_the_teacher_cache_is_refused_before_training(tmp_path, overwrite):
    """A distillation cache on disk inside the export folder: overwrite=True deleted it at the
    end, and without it the export found the folder the cache made (after the whole run)."""
    from lightning_compress import KnowledgeDistillation

    out, steps = tmp_path / "out", Steps()
    kd = KnowledgeDistillation(teacher=TinyRegressor(), cache="disk", cache_dir=out / "teacher_cache",
                               index_fn=lambda batch: batch[0])
    trainer = make_trainer(max_steps=2, callbacks=[kd, CompressedExport(out, overwrite=overwrite), steps])
    with pytest.raises(ArgumentError, match=rf"`dirpath` {out} holds KnowledgeDistillation's cache_dir"
                                            rf" \({out / 'teacher_cache'}\)"):
        trainer.fit(TinyRegressor(), tiny_loader(batches=2))
    assert steps.count == 0 and not out.exists()



@pytest.mark.parametrize("call, message", [
    (lambda export, model: export(model, 5), r"`out_dir` must be a path \(a str or os.PathLike\), got int 5"),
    (lambda export, model: export(None, "d"), r"`model` must be an nn.Module .*got NoneType None"),
    (lambda export, model: export(torch.nn.Linear, "d"), r"got type .*Linear.*; pass an instance, not the class"),
], ids=["path", "none", "class"])
def test_export_names_a_wrong_model_or_path(tmp_path, monkeypatch, call, message):
    """They were a TypeError/AttributeError from inside the package (a new user's trial)."""
    from lightning_compress import export
    from lightning_compress.quant import quantized_weights

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArgumentError, match=message):
        call(export, torch.nn.Linear(4, 4))
    with pytest.raises(ArgumentError, match=r"`model` must be an nn.Module .*got NoneType None"):
        quantized_weights(None)
    assert list(tmp_path.iterdir()) == []
