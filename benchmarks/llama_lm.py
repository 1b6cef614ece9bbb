"""The 134M-parameter LLaMA the memory benchmarks train: transformers' ``LlamaForCausalLM``
from a config (random weights, nothing downloaded) in a LightningModule, SGD.

Imported by benchmark processes that must import ``lightning_compress`` from elsewhere (a
previous commit's worktree): this module changes nothing on ``sys.path``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

VOCAB = 32000


class CausalLM(pl.LightningModule):
    """Next-token cross-entropy on ``batch[0]`` (token ids); ``shard`` makes
    ``configure_model`` apply FSDP2 to every decoder layer and the root."""

    def __init__(self, shard: bool = False) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=128)
        self.model = LlamaForCausalLM(config)
        self.shard = shard

    def configure_model(self) -> None:
        if not self.shard or self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits

    def training_step(self, batch, batch_idx):
        ids = batch[0]
        logits = self(ids)
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-4)


def token_loader(batches: int, batch_size: int) -> torch.utils.data.DataLoader:
    ids = torch.randint(0, VOCAB, (batches * batch_size, 64), generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=batch_size)


def peak_rss_reset() -> int:
    """The resident memory now; the high-water mark (:func:`peak_rss`) starts again here."""
    now = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")
    return now


def peak_rss() -> int:
    return _status("VmHWM")


def _status(field: str) -> int:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")
