"""Weights & Biases: real offline runs read back from disk, and the logger factory."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import wandb
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_compress import (
    CompressedExport,
    LoRA,
    MagnitudePruning,
    QuantizationAwareTraining,
    wandb_logger,
    wandb_run_dir,
)
from lightning_compress.core.reporting import LAYER_COLUMNS, LAYER_TABLE_KEY
from lightning_compress.core.tracking import artifact_name
from lightning_compress.formats.packed import METADATA_FILE, WEIGHTS_FILE
from tests.conftest import TinyRegressor, make_trainer, tiny_loader
from tests.test_pruning_callback import TableLogger
from tests.wandb_offline import read_offline_run, scalar_series

# Layers of GroupedRegressor and their weight counts; groups are the first name part.
PARAMS = {"encoder.0": 96, "encoder.3": 2048, "head": 256}
GROUPS = {"encoder": ("encoder.0", "encoder.3"), "head": ("head",)}
STEPS = 16  # 2 epochs of 8 batches
PRUNING = dict(final_sparsity=0.5, start_step=0, end_step=8, update_every=2)  # cubic
QAT_START = 4
BITS = {"encoder.0": 4, "encoder.3": 8, "head": 4}


class GroupedRegressor(TinyRegressor):
    """TinyRegressor's layers under nested names: groups ``encoder`` (two layers) and ``head``."""

    def __init__(self) -> None:
        super().__init__()
        del self.conv, self.fc1, self.fc2
        self.encoder = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        return self.head(torch.relu(self.encoder(x)))


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Everything W&B writes stays under tmp_path; no key, no network, quiet."""
    for variable in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home" / variable.lower()))
    for variable in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no.netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    # WandbLogger(offline=True) sets WANDB_MODE for the whole process; undone after the test.
    monkeypatch.setenv("WANDB_MODE", "offline")
    yield tmp_path
    wandb.finish()


def target(step: int) -> float:
    """The cubic schedule of PRUNING at ``step``, written out here (not the library's
    function): Zhu & Gupta (2017), ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))**3``
    on the update grid t0, t0 + dt, ..., held between updates, ``s_f`` from ``end_step`` on.
    With s_i = 0, s_f = 0.5, t0 = 0, n dt = 8, dt = 2: 0.5 (1 - (1 - t / 8)**3)."""
    hand = {0: 0.0, 2: 0.5 * (1 - 0.75**3), 4: 0.5 * (1 - 0.5**3), 6: 0.5 * (1 - 0.25**3)}
    assert hand[2] == 0.2890625 and hand[4] == 0.4375 and hand[6] == 0.4921875
    return 0.5 if step >= 8 else hand[step - step % 2]


def expected_sparsity(step: int, layers) -> float:
    """What per-layer masks prune at ``step``: round(target * n) weights of each layer."""
    return sum(round(target(step) * PARAMS[name]) for name in layers) / sum(PARAMS[name] for name in layers)


def fit_offline(tmp_path, callbacks):
    wandb_log = wandb_logger(offline=True, save_dir=tmp_path / "runs", project="lc-test")
    csv_log = CSVLogger(tmp_path / "csv")
    trainer = make_trainer(max_epochs=2, callbacks=callbacks, logger=[wandb_log, csv_log], log_every_n_steps=1)
    trainer.fit(GroupedRegressor(), tiny_loader(batches=8))
    run_dir = wandb_run_dir(wandb_log)
    wandb_log.experiment.finish()
    assert run_dir.parent == tmp_path / "runs" / "wandb" and run_dir.name.startswith("offline-run-")
    return trainer, read_offline_run(run_dir)


def test_stacked_run_is_recorded_in_the_offline_run(wandb_env, seeded):
    tmp_path = wandb_env
    export_dir = tmp_path / "exports" / "tiny run #1"
    callbacks = [
        CompressedExport(export_dir),
        MagnitudePruning(**PRUNING),
        QuantizationAwareTraining("int4", start_step=QAT_START, activations="int8_dynamic",
                                  overrides={"encoder.3": {"bits": 8}}),
    ]
    trainer, run = fit_offline(tmp_path, callbacks)
    assert trainer.global_step == STEPS

    # Global and per-group sparsity, every step: scheduled from the cubic schedule, actual
    # from the masks (round(target * n) of each layer); Lightning logs float32 scalars.
    scheduled = scalar_series(run, "pruning/sparsity_scheduled")
    actual = scalar_series(run, "pruning/sparsity_actual")
    assert sorted(scheduled) == list(range(STEPS))
    for step in range(STEPS):
        assert scheduled[step] == pytest.approx(target(step), abs=1e-7)
        assert actual[step] == pytest.approx(expected_sparsity(step, PARAMS), abs=1e-7)
        for group, layers in GROUPS.items():
            assert scalar_series(run, f"pruning/sparsity/{group}")[step] == pytest.approx(
                expected_sparsity(step, layers), abs=1e-7
            )
    assert actual[STEPS - 1] == pytest.approx(0.5, abs=1e-6)
    assert 0.0 < scheduled[2] < scheduled[4] < scheduled[6] < 0.5  # it does ramp
    assert not any(key.startswith("pruning/sparsity/encoder.") for row in run["history"] for key in row)

    # Bits in use: float before start_step, then the parameter-weighted mean.
    mean_bits = sum(PARAMS[n] * BITS[n] for n in PARAMS) / sum(PARAMS.values())
    weight_bits = scalar_series(run, "qat/weight_bits")
    assert weight_bits == pytest.approx({s: 32.0 if s < QAT_START else mean_bits for s in range(STEPS)})
    assert mean_bits == pytest.approx(7.41333, abs=1e-5)
    assert scalar_series(run, "qat/enabled") == {s: float(s >= QAT_START) for s in range(STEPS)}
    assert scalar_series(run, "qat/activation_bits") == {s: 32.0 if s < QAT_START else 8.0 for s in range(STEPS)}

    # One per-layer table for the whole fit, though three callbacks reach on_fit_end.
    assert set(run["tables"]) == {LAYER_TABLE_KEY, "pruning/schedule_table"}
    (table,) = run["tables"][LAYER_TABLE_KEY]
    assert table["columns"] == list(LAYER_COLUMNS)
    # Filed at the fit's last step, not at the last step a scalar happened to be logged at.
    (logged_at,) = [row["trainer/global_step"] for row in run["history"] if LAYER_TABLE_KEY in row]
    assert logged_at == STEPS
    rows = {row[0]: dict(zip(table["columns"], row)) for row in table["data"]}
    assert set(rows) == set(PARAMS)
    for name, row in rows.items():
        assert row["params"] == PARAMS[name]
        assert row["sparsity"] == pytest.approx(0.5, abs=1e-9)
        assert row["weight_bits"] == BITS[name]
        assert (row["granularity"], row["activation_bits"], row["lora_rank"]) == ("channel", 8, 0)
    assert rows["encoder.0"]["type"] == "Conv1d" and rows["head"]["type"] == "Linear"

    # The schedule chart: the whole scheduled curve, steps 0..estimated_stepping_batches.
    chart = run["config"]["_wandb"]["visualize"]["pruning/schedule"]
    assert chart["panel_config"]["panelDefId"] == "wandb/line/v0"
    (curve,) = run["tables"]["pruning/schedule_table"]
    assert curve["columns"] == ["step", "sparsity"]
    assert [step for step, _ in curve["data"]] == list(range(STEPS + 1))
    for step, value in curve["data"]:
        assert value == pytest.approx(target(step), abs=1e-12)

    # The export as a model artifact, with compression.json as its metadata.
    (artifact,) = run["artifacts"]
    assert (artifact["type"], artifact["name"]) == ("model", "tiny-run-1")
    assert artifact["metadata"] == json.loads((export_dir / METADATA_FILE).read_text())
    assert artifact["metadata"]["parity"]["passed"]
    assert set(artifact["files"]) == {p.name for p in export_dir.iterdir()} >= {WEIGHTS_FILE, METADATA_FILE}
    assert artifact["files"][WEIGHTS_FILE] == (export_dir / WEIGHTS_FILE).stat().st_size

    # The CSV logger got every scalar W&B got.
    with open(next((tmp_path / "csv").rglob("metrics.csv"))) as handle:
        csv_keys = set(next(csv.reader(handle))) - {"step"}
    wandb_scalars = {
        key
        for row in run["history"]
        for key, value in row.items()
        if not key.startswith("_") and key != "trainer/global_step" and not isinstance(value, dict)
    }
    assert "pruning/sparsity/encoder" in wandb_scalars and "qat/weight_bits" in wandb_scalars
    assert csv_keys == wandb_scalars
    assert list((tmp_path / "wandb-home" / "wandb_data_dir" / "artifacts" / "staging").iterdir())  # W&B's copy


def test_layer_table_is_logged_once_per_fit_and_again_on_the_next(seeded):
    # LoRA first: it merges its adapters in on_fit_end, after reporting them.
    logger = TableLogger()
    logged = []
    logger.log_table = lambda key, columns, data: logged.append((key, columns, data))
    callbacks = [
        LoRA(r=2, target_modules=["head"], merge_on_fit_end=True),
        MagnitudePruning(0.25, end_step=4, targets=["encoder.*"]),
        QuantizationAwareTraining("int8", start_step=0, targets=["encoder.3", "head"]),
    ]
    model = GroupedRegressor()
    make_trainer(max_steps=6, callbacks=callbacks, logger=logger).fit(model, tiny_loader(batches=8))
    assert [key for key, _, _ in logged] == [LAYER_TABLE_KEY]
    _, columns, data = logged[0]
    rows = {row[0]: dict(zip(columns, row)) for row in data}
    assert set(rows) == set(PARAMS)
    assert rows["head"]["lora_rank"] == 2 and rows["head"]["weight_bits"] == 8 and rows["head"]["sparsity"] == 0.0
    assert rows["encoder.0"]["weight_bits"] == 32 and rows["encoder.0"]["granularity"] == "float"
    assert rows["encoder.3"]["sparsity"] == round(0.25 * 2048) / 2048 and rows["encoder.3"]["lora_rank"] == 0

    # Each fit owes its own table: two fits with one Trainer log two more.
    second = [MagnitudePruning(0.25, end_step=2), QuantizationAwareTraining("int8")]
    trainer = make_trainer(max_steps=2, callbacks=second, logger=logger)
    trainer.fit(TinyRegressor(), tiny_loader(batches=8))
    trainer.fit(trainer.lightning_module, tiny_loader(batches=8))  # the same Trainer, fit again
    assert [key for key, _, _ in logged] == [LAYER_TABLE_KEY] * 3
    assert {row[0] for row in logged[-1][2]} == {"conv", "fc1", "fc2"}


def test_nothing_w_and_b_specific_is_logged_without_a_wandb_logger(tmp_path, seeded):
    callbacks = [MagnitudePruning(0.5, end_step=4), CompressedExport(tmp_path / "packed")]
    logger = CSVLogger(tmp_path / "csv")
    make_trainer(max_steps=6, callbacks=callbacks, logger=logger, log_every_n_steps=1).fit(
        TinyRegressor(), tiny_loader(batches=8)
    )
    with open(next((tmp_path / "csv").rglob("metrics.csv"))) as handle:
        keys = set(next(csv.reader(handle)))
    assert {"pruning/sparsity/conv", "pruning/sparsity/fc1", "pruning/sparsity/fc2"} <= keys
    assert not (tmp_path / "wandb").exists()
    assert "wandb" not in {p.name for p in tmp_path.rglob("*")}


def test_wandb_logger_is_offline_without_a_key(tmp_path, monkeypatch):
    for variable in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(variable, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    logger = wandb_logger(save_dir=tmp_path)
    assert logger._offline and logger.name == "lightning-compress" and logger.save_dir == str(tmp_path)
    assert logger._experiment is None  # nothing started

    netrc.write_text("machine example.com login user password secret\n")
    assert wandb_logger(save_dir=tmp_path)._offline
    netrc.write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
    assert not wandb_logger(save_dir=tmp_path)._offline
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")  # a key for another host
    assert wandb_logger(save_dir=tmp_path)._offline
    netrc.unlink()

    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert not wandb_logger(save_dir=tmp_path)._offline
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "disabled")  # explicit: wandb follows it
    assert not wandb_logger(save_dir=tmp_path)._offline
    assert wandb_logger(save_dir=tmp_path, offline=True)._offline
    assert wandb_logger(project="other", save_dir=tmp_path).name == "other"


def test_artifact_names_are_sanitized(tmp_path):
    assert artifact_name(tmp_path / "exports" / "run 1: int4/") == "run-1-int4"
    assert artifact_name(tmp_path / "v1.2_final") == "v1.2_final"
    assert artifact_name(tmp_path / "***") == "model"


def test_importing_the_package_does_not_import_wandb():
    code = "import sys, lightning_compress, lightning_compress.core.tracking; assert 'wandb' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("overwrite", [True, False])
def test_an_export_to_the_wandb_runs_folder_is_refused_before_training(wandb_env, overwrite):
    """wandb writes its runs to <save_dir>/wandb, not to the logger's save_dir itself: an
    export there with overwrite=True deleted every offline run, this one's too."""
    from lightning_compress import ArgumentError, CompressedExport, QuantizationAwareTraining

    runs = wandb_env / "runs" / "wandb"
    earlier = runs / "offline-run-20261130_000000-earlier"
    earlier.mkdir(parents=True)
    (earlier / "run-earlier.wandb").write_bytes(b"kept")
    for dirpath, message in [(runs, rf"`dirpath` {runs} holds WandbLogger's runs \({runs}\)"),
                             (earlier, rf"`dirpath` {earlier} lies in WandbLogger's runs \({runs}\), whose folders"),
                             (runs / "latest-run", r"lies in WandbLogger's runs")]:  # wandb links it to this run
        logger = wandb_logger(offline=True, save_dir=wandb_env / "runs", project="p")
        trainer = make_trainer(max_steps=2, logger=logger, callbacks=[
            QuantizationAwareTraining("int8"), CompressedExport(dirpath, overwrite=overwrite)])
        with pytest.raises(ArgumentError, match=message):
            trainer.fit(TinyRegressor(), tiny_loader(batches=2))
        wandb.finish()
        assert trainer.global_step == 0 and (earlier / "run-earlier.wandb").read_bytes() == b"kept"


def test_a_relative_save_dir_is_written_after_a_change_of_directory(wandb_env, monkeypatch):
    """wandb's service, started by this process's first run, resolves a relative `dir`
    against its own working directory: after a chdir the run's log went nowhere (the
    sensitivity command's `-o out --wandb` in a process that had run W&B before)."""
    (wandb_env / "first").mkdir()
    (wandb_env / "second").mkdir()
    monkeypatch.chdir(wandb_env / "first")
    first = wandb_logger(save_dir="runs", project="p")
    first.log_metrics({"a": 1.0})
    first.experiment.finish()
    monkeypatch.chdir(wandb_env / "second")
    second = wandb_logger(save_dir="runs", project="p")
    second.log_metrics({"b": 2.0})
    run_dir = Path(second.experiment.dir).parent
    second.experiment.finish()
    assert run_dir.parent == wandb_env / "second" / "runs" / "wandb"
    assert [row["b"] for row in read_offline_run(run_dir)["history"]] == [2.0]
