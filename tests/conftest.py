import logging
import os
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")


# `LC_TEST_ACCELERATOR=gpu` runs every test's Trainer on that accelerator (`make test-gpu`):
# the device check of the callbacks, the exports and the loaders from a model trained there.
ACCELERATOR = os.environ.get("LC_TEST_ACCELERATOR", "cpu")


def _int8_gemm_missing():
    from lightning_compress.formats.int8_gemm import int8_gemm_available, one_token_gemm_available

    return int8_gemm_available() or one_token_gemm_available()


# Why PyTorch's int8 GEMM (fbgemm/oneDNN u8 x s8) does not run exactly on this CPU, or None:
# on x86 without VNNI its pairs of products saturate in int16, and the package runs int8
# layers on the exact dequantize path instead (tested on every CPU with an emulated
# saturating kernel: test_int8_gemm.py, test_one_token_gemm.py). Tests of the kernel's own
# numbers need it; tests that only name the kernel expect the one this CPU runs.
INT8_GEMM_MISSING = _int8_gemm_missing()
FAST_INT8 = "fbgemm" if INT8_GEMM_MISSING is None else "dequantize"
needs_int8_gemm = pytest.mark.skipif(
    INT8_GEMM_MISSING is not None,
    reason=f"tests PyTorch's int8 GEMM, which is not exact on this CPU ({INT8_GEMM_MISSING}); the exact fallback"
           " such a CPU gets is tested with an emulated saturating kernel",
)


@pytest.fixture
def int8_gemm_runs(monkeypatch):
    """For tests of what happens when the int8 GEMM's figures miss a threshold (min_sqnr_db=200,
    which its rounded activations never meet): on a CPU where it is not exact the package
    would not run it at all, so its probe is told it is; its saturated figures miss the
    threshold further. Nothing else changes."""
    from lightning_compress.formats import int8_gemm

    if INT8_GEMM_MISSING is not None:
        monkeypatch.setattr(int8_gemm, "int8_gemm_available", lambda: None)
if ACCELERATOR != "cpu":
    # Resume and stacking tests compare runs bit for bit; CUDA's fastest kernels are not
    # deterministic (atomic adds in some backward passes).
    torch.use_deterministic_algorithms(True, warn_only=True)


def make_trainer(**overrides) -> pl.Trainer:
    """A quiet Trainer (CPU unless `LC_TEST_ACCELERATOR` says otherwise); tests pass what they exercise."""
    options = dict(
        accelerator=ACCELERATOR,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
    )
    options.update(overrides)
    return pl.Trainer(**options)


class TinyRegressor(pl.LightningModule):
    """Linear + Conv model on a fixed random regression task: fast and deterministic."""

    def __init__(self, optimizer: str = "adamw", lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", torch.nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=1e-2)


class StopAfterEpoch(pl.Callback):
    """Saves a checkpoint at the end of epoch ``epoch`` and stops: an interrupted run."""

    def __init__(self, epoch, path):
        self.epoch, self.path = epoch, path

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def fit_interrupted_and_resumed(make_callback, tmp_path, *, epochs, stop_after, batches=8):
    """Train from one initial state three ways: uninterrupted; stopped (checkpoint) after
    epoch ``stop_after``; resumed from that checkpoint. ``make_callback()`` builds a fresh
    callback per run. Returns ``(reference, reference_callback, resumed, resumed_callback,
    checkpoint)``: a resume invariant compares the first pair with the second.
    """
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in TinyRegressor().state_dict().items()}

    def run(extra, ckpt_path=None):
        model = TinyRegressor()
        model.load_state_dict(initial)
        torch.manual_seed(1)  # each run is a fresh process that seeds itself
        callback = make_callback()
        trainer = make_trainer(max_epochs=epochs, callbacks=[callback, *extra])
        trainer.fit(model, tiny_loader(batches=batches), ckpt_path=ckpt_path)
        return model, callback

    reference, reference_callback = run([])
    checkpoint = tmp_path / "mid.ckpt"
    run([StopAfterEpoch(stop_after, checkpoint)])
    resumed, resumed_callback = run([], checkpoint)
    return reference, reference_callback, resumed, resumed_callback, checkpoint


def fit_and_save(tmp_path, callbacks, *, epochs: int = 3):
    """Fit a fresh TinyRegressor with ``callbacks`` for ``epochs`` epochs of 4 batches and save
    the Trainer's checkpoint at ``tmp_path / "fit.ckpt"``; returns the model and Trainer."""
    model = TinyRegressor()
    trainer = make_trainer(callbacks=callbacks, max_epochs=epochs)
    trainer.fit(model, tiny_loader(batches=4))
    trainer.save_checkpoint(tmp_path / "fit.ckpt")
    return model, trainer


def tiny_loader(batches: int = 8, batch_size: int = 16, seed: int = 0, scale: float = 1.0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * batch_size, 4, 8, generator=generator) * scale
    y = torch.randn(batches * batch_size, 8, generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


@pytest.fixture
def seeded():
    pl.seed_everything(0, verbose=False)

