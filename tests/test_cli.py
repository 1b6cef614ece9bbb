"""The ``lightning-compress`` command: fit / export / inspect / demo end to end, and its errors.

End-to-end runs use the installed entry point in a subprocess (exit codes and output as a
user sees them); the error table runs ``main()`` in process, which is the same code.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_compress import from_recipe
from lightning_compress.checkpoints import export_checkpoint
from lightning_compress.cli import main
from lightning_compress.formats.packed import read_metadata
from lightning_compress.recipes import BUILTIN_RECIPES_DIR, load_recipe
from tests.cli_models import HeadInConfigureModel, RecipeData, RecipeMLP, ShardsInConfigureModel
from tests.conftest import make_trainer
from tests.wandb_offline import read_offline_run

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINT = Path(sys.executable).parent / "lightning-compress"
MODEL = "tests.cli_models.RecipeMLP"
DATA = "tests.cli_models.RecipeData"
RECIPE = """
pruning:
  final_sparsity: 0.5
  end_step: 0.5
qat:
  weights: int4
  group_size: 32
  start_step: 0.5
export:
  dirpath: packed
"""


@pytest.fixture(autouse=True)
def wandb_files_in_tmp(tmp_path, monkeypatch):
    """In-process runs keep every W&B file (runs, cache, staged artifacts) under tmp_path."""
    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def run_cli(args, cwd, timeout=300):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PYTHONPATH=str(REPO), HOME=str(cwd), WANDB_SILENT="true")  # no API key, no netrc: offline
    return subprocess.run(
        [str(ENTRY_POINT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_one_paragraph_error(stderr: str, fragment: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr
    assert lines and lines[-1].startswith("lightning-compress") and ": error: " in lines[-1], stderr
    assert fragment.lower() in lines[-1].lower(), lines[-1]  # wording is ours; case is the parser version's


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One real ``lightning-compress fit`` run with a recipe, overrides and a checkpoint."""
    cwd = tmp_path_factory.mktemp("fit")
    (cwd / "r.yaml").write_text(RECIPE)
    result = run_cli(
        [
            "fit", "--recipe", "r.yaml", "--model", MODEL, "--data", DATA,
            "--override", "pruning.final_sparsity=0.6", "--override=qat.start_step=0.6",
            "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
            "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath=ckpt",
            "--trainer.callbacks.save_last=true", "--seed_everything", "0",
        ],
        cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, result


def test_fit_runs_ddp_on_two_processes(tmp_path):
    """Lightning starts the second rank with this process's sys.argv, which `fit` had cut
    to the program name: that rank printed the usage and exited 2, and rank 0 was killed."""
    (tmp_path / "r.yaml").write_text(RECIPE)
    result = run_cli(
        ["fit", "--recipe", "r.yaml", "--model", MODEL, "--data", DATA, "--trainer.max_epochs", "2",
         "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2",
         "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
         "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath=ckpt", "--trainer.callbacks.save_last=true"],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    # 192 training samples in batches of 32, split over 2 ranks: 3 steps an epoch (6 on one process)
    assert checkpoint["global_step"] == 2 * 3
    assert read_metadata(tmp_path / "packed")["recipe"]["qat"] == {"weights": "int4", "group_size": 32, "start_step": 0.5}


def test_fit_resumes_a_distributed_checkpoint_with_the_recipe_it_stores(tmp_path):
    """ModelParallelStrategy's checkpoint is a folder; its recipe is in meta.pt, which
    `fit --ckpt_path` without --recipe did not read ("is a distributed checkpoint ...")."""
    (tmp_path / "r.yaml").write_text("qat:\n  weights: int4\n  group_size: 4\n")
    common = ["--model", "tests.scripts.fsdp_run.Sharded", "--data", "tests.scripts.fsdp_run.Data",
              "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
              "--trainer.devices", "2", "--trainer.strategy", "ModelParallelStrategy",
              "--trainer.strategy.data_parallel_size", "2", "--trainer.strategy.tensor_parallel_size", "1",
              "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath=ckpt",
              "--trainer.callbacks.save_last=true"]
    first = run_cli(["fit", "--recipe", "r.yaml", "--trainer.max_epochs", "1", *common], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "ckpt" / "last.ckpt" / "meta.pt").is_file()  # a folder of shards
    steps = torch.load(tmp_path / "ckpt" / "last.ckpt" / "meta.pt", weights_only=True)["global_step"]
    resumed = run_cli(["fit", "--ckpt_path", "ckpt/last.ckpt", "--trainer.max_epochs", "2", *common], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming with the recipe stored in ckpt/last.ckpt" in resumed.stdout
    meta = torch.load(tmp_path / "ckpt" / "last.ckpt" / "meta.pt", weights_only=True)
    assert meta["global_step"] == 2 * steps
    assert meta["lightning_compress"]["recipe"] == {"qat": {"weights": "int4", "group_size": 4}}


def test_fit_trains_with_the_recipe_and_tracks_the_run_offline(fitted):
    cwd, result = fitted
    expected = {
        "pruning": {"final_sparsity": 0.6, "end_step": 0.5},
        "qat": {"weights": "int4", "group_size": 32, "start_step": 0.6},
        "export": {"dirpath": "packed"},
    }
    assert read_metadata(cwd / "packed")["recipe"] == expected
    checkpoint = torch.load(cwd / "ckpt" / "last.ckpt", weights_only=True)
    assert checkpoint["lightning_compress"]["recipe"] == expected
    weight = checkpoint["state_dict"]["net.0.weight"]
    assert float((weight == 0).float().mean()) == pytest.approx(0.6, abs=1 / weight.numel())

    run_dir = Path(re.search(r"W&B run written to (\S+)", result.stdout).group(1))
    run_dir = run_dir if run_dir.is_absolute() else cwd / run_dir
    assert run_dir.name.startswith("offline-run-")
    run = read_offline_run(run_dir)
    assert run["config"]["compression_recipe"] == expected
    actual = [row["pruning/sparsity_actual"] for row in run["history"] if "pruning/sparsity_actual" in row]
    assert actual and actual[-1] == pytest.approx(0.6, abs=1e-3)


def test_export_from_the_checkpoint_reproduces_the_fit_export(fitted):
    cwd, _ = fitted
    result = run_cli(["export", "--checkpoint", "ckpt/last.ckpt", "--model", MODEL, "--data", DATA, "-o", "again"], cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parity: weights exact" in result.stdout
    first, again = read_metadata(cwd / "packed"), read_metadata(cwd / "again")
    assert again["weights_sha256"] == first["weights_sha256"]
    # The recipe comes from the checkpoint (no --recipe given), with -o as its export.dirpath.
    assert again["recipe"] == {**first["recipe"], "export": {"dirpath": "again"}}
    # An existing directory is kept unless --overwrite.
    refused = run_cli(["export", "--checkpoint", "ckpt/last.ckpt", "--model", MODEL, "-o", "again"], cwd)
    assert refused.returncode == 2
    assert_one_paragraph_error(refused.stderr, "again already exists; choose another output directory or pass"
                                               " overwrite=True (on the command line: --overwrite)")
    # A file is never replaced: said at once, not after --overwrite was tried as the first message suggested.
    (cwd / "afile.bin").write_bytes(b"keep me")
    for extra in ([], ["--overwrite"]):
        refused = run_cli(["export", "--checkpoint", "ckpt/last.ckpt", "--model", MODEL, "-o", "afile.bin", *extra], cwd)
        assert refused.returncode == 2
        assert_one_paragraph_error(refused.stderr, "afile.bin is a file, not a directory; the export writes a directory"
                                                   " and never replaces a file")
    assert (cwd / "afile.bin").read_bytes() == b"keep me"
    # Without -o the stored recipe's export.dirpath is not used: a checkpoint does not choose where to write.
    default = run_cli(["export", "--checkpoint", "ckpt/last.ckpt", "--model", MODEL], cwd)
    assert default.returncode == 2
    assert_one_paragraph_error(default.stderr, "no output directory: pass -o/--output")


@pytest.mark.parametrize("command", [["export", "--model", MODEL, "--checkpoint", "last.ckpt"], ["inspect", "last.ckpt"]])
def test_a_distributed_checkpoint_folder_is_named_with_the_fix(tmp_path, command):
    """ModelParallelStrategy's default checkpoint is a folder of .distcp files: export said
    "pass the checkpoint file (a .ckpt) in it", which it does not hold, and inspect that it
    was not a lightning-compress export."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"state_dict": {"net.0.weight": torch.randn(4, 4)}}, checkpoint_id=tmp_path / "last.ckpt")
    result = run_cli(command, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert_one_paragraph_error(result.stderr, "'last.ckpt' is a distributed checkpoint (a folder of .distcp files, one"
                               " per rank, as ModelParallelStrategy saves by default), which is read only by a run"
                               " with as many processes; save a single-file checkpoint with"
                               " ModelParallelStrategy(save_distributed_checkpoint=False) to export or inspect it")


def test_fit_imports_the_model_from_a_file_in_the_working_directory(tmp_path):
    """The console script put its own folder on the path, not the working directory:
    `--model my_model.Net` for ./my_model.py was "No module named 'my_model'"."""
    (tmp_path / "my_model.py").write_text("from tests.cli_models import RecipeMLP\n\n\nclass Net(RecipeMLP):\n    pass\n")
    result = run_cli(["fit", "--recipe", "int8_qat", "--model", "my_model.Net", "--data", DATA,
                      "--override", "export.dirpath=packed", "--trainer.max_steps", "2", "--trainer.logger", "false",
                      "--trainer.enable_progress_bar", "false"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_metadata(tmp_path / "packed")["layers"]


def test_inspect_tables_of_the_packed_directory_and_the_checkpoint(fitted):
    cwd, _ = fitted
    params = 128 * 128 + 128 + 128 * 128 + 128 + 128 * 8 + 8
    packed = run_cli(["inspect", "packed"], cwd)
    assert packed.returncode == 0, packed.stderr
    rows = {line.split()[0]: line.split() for line in packed.stdout.splitlines() if line.startswith(("net.", "total"))}
    assert rows["total"][1] == str(params)
    assert rows["net.0"][1:3] == ["16384", "4"]
    assert 0.6 <= float(rows["net.0"][3]) < 0.62  # pruned 60%, plus weights int4 rounds to zero
    size = (cwd / "packed" / "model.safetensors").stat().st_size
    assert f"model.safetensors: {size:,} bytes for {params:,} parameters" in packed.stdout

    checkpoint = run_cli(["inspect", "ckpt/last.ckpt"], cwd)
    assert checkpoint.returncode == 0, checkpoint.stderr
    rows = {line.split()[0]: line.split() for line in checkpoint.stdout.splitlines() if line.startswith(("net.", "total"))}
    assert rows["net.0.weight"][1:5] == ["16384", "4", "0.6000", str(16384 * 4)]
    assert rows["net.0.bias"][2] == "32"
    assert rows["total"][1] == str(params)
    assert "recipe: {'pruning': {'final_sparsity': 0.6" in checkpoint.stdout


def test_subprocess_errors_exit_2_with_one_paragraph(tmp_path):
    (tmp_path / "r.yaml").write_text("pruning:\n  final_sparsty: 0.5\n")
    bad_recipe = run_cli(["fit", "--recipe", "r.yaml", "--model", MODEL, "--trainer.max_epochs", "1"], tmp_path)
    assert bad_recipe.returncode == 2
    assert_one_paragraph_error(bad_recipe.stderr, "did you mean pruning.final_sparsity?")
    bad_class = run_cli(["fit", "--model", "tests.cli_models.NoSuchModel"], tmp_path)
    assert bad_class.returncode == 2
    assert_one_paragraph_error(bad_class.stderr, "unknown class path")


ERRORS = [
    (["fitt"], "unknown command 'fitt'; did you mean 'fit'?"),
    # An option before the command was "unknown command '--recipe'; did you mean 'recipes'?".
    (["--recipe", "r.yaml", "fit"], "--recipe comes before the command; options go after it: `lightning-compress fit"
                                    " --recipe ...`"),
    (["-o", "x"], "-o comes before the command; options go after it: `lightning-compress COMMAND -o ...`, with"
                  " COMMAND one of fit, export"),
    (["fit", "--recipe", "missing.yaml", "--model", MODEL], "recipe file 'missing.yaml' not found"),
    (["fit", "--recipe", "int4_weight_onyl", "--model", MODEL], "did you mean 'int4_weight_only'?"),
    (["recipes", "int8_qt"], "did you mean 'int8_qat'?"),
    (["recipes", "a", "b"], "unrecognized arguments: b"),
    (["fit", "--model", "no_such_package.Model"], "--model no_such_package.Model: unknown class path"),
    (["fit", "--model", MODEL, "--data", "tests.cli_models.NoData"], "has no attribute 'NoData'"),
    (["fit", "--model", MODEL, "--override", "qat.weights=int4"], "--override changes a recipe; pass --recipe too"),
    (["fit", "--model", MODEL, "--override"], "--override needs a value"),
    (["fit", "--model", MODEL, "--trainer.max_epochz", "1"], "unrecognized arguments"),
    (["export", "--model", MODEL], "the following arguments are required: --checkpoint"),
    (["export", "--checkpoint", "missing.ckpt", "--model", MODEL, "-o", "x"], "checkpoint 'missing.ckpt' not found"),
    (["export", "--checkpoint", "plain.ckpt", "--model", MODEL, "-o", "x"], "stores no recipe"),
    (["export", "--checkpoint", "plain.ckpt", "--model", "torch.nn.Linear", "-o", "x"], "must be a LightningModule class"),
    (["export", "--checkpoint", "garbage.ckpt", "--model", MODEL, "-o", "x"], "cannot be loaded with weights_only=True"),
    (["export", "--checkpoint", "plain.ckpt", "--model", MODEL, "--recipe", "qat.yaml"], "no output directory"),
    (["export", "--checkpoint", "plain.ckpt", "--model", MODEL, "--recipe", "qat.yaml", "-o", "x"],
     "the checkpoint holds no state for ['QuantizationAwareTraining']"),
    # A checkpoint of another model (hidden 64, built as 128 from its hyperparameters): torch's
    # load_state_dict error was a traceback (exit 1).
    (["export", "--checkpoint", "wide.ckpt", "--model", MODEL, "--recipe", "export.yaml", "-o", "x"],
     "the checkpoint's weights do not fit RecipeMLP (size mismatch for net.0.weight"),
    (["sensitivity", "--checkpoint", "wide.ckpt", "--model", MODEL, "--data", "tests.cli_models.RecipeData"],
     "the checkpoint's weights do not fit RecipeMLP (size mismatch for net.0.weight"),
    # Lightning's unpickling error on a file that is not a checkpoint was a traceback (exit 1).
    (["fit", "--recipe", "qat.yaml", "--model", MODEL, "--data", "tests.cli_models.RecipeData", "--ckpt_path",
      "garbage.ckpt"], "checkpoint 'garbage.ckpt' cannot be loaded with weights_only=True"),
    (["sensitivity", "--model", "tests.cli_models.NeedsWidth", "--data", "tests.cli_models.RecipeData"],
     "cannot build NeedsWidth without arguments: "),  # it named "the checkpoint's hyperparameters []", with none
    # It said "pass `inputs`", an argument of the Python function the command has no option for.
    (["export", "--checkpoint", "plain.ckpt", "--model", MODEL, "-o", "x", "--format", "onnx"],
     "--format onnx traces the model with a batch of the data: pass --data"),
    (["inspect", "missing"], "'missing' is neither a packed directory nor a checkpoint file"),
    (["inspect", "garbage.ckpt"], "cannot be loaded with weights_only=True"),
    (["inspect", "fake_packed"], "not a lightning-compress packed model"),
    (["inspect"], "the following arguments are required: path"),
]


@pytest.mark.parametrize(("argv", "fragment"), ERRORS, ids=[" ".join(a)[:40] for a, _ in ERRORS])
def test_bad_input_exits_2_with_one_paragraph(tmp_path, monkeypatch, capsys, argv, fragment):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    torch.save({"state_dict": RecipeMLP().state_dict(), "hyper_parameters": {"hidden": 128}}, tmp_path / "plain.ckpt")
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    (tmp_path / "qat.yaml").write_text("qat:\n  weights: int8\n")
    (tmp_path / "export.yaml").write_text("export:\n  dirpath: x\n")
    torch.save({"state_dict": RecipeMLP(hidden=64).state_dict(), "hyper_parameters": {"hidden": 128}},
               tmp_path / "wide.ckpt")
    (tmp_path / "fake_packed").mkdir()
    (tmp_path / "fake_packed" / "compression.json").write_text(json.dumps({"format": "other"}))
    assert main(argv) == 2
    assert_one_paragraph_error(capsys.readouterr().err, fragment)


def test_sensitivity_refusing_a_layer_names_the_commands_fix_and_leaves_no_output_folder(tmp_path, monkeypatch,
                                                                                          capsys):
    """It advised QAT's fix, an override the command does not have, and left -o made and empty."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    assert main(["sensitivity", "--model", MODEL, "--data", "tests.cli_models.RecipeData", "--group-size", "48",
                 "-o", "sens"]) == 2
    assert_one_paragraph_error(capsys.readouterr().err, "`group_size`=48 does not divide the input size 128 of layer"
                               " 'net.0'; every layer is measured on one grid: leave it out (`exclude`, --exclude on"
                               " the command line), or choose a `group_size` that divides it (e.g. 64), or none"
                               " (one scale per output channel)")
    assert not (tmp_path / "sens").exists()


def test_help_exits_0_and_no_command_exits_2(capsys):
    assert main(["--help"]) == 0
    assert "lightning-compress fit" in capsys.readouterr().out
    assert main([]) == 2


def test_lightningcli_config_with_class_path_callbacks(tmp_path, monkeypatch, capsys):
    """The callbacks are plain ``class_path``/``init_args`` entries of a LightningCLI config."""
    monkeypatch.chdir(tmp_path)
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 2,
            "logger": False,
            "enable_progress_bar": False,
            "enable_checkpointing": False,
            "default_root_dir": str(tmp_path),
            "callbacks": [
                {"class_path": "lightning_compress.MagnitudePruning", "init_args": {"final_sparsity": 0.75, "end_step": 0.5}},
                {"class_path": "lightning_compress.QuantizationAwareTraining", "init_args": {"weights": "int8", "start_step": 0.5}},
                {"class_path": "lightning_compress.CompressedExport", "init_args": {"dirpath": str(tmp_path / "packed")}},
            ],
        },
        "model": {"class_path": MODEL, "init_args": {"hidden": 128}},
        "data": {"class_path": DATA},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", "config.yaml"]) == 0
    metadata = read_metadata(tmp_path / "packed")
    assert {entry["bits"] for entry in metadata["layers"].values()} == {8}
    assert min(1 - e["kept"] / (e["shape"][0] * e["shape"][1]) for e in metadata["layers"].values()) >= 0.75 - 1e-3


def test_demo_runs_and_prints_the_table(tmp_path):
    result = run_cli(["demo", "--epochs", "2", "--no-progress", "--output", str(tmp_path / "out")], tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout[result.stdout.index("digits:"):]
    rows = [line for line in table.splitlines() if line.startswith(("teacher", "student"))]
    assert len(rows) == 3
    accuracies = [float(re.split(r"\s{2,}", row)[1]) for row in rows]
    # Measured with the demo's fixed seed after 2 epochs: 0.93 (teacher), 0.94 (student),
    # 0.84 (distilled, 50% pruned, int4, reloaded); chance is 0.1 (10 classes). The margins
    # leave room for other platforms' float rounding, not for a broken pipeline.
    assert all(a <= 1.0 for a in accuracies)
    assert accuracies[0] >= 0.85 and accuracies[1] >= 0.85, accuracies
    assert accuracies[2] >= 0.7 and accuracies[1] - accuracies[2] <= 0.2, accuracies
    packed_bytes = int(re.split(r"\s{2,}", rows[2])[2])
    assert packed_bytes == (tmp_path / "out" / "student-packed" / "model.safetensors").stat().st_size
    assert "weights exact" in rows[2]
    run_dir = Path(re.search(r"W&B run written to (\S+)", result.stdout).group(1))
    assert run_dir.is_dir() and run_dir.name.startswith("offline-run-")
    assert read_offline_run(run_dir)["config"]["compression_recipe"]["qat"]["weights"] == "int4"


def fit_recipe_with_last_checkpoint(tmp_path, recipe, model_class, *, epochs, samples):
    """Fit a ``model_class()`` built from seed 0 with ``recipe``'s callbacks, keeping
    ``ckpt/last.ckpt``."""
    pl.seed_everything(0)
    trainer = make_trainer(
        max_epochs=epochs,
        enable_checkpointing=True,
        callbacks=[*from_recipe(recipe), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
    )
    trainer.fit(model_class(), RecipeData(samples=samples))


def test_export_of_a_distilled_run_does_not_need_the_teacher(tmp_path, monkeypatch):
    """The recipe stored in the checkpoint names a teacher file that is gone by export time."""
    monkeypatch.chdir(tmp_path)
    teacher_trainer = make_trainer(max_epochs=1)
    teacher_trainer.fit(RecipeMLP(hidden=256), RecipeData(samples=64))
    teacher_trainer.save_checkpoint(tmp_path / "teacher.ckpt")
    recipe = {
        "distillation": {"teacher": str(tmp_path / "teacher.ckpt"), "teacher_class": MODEL},
        "qat": {"weights": "int4", "group_size": 64},
        "export": {"dirpath": str(tmp_path / "packed")},
    }
    fit_recipe_with_last_checkpoint(tmp_path, recipe, RecipeMLP, epochs=1, samples=64)
    (tmp_path / "teacher.ckpt").unlink()

    report = export_checkpoint(tmp_path / "ckpt" / "last.ckpt", RecipeMLP, output=tmp_path / "again")
    assert report.parity.weights_exact
    assert read_metadata(tmp_path / "again")["weights_sha256"] == read_metadata(tmp_path / "packed")["weights_sha256"]


def test_export_of_a_lora_run_calls_the_modules_configure_model(tmp_path):
    """LoRA adapts a module with a `configure_model` only after it, which the checkpoint's
    restore never called: the adapters' weights were "unexpected keys" of the right class."""
    recipe = {"lora": {"r": 4}, "qat": {"weights": "int4", "group_size": 32, "targets": ["net.*"]},
              "export": {"dirpath": str(tmp_path / "packed")}}
    fit_recipe_with_last_checkpoint(tmp_path, recipe, HeadInConfigureModel, epochs=1, samples=64)
    report = export_checkpoint(tmp_path / "ckpt" / "last.ckpt", HeadInConfigureModel, output=tmp_path / "again")
    assert report.parity.weights_exact
    assert read_metadata(tmp_path / "again")["weights_sha256"] == read_metadata(tmp_path / "packed")["weights_sha256"]
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.count_nonzero(state["head.lora_B"]) > 0  # the head built there was adapted and trained


def test_a_configure_model_that_needs_a_device_mesh_is_skipped_by_the_export(tmp_path):
    """README's FSDP2 module shards in configure_model without checking for a mesh: on one
    process export skips it, warning, and exports as before it was called."""
    recipe = {"qat": {"weights": "int4", "group_size": 32}, "export": {"dirpath": str(tmp_path / "packed")}}
    fit_recipe_with_last_checkpoint(tmp_path, recipe, RecipeMLP, epochs=1, samples=64)
    with pytest.warns(UserWarning, match=r"ShardsInConfigureModel.configure_model failed on this one process, which has"
                                         r" no device mesh \(TypeError: .*\); it was skipped"):
        export_checkpoint(tmp_path / "ckpt" / "last.ckpt", ShardsInConfigureModel, output=tmp_path / "again")
    assert read_metadata(tmp_path / "again")["weights_sha256"] == read_metadata(tmp_path / "packed")["weights_sha256"]


def test_a_lora_run_exports_through_a_configure_model_skipped_for_want_of_a_device_mesh(tmp_path):
    """LoRA's adapters are put in after configure_model: skipped, the queued work still runs."""
    recipe = {"lora": {"r": 4}, "export": {"dirpath": str(tmp_path / "packed")}}
    fit_recipe_with_last_checkpoint(tmp_path, recipe, RecipeMLP, epochs=1, samples=64)
    with pytest.warns(UserWarning, match=r"configure_model failed on this one process"):
        export_checkpoint(tmp_path / "ckpt" / "last.ckpt", ShardsInConfigureModel, output=tmp_path / "again")
    assert read_metadata(tmp_path / "again")["weights_sha256"] == read_metadata(tmp_path / "packed")["weights_sha256"]


def test_an_error_of_work_queued_after_configure_model_is_raised_by_the_export(tmp_path):
    """The export caught it with the module's own configure_model and warned of a missing
    device mesh: QAT's refusal of a layer built there too late became a warning."""
    recipe = {"qat": {"weights": "int4", "group_size": 32}, "export": {"dirpath": str(tmp_path / "packed")}}
    fit_recipe_with_last_checkpoint(tmp_path, recipe, RecipeMLP, epochs=1, samples=64)
    with pytest.raises(ValueError, match=r"before `configure_model` built \['head'\], which it also targets"):
        export_checkpoint(tmp_path / "ckpt" / "last.ckpt", HeadInConfigureModel, output=tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_sensitivity_measures_layers_built_in_configure_model(tmp_path, monkeypatch, capsys):
    """It loaded the checkpoint without calling configure_model: 'unexpected keys head.weight'."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    model = HeadInConfigureModel()
    model.configure_model()
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": {"hidden": 128}}, tmp_path / "float.ckpt")
    assert main(["sensitivity", "--model", "tests.cli_models.HeadInConfigureModel", "--checkpoint", "float.ckpt",
                 "--data", DATA, "--batches", "1", "--bits", "4", "-o", "s"]) == 0
    rows = (tmp_path / "s" / "sensitivity.csv").read_text().splitlines()
    assert any(row.startswith("head,") for row in rows)


class Wrapped(pl.LightningModule):
    """A LightningModule keeping its network in ``self.model``, exported with ``module="model"``."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = RecipeMLP(hidden).net

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


@pytest.mark.parametrize(
    ("name", "recipe", "model_class"),
    [
        ("qlora", {"lora": {"r": 4, "base": "nf4", "exclude_modules": ["net.4"]}, "qat": {"weights": "int4", "group_size": 64}}, "mlp"),
        ("lora-adapter-only", {"lora": {"r": 4, "adapter_only_checkpoints": True}, "pruning": {"final_sparsity": 0.5}}, "mlp"),
        ("submodule", {"qat": {"weights": "int4", "group_size": 32}, "export": {"module": "model"}}, "wrapped"),
    ],
)
def test_export_from_checkpoint_matches_the_fit_export(tmp_path, monkeypatch, name, recipe, model_class):
    """QLoRA (NF4 bases restored by the module's on_load_checkpoint), adapter-only checkpoints,
    and ``export.module``: the command writes the files the run's own export wrote."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    cls = RecipeMLP if model_class == "mlp" else Wrapped
    recipe = {**recipe, "export": {**recipe.get("export", {}), "dirpath": str(tmp_path / "packed")}}
    fit_recipe_with_last_checkpoint(tmp_path, recipe, cls, epochs=2, samples=128)
    model_path = "tests.cli_models.RecipeMLP" if model_class == "mlp" else "tests.test_cli.Wrapped"
    # Checkpoints without the frozen bases (NF4, adapter-only) take them from the module as
    # built, as a pretrained model would rebuild them: the same seed stands in for that.
    pl.seed_everything(0)
    assert main(["export", "--checkpoint", "ckpt/last.ckpt", "--model", model_path, "-o", "again"]) == 0
    first, again = read_metadata(tmp_path / "packed"), read_metadata(tmp_path / "again")
    assert again["weights_sha256"] == first["weights_sha256"]
    assert sorted(again["layers"]) == sorted(first["layers"])
    if model_class == "wrapped":
        assert sorted(first["layers"]) == ["0", "2", "4"]  # names inside `model`, as fit wrote them


def test_configuration_errors_found_before_training_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    base = ["fit", "--model", MODEL, "--data", DATA, "--trainer.max_epochs", "1", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)]
    (tmp_path / "r.yaml").write_text(RECIPE)
    (tmp_path / "packed").mkdir()
    cases = [
        # An earlier export is never overwritten.
        (["--recipe", "r.yaml"], "packed already exists; choose another `dirpath` or pass overwrite=True (in a recipe:"
                                 " export.overwrite=true)"),
        (["--recipe", "r.yaml", "--override", "export.dirpath=fresh", "--override", "qat.group_size=96"],
         "does not divide the input size 128"),
        (["--recipe", "r.yaml", "--override", "export.dirpath=fresh", "--trainer.callbacks+=lightning_compress.MagnitudePruning",
          "--trainer.callbacks.final_sparsity=0.5"], "['MagnitudePruning'] come both from --trainer.callbacks and from the recipe"),
        (["--recipe", "r.yaml", "--override", "pruning.pattern=2:4", "--override", "pruning.final_sparsity=null",
          "--override", "export.dirpath=fresh", "--override", "qat.group_size=2"], "group"),
    ]
    (tmp_path / "packed" / "r.yaml").write_text(RECIPE)
    # overwrite=True replaces the folder whole: not the one the recipe is read from.
    cases.append((["--recipe", "packed/r.yaml", "--override", "export.overwrite=true"],
                  "`dirpath` packed holds the recipe file (packed/r.yaml), which overwrite=True would delete"))
    (tmp_path / "packed" / "c.yaml").write_text("trainer:\n  max_steps: 2\n")
    cases.append((["--recipe", "r.yaml", "-c", "packed/c.yaml", "--override", "export.overwrite=true"],
                  "packed/c.yaml), which overwrite=True would delete"))
    for extra, fragment in cases:
        assert main(base + extra) == 2, extra
        assert_one_paragraph_error(capsys.readouterr().err, fragment)
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in (tmp_path / "packed").iterdir()) == ["c.yaml", "r.yaml"]


def test_fit_takes_a_ready_recipe_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    assert main(["fit", "--recipe", "int4_weight_only", "--override", "export.dirpath=packed", "--model", MODEL,
                 "--data", DATA, "--trainer.max_epochs", "1", "--trainer.logger", "false",
                 "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)]) == 0
    layers = read_metadata(tmp_path / "packed")["layers"]
    assert {name: (layer["bits"], layer["group_size"]) for name, layer in layers.items()} == {
        "net.0": (4, 128), "net.2": (4, 128), "net.4": (4, 128)}


def test_recipes_lists_the_ready_ones_and_prints_one_to_copy(tmp_path, capsys):
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out.splitlines()
    names = sorted(path.stem for path in BUILTIN_RECIPES_DIR.glob("*.yaml"))
    assert [line.split()[0] for line in listing[: len(names)]] == names
    assert listing[names.index("int8_qat")].split(None, 1)[1] == "int8 quantization-aware training (W8A8)."
    assert main(["recipes", "int8_qat"]) == 0
    printed = capsys.readouterr().out
    assert printed == (BUILTIN_RECIPES_DIR / "int8_qat.yaml").read_text()
    (tmp_path / "mine.yaml").write_text(printed)  # what `recipes int8_qat > mine.yaml` leaves
    assert load_recipe(tmp_path / "mine.yaml").config == load_recipe("int8_qat").config


def test_resume_without_recipe_uses_the_one_in_the_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    (tmp_path / "r.yaml").write_text("pruning:\n  final_sparsity: 0.7\n  end_step: 0.5\n")
    base = ["fit", "--model", MODEL, "--data", DATA, "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks+=ModelCheckpoint",
            "--trainer.callbacks.dirpath=ckpt", "--trainer.callbacks.save_last=true", "--seed_everything", "0"]
    assert main(base + ["--recipe", "r.yaml", "--trainer.max_epochs", "1"]) == 0
    assert main(base + ["--trainer.max_epochs", "2", "--ckpt_path", "ckpt/last.ckpt"]) == 0
    assert "resuming with the recipe stored in ckpt/last.ckpt" in capsys.readouterr().out
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["lightning_compress"]["recipe"]["pruning"]["final_sparsity"] == 0.7
    weight = checkpoint["state_dict"]["net.0.weight"]
    assert float((weight == 0).float().mean()) == pytest.approx(0.7, abs=1e-3)


def test_fit_resumes_a_checkpoint_a_plain_trainer_saved(tmp_path, monkeypatch):
    """`save_hyperparameters()` outside LightningCLI stores the arguments without the class;
    LightningCLI read them as the base LightningModule's ("Option 'hidden' is not accepted",
    exit 2). They are --model's: the resumed model has the checkpoint's width, not the default."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    (tmp_path / "r.yaml").write_text("pruning:\n  final_sparsity: 0.7\n  end_step: 0.5\n")
    pl.seed_everything(0)
    trainer = make_trainer(max_epochs=1, callbacks=from_recipe("r.yaml"))
    trainer.fit(RecipeMLP(hidden=64), RecipeData())
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    assert "_class_path" not in torch.load(tmp_path / "plain.ckpt", weights_only=True)["hyper_parameters"]
    assert main(["fit", "--model", MODEL, "--data", DATA, "--recipe", "r.yaml", "--trainer.max_epochs", "2",
                 "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--ckpt_path", "plain.ckpt",
                 "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath=ckpt",
                 "--trainer.callbacks.save_last=true"]) == 0
    resumed = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert resumed["epoch"] == 1 and resumed["hyper_parameters"]["hidden"] == 64
    assert resumed["state_dict"]["net.0.weight"].shape == (64, 128)


def test_a_module_without_forward_is_named_before_training_in_one_paragraph(tmp_path, monkeypatch, capsys):
    """The export's dry run found it at the first batch: the command printed a
    NotImplementedError traceback from inside torch. The export's setup names it, with the
    submodule to export instead; with that, the run exports."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    (tmp_path / "r.yaml").write_text("qat:\n  weights: int8\nexport:\n  dirpath: packed\n")
    argv = ["fit", "--model", "tests.cli_models.StepOnly", "--data", DATA, "--recipe", "r.yaml", "--trainer.max_epochs",
            "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_checkpointing", "false"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("lightning-compress fit: error: StepOnly has no forward")
    assert "CompressedExport(module='net') (in a recipe: export.module: net)" in error
    assert not (tmp_path / "packed").exists()
    assert main([*argv, "--override", "export.module=net"]) == 0
    assert (tmp_path / "packed" / "model.safetensors").is_file()


def test_a_dry_export_settings_error_is_one_paragraph(tmp_path, monkeypatch, capsys):
    """The dry run checks `input_fn` at the first batch, after on_train_start: its ArgumentError
    is bad input (exit 2, one paragraph), not a traceback."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    (tmp_path / "r.yaml").write_text("qat:\n  weights: int8\nexport:\n  dirpath: packed\n"
                                     "  input_fn: tests.cli_models.three_inputs\n")
    assert main(["fit", "--model", MODEL, "--data", DATA, "--recipe", "r.yaml", "--trainer.max_epochs", "1",
                 "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]) == 2
    error = capsys.readouterr().err
    assert_one_paragraph_error(error, "input_fn made 3 positional inputs")
    # The note is a sentence of its own (a new user read "... got X found by CompressedExport's dry export").
    assert re.search(r"[.;:!?] found by CompressedExport's dry export before the first training step", error), error
    assert not (tmp_path / "packed").exists()


def test_an_error_of_the_first_training_step_keeps_its_traceback(tmp_path, monkeypatch):
    """Errors before the first step are bad input (one paragraph, exit 2); one the model
    raises in its first training step is its own failure and reaches the user as it is."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    (tmp_path / "r.yaml").write_text(RECIPE)
    with pytest.raises(ValueError, match="^the model's own bug$"):
        main(["fit", "--model", "tests.cli_models.FailsInTraining", "--data", DATA, "--recipe", "r.yaml",
              "--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])


def test_export_overwrite_refuses_a_folder_holding_what_it_reads(tmp_path, monkeypatch, capsys):
    """`-o ck --overwrite` replaced ck whole, deleting the checkpoint it had just read (and
    every other one there) with exit 0; so did a folder holding the --recipe file."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    (tmp_path / "rec").mkdir()
    (tmp_path / "rec" / "r.yaml").write_text(RECIPE)
    trainer = make_trainer(max_steps=4, callbacks=from_recipe("rec/r.yaml", overrides=["export.dirpath=first"]))
    trainer.fit(RecipeMLP(), RecipeData())
    (tmp_path / "ck").mkdir()
    trainer.save_checkpoint(tmp_path / "ck" / "last.ckpt")
    monkeypatch.setenv("HOME", str(tmp_path))  # `~` is expanded by the readers and the export: by the check too
    for checkpoint, argv, held in (
            ("ck/last.ckpt", ["-o", "ck"], "holds the checkpoint this export reads (ck/last.ckpt), which overwrite"),
            ("~/ck/last.ckpt", ["-o", "~/ck"], "holds the checkpoint this export reads (~/ck/last.ckpt)"),
            ("ck/last.ckpt", ["--recipe", "rec/r.yaml", "-o", "rec"], "holds the recipe file (rec/r.yaml)")):
        assert main(["export", "--checkpoint", checkpoint, "--model", MODEL, "--overwrite", *argv]) == 2
        error = capsys.readouterr().err
        assert held in error and "choose another output directory (-o/--output)" in error
    assert (tmp_path / "ck" / "last.ckpt").is_file() and (tmp_path / "rec" / "r.yaml").is_file()


def test_fit_with_a_csv_logger_ends_with_exit_0(tmp_path, monkeypatch, capsys):
    """After fit, the command prints where a W&B run was written; it asked every logger
    for a W&B run directory, and a CSVLogger's writer has none (AttributeError, exit 1)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    (tmp_path / "r.yaml").write_text(RECIPE)
    argv = ["fit", "--model", MODEL, "--data", DATA, "--recipe", "r.yaml", "--trainer.max_epochs", "1",
            "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", "logs", "--trainer.enable_progress_bar",
            "false", "--trainer.enable_checkpointing", "false", "--trainer.log_every_n_steps", "1"]
    assert main(argv) == 0
    assert "W&B run written" not in capsys.readouterr().out
    metrics = list((tmp_path / "logs").rglob("metrics.csv"))
    assert len(metrics) == 1 and "pruning/sparsity_actual" in metrics[0].read_text().splitlines()[0]
    assert (tmp_path / "packed" / "model.safetensors").is_file()


def test_only_a_state_dict_mismatch_is_reworded_as_the_wrong_model():
    """A load hook's own error (or running out of memory) is not a checkpoint of another
    model: it goes on as it is, not as "the checkpoint's weights do not fit ... ()"."""
    from lightning_compress.checkpoints import load_weights
    from lightning_compress.recipes import RecipeError

    class RefusesToLoad(RecipeMLP):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            raise RuntimeError("the hook says no")

    checkpoint = {"state_dict": RecipeMLP().state_dict()}
    with pytest.raises(RuntimeError, match="^the hook says no$"):
        load_weights(RefusesToLoad(), checkpoint)
    with pytest.raises(RecipeError, match=r"do not fit RecipeMLP \(size mismatch for net\.0\.weight"):
        load_weights(RecipeMLP(hidden=64), checkpoint)
    model = RecipeMLP()
    load_weights(model, checkpoint)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in checkpoint["state_dict"].items())


def test_fit_from_a_plain_state_dict_file_a_folder_or_another_models_checkpoint_exits_2(tmp_path, monkeypatch, capsys):
    """Before, a KeyError ('pytorch-lightning_version'), an IsADirectoryError and torch's
    load_state_dict RuntimeError, each a traceback with exit 1."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    torch.save({"state_dict": RecipeMLP().state_dict(), "epoch": 3}, tmp_path / "plain.ckpt")
    (tmp_path / "folder").mkdir()
    torch.manual_seed(0)
    trainer = make_trainer(max_steps=1, default_root_dir=str(tmp_path))
    trainer.fit(RecipeMLP(hidden=64), RecipeData())
    trainer.save_checkpoint(tmp_path / "wide.ckpt")
    checkpoint = torch.load(tmp_path / "wide.ckpt", weights_only=True)
    del checkpoint["hyper_parameters"]  # --model builds RecipeMLP() (128 wide); the weights are 64 wide
    torch.save(checkpoint, tmp_path / "wide.ckpt")
    base = ["fit", "--model", MODEL, "--data", DATA, "--trainer.max_epochs", "1", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false"]
    cases = [
        ("plain.ckpt", "--ckpt_path plain.ckpt is not a checkpoint Lightning wrote (no 'pytorch-lightning_version'"),
        ("folder", "Is a directory"),
        ("wide.ckpt", "size mismatch for net.0.weight"),
    ]
    for path, fragment in cases:
        assert main([*base, "--ckpt_path", path]) == 2, path
        err = capsys.readouterr().err
        assert_one_paragraph_error(err, fragment)
        if path == "wide.ckpt":
            assert "pass the --model (and its arguments) the run was trained with" in err


def test_export_from_a_checkpoint_checks_batches_through_the_batch_hooks(tmp_path, monkeypatch):
    """As the run's own check at the end of fit does: the raw uint8 batch met float32
    layers ("mat1 and mat2 must have the same dtype") and the export was kept aside."""
    from tests.cli_models import ByteData, ScalesItsBytes

    monkeypatch.chdir(tmp_path)
    recipe = {"qat": {"weights": "int8"}, "export": {"dirpath": str(tmp_path / "packed")}}
    pl.seed_everything(0)
    trainer = make_trainer(max_epochs=1, enable_checkpointing=True,
                           callbacks=[*from_recipe(recipe), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    trainer.fit(ScalesItsBytes(), ByteData(samples=64))
    report = export_checkpoint(tmp_path / "ckpt" / "last.ckpt", ScalesItsBytes, output=tmp_path / "again",
                               datamodule=ByteData(samples=64))
    assert report.parity.relative_error is not None and report.parity.relative_error <= 1e-5
    assert read_metadata(tmp_path / "again")["weights_sha256"] == read_metadata(tmp_path / "packed")["weights_sha256"]



def test_sensitivity_measures_on_batches_through_the_batch_hooks(tmp_path, monkeypatch, capsys):
    """training_step got the raw uint8 batch (a dtype error inside the measurement)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    argv = ["sensitivity", "--model", "tests.cli_models.ScalesItsBytes", "--data", "tests.cli_models.ByteData",
            "--batches", "1", "--bits", "8", "-o", "s"]
    assert main(argv) == 0
    rows = (tmp_path / "s" / "sensitivity.csv").read_text().splitlines()
    assert len(rows) == 4 and all("nan" not in row for row in rows)  # a header and the three Linear layers
