"""Lightning's demo ``Transformer`` (``lightning.pytorch.demos``) as a language model."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.demos import Transformer


class DemoTransformerLM(pl.LightningModule):
    """``nn.Transformer`` with encoder self-attention and decoder self- and cross-attention,
    an ``nn.Embedding`` input and a Linear decoder, trained on ``(inputs, target)`` token
    batches with the NLL loss. ``transformer_kwargs`` go to ``Transformer`` (``vocab_size``,
    ``ninp``, ``nhead``, ``nhid``, ``nlayers``, ``dropout``)."""

    def __init__(self, lr: float = 3e-3, **transformer_kwargs: Any) -> None:
        super().__init__()
        self.model = Transformer(**transformer_kwargs)
        self.lr = lr

    def forward(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.model(inputs, target)

    def _apply(self, fn, recurse: bool = True):
        # The demo's positional table is a plain attribute made on the first forward's
        # device, which `.to()` does not move: made again on the next forward's.
        self.model.pos_encoder.pe = None
        return super()._apply(fn, recurse)

    def training_step(self, batch, batch_idx):
        inputs, target = batch
        return F.nll_loss(self(inputs, target), target.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)
