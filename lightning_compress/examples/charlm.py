"""A character-level language model on text that ships with Python (stdlib docstrings).

Real text, no download: the docstrings of a fixed list of standard-library modules and
their public members. The model is a small causal transformer built from ``nn.Linear``
and ``nn.Embedding`` layers only, so every compression method can target all of it.
"""

from __future__ import annotations

import importlib
import inspect
import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

STDLIB_MODULES = (
    "argparse", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email.message", "enum", "fractions", "functools", "heapq", "http.client",
    "inspect", "io", "itertools", "json", "logging", "os", "pathlib", "pickle", "random",
    "re", "shutil", "socket", "statistics", "string", "subprocess", "tarfile", "textwrap",
    "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile",
)  # fmt: skip


def stdlib_text(max_chars: int = 400_000) -> str:
    """Docstrings of :data:`STDLIB_MODULES` and their public members, deduplicated."""
    seen, parts = set(), []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        for obj in [module] + [getattr(module, a) for a in sorted(dir(module)) if not a.startswith("_")]:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or callable(obj)) else None
            if doc and len(doc) > 40 and doc not in seen:
                seen.add(doc)
                parts.append(doc)
    return "\n\n".join(parts)[:max_chars]


class CharVocabulary:
    """Printable ASCII plus newline; everything else maps to one unknown id."""

    def __init__(self) -> None:
        self.chars = ["\n"] + [chr(c) for c in range(32, 127)]
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.unknown = len(self.chars)

    def __len__(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index.get(c, self.unknown) for c in text], dtype=torch.long)


class CharDataModule(pl.LightningDataModule):
    """Windows of ``context + 1`` characters; the last 10% of the text is held out."""

    def __init__(self, context: int = 64, batch_size: int = 32, seed: int = 0, max_chars: int = 400_000) -> None:
        super().__init__()
        self.context, self.batch_size, self.seed, self.max_chars = context, batch_size, seed, max_chars
        self.vocabulary = CharVocabulary()

    def setup(self, stage: str | None = None) -> None:
        ids = self.vocabulary.encode(stdlib_text(self.max_chars))
        split = int(len(ids) * 0.9)
        self.train_set = self._windows(ids[:split], stride=self.context // 2)
        self.val_set = self._windows(ids[split:], stride=self.context)

    def _windows(self, ids: torch.Tensor, stride: int) -> TensorDataset:
        windows = ids.unfold(0, self.context + 1, stride)
        return TensorDataset(windows[:, :-1].contiguous(), windows[:, 1:].contiguous())

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.up = nn.Linear(d_model, 4 * d_model)
        self.down = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class CharTransformer(pl.LightningModule):
    """A small causal transformer; logs ``val/loss`` (nats per character).

    ``decay_steps``: the learning rate decays linearly to 10% over that many optimizer
    steps (``None`` keeps it constant).
    """

    def __init__(
        self,
        vocab_size: int = 96,
        d_model: int = 128,
        layers: int = 2,
        heads: int = 4,
        context: int = 64,
        lr: float = 3e-3,
        decay_steps: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.embed(ids) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def _loss(self, batch) -> torch.Tensor:
        ids, targets = batch
        logits = self(ids)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)
        if self.hparams.decay_steps is None:
            return optimizer
        steps = self.hparams.decay_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - 0.9 * min(step, steps) / steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@torch.no_grad()
def perplexity(model: CharTransformer, loader: DataLoader) -> float:
    """exp(mean cross-entropy per character) over ``loader``, in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for ids, targets in loader:
        logits = model(ids)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    model.train(was_training)
    return math.exp(total / count)
