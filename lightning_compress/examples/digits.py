"""scikit-learn's digits (8x8 images, 10 classes): real data that needs no download.

Needs the ``examples`` extra (scikit-learn).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def load_digits_tensors(seed: int = 0, val_fraction: float = 0.25):
    """``(x_train, y_train, x_val, y_val)``: pixels scaled to [0, 1], a seeded split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits example needs scikit-learn: pip install 'lightning-compress[examples]'"
        ) from err
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(y) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


class DigitsDataModule(pl.LightningDataModule):
    """Digits as ``(image [1, 8, 8], label)`` batches; training order is seeded."""

    def __init__(self, batch_size: int = 64, seed: int = 0, shuffle: bool = True) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle

    def setup(self, stage: str | None = None) -> None:
        x_train, y_train, x_val, y_val = load_digits_tensors(self.seed)
        self.train_set = TensorDataset(x_train, y_train)
        self.val_set = TensorDataset(x_val, y_val)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=self.shuffle, generator=generator
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class DigitsClassifier(pl.LightningModule):
    """A small classifier: ``arch="mlp"`` (Linear only) or ``arch="cnn"`` (Conv + Linear)."""

    def __init__(
        self, arch: str = "mlp", hidden: int = 128, lr: float = 1e-2, optimizer: str = "adamw"
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if arch == "mlp":
            self.net = nn.Sequential(
                nn.Flatten(),
                nn.Linear(64, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, 10),
            )
        elif arch == "cnn":
            self.net = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1),
                nn.BatchNorm2d(32),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(32 * 16, hidden),
                nn.ReLU(),
                nn.Linear(hidden, 10),
            )
        else:
            raise ValueError(f"unknown `arch` {arch!r}; choose 'mlp' or 'cnn'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=1e-4)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` in eval mode."""
    was_training = model.training
    model.eval()
    acc = (model(x).argmax(-1) == y).float().mean().item()
    model.train(was_training)
    return acc
