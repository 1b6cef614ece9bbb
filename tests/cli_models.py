"""Small importable LightningModules and a DataModule for recipe and command-line tests.

Importable as ``tests.cli_models.*`` (the ``lightning-compress`` subprocesses run with the
repository root on PYTHONPATH). Input sizes are multiples of 128 so every recipe in
``recipes/`` (int4 group 128, 2:4) applies unchanged.
"""

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

FEATURES, CLASSES = 128, 8


class RecipeMLP(pl.LightningModule):
    """A two-hidden-layer classifier; ``hidden`` sets its size (a teacher is wider)."""

    def __init__(self, hidden: int = 128, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, 128), nn.ReLU(), nn.Linear(128, CLASSES)
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class NeedsWidth(RecipeMLP):
    """A module whose constructor has an argument without a default."""

    def __init__(self, width: int) -> None:
        super().__init__(hidden=width)


class RecipeData(pl.LightningDataModule):
    """A fixed random classification task (labels from a fixed random linear map)."""

    def __init__(self, samples: int = 256, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(samples, FEATURES, generator=generator)
        y = (x @ torch.randn(FEATURES, CLASSES, generator=generator)).argmax(1)
        self.batch_size = batch_size
        split = samples * 3 // 4
        self.train_set = TensorDataset(x[:split], y[:split])
        self.val_set = TensorDataset(x[split:], y[split:])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)


class TrainOnlyData(pl.LightningDataModule):
    """RecipeData's training set alone: no val_dataloader."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = RecipeData()

    def train_dataloader(self):
        return self.inner.train_dataloader()


class ByteData(RecipeData):
    """RecipeData's features as uint8 codes (a stored dataset), made floats again by
    ``ScalesItsBytes.on_after_batch_transfer`` on the device."""

    def __init__(self, samples: int = 256, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__(samples, batch_size, seed)
        for split in (self.train_set, self.val_set):
            x = split.tensors[0]
            split.tensors = ((x.clamp(-4, 4) * 31 + 128).round().to(torch.uint8), split.tensors[1])


class ScalesItsBytes(RecipeMLP):
    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return (x.float() - 128) / 31, y



class StepOnly(pl.LightningModule):
    """A module with no forward: it computes in training_step alone (as Lightning's demo
    LightningLSTM), its network in ``self.net``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(FEATURES, 128), nn.ReLU(), nn.Linear(128, CLASSES))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class FailsInTraining(RecipeMLP):
    """A bug of the user's model in its first training step: a real failure, not bad input."""

    def training_step(self, batch, batch_idx):
        raise ValueError("the model's own bug")


def three_inputs(batch):
    """An `input_fn` that gives RecipeMLP's forward (one input) three."""
    x, _ = batch
    return (x, x, x)


class HeadInConfigureModel(RecipeMLP):
    """Builds its head in ``configure_model``, as large models (and FSDP2 users) do."""

    def __init__(self, hidden: int = 128, lr: float = 1e-2) -> None:
        super().__init__(hidden=hidden, lr=lr)
        self.net = self.net[:-1]  # the head comes in configure_model

    def configure_model(self):
        if not hasattr(self, "head"):
            self.head = nn.Linear(128, CLASSES)

    def forward(self, x):
        return self.head(self.net(x))


class ShardsInConfigureModel(RecipeMLP):
    """Shards in ``configure_model`` without checking for a device mesh (only under
    ``ModelParallelStrategy`` is there one)."""

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])
