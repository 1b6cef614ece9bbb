"""Sentence embeddings from a transformers encoder, on sentences that ship with Python.

The sentences are cut from the standard-library docstrings :func:`stdlib_text` collects,
so nothing is downloaded. :class:`SentenceEmbedder` wraps any ``transformers`` encoder
(``self.model``) and mean-pools its last hidden state over the attention mask, as
sentence-transformers models such as all-MiniLM-L6-v2 do. It has no task of its own:
it is trained by :class:`~lightning_compress.KnowledgeDistillation` from its float self.
"""

from __future__ import annotations

import random
import re

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, default_collate

from lightning_compress.examples.charlm import stdlib_text


def docstring_sentences(count: int, rng: random.Random | None = None) -> list[str]:
    """``count`` distinct docstring sentences of 6 to 30 words, shuffled by ``rng``
    (``random.Random(0)`` when omitted), so any prefix/suffix split is a random split."""
    seen, found = set(), []
    for part in re.split(r"(?<=[.!?])\s+|\n\s*\n", stdlib_text()):
        text = " ".join(part.split())
        words = text.split()
        if 6 <= len(words) <= 30 and len(set(words)) > 3 and text not in seen and not text.startswith((">>>", "...")):
            seen.add(text)
            found.append(text)
        if len(found) == count:
            break
    if len(found) < count:
        raise RuntimeError(f"only {len(found)} sentences found, {count} wanted")
    (rng or random.Random(0)).shuffle(found)
    return found


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Average of ``hidden [B, T, D]`` over the positions where ``attention_mask`` is 1."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class EncodedSentences(Dataset):
    """Tokenized sentences as ``{"input_ids", "attention_mask"}`` dicts: the keyword
    arguments of a transformers encoder, so export's default ``input_fn`` passes them on."""

    def __init__(self, tokenizer, texts: list[str], max_length: int) -> None:
        encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        self.input_ids, self.attention_mask = encoded["input_ids"], encoded["attention_mask"]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index]}


def trim_padding(samples: list[dict]) -> dict:
    """Collate: stack, then drop the padding columns no sentence of the batch reaches
    (mean pooling ignores padding, so the embeddings do not change; the steps get cheaper)."""
    batch = default_collate(samples)
    length = int(batch["attention_mask"].sum(1).max())
    return {key: value[:, :length] for key, value in batch.items()}


def sentence_loader(tokenizer, texts: list[str], *, max_length: int = 64, batch_size: int = 16) -> DataLoader:
    """Batches of ``texts`` in order, each padded to its longest sentence (at most ``max_length`` tokens)."""
    return DataLoader(EncodedSentences(tokenizer, texts, max_length), batch_size=batch_size, collate_fn=trim_padding)


class SentenceEmbedder(pl.LightningModule):
    """Mean-pooled sentence embeddings of the transformers encoder in ``self.model``.

    Its ``training_step`` returns a zero task loss: the whole signal is the distillation
    loss, so train it with ``KnowledgeDistillation(teacher=..., alpha=0.0, loss="cosine")``.

    Args:
        encoder: a ``transformers`` encoder (``BertModel``, ...) whose output has
            ``last_hidden_state``; held as ``self.model``, so ``CompressedExport(module="model")``
            exports it in the compressed-tensors layout transformers loads.
        lr: AdamW learning rate.
    """

    def __init__(self, encoder: nn.Module, lr: float = 1e-4) -> None:
        super().__init__()
        self.model = encoder
        self.lr = lr

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        embeddings = self(batch["input_ids"], batch["attention_mask"])
        return embeddings.new_zeros(())  # no task: KnowledgeDistillation (alpha=0) adds the loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


@torch.no_grad()
def embed(encoder: nn.Module, loader: DataLoader) -> Tensor:
    """Mean-pooled float32 embeddings of every batch of ``loader`` by a transformers
    ``encoder`` (``SentenceEmbedder.model``, or one loaded from an export), in eval mode."""
    was_training = encoder.training
    encoder.eval()
    out = [mean_pool(encoder(**batch).last_hidden_state, batch["attention_mask"]).float() for batch in loader]
    encoder.train(was_training)
    return torch.cat(out)
