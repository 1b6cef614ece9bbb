"""File size of the architectures issue 16 is about: attention and recurrent layers.

Two models nobody here wrote the layers of, trained a few steps on random tokens (the
file size does not depend on what the weights learned) with ``MagnitudePruning(0.5)`` and
``QuantizationAwareTraining("int4")`` in groups of ``g`` (40 for the demo Transformer,
whose width 200 is not a multiple of 32; 32 for the LSTM), float16 scales, both on their
default targets, and exported
by ``CompressedExport``:

- Lightning's demo ``Transformer`` (``lightning.pytorch.demos``, its default sizes but a
  1,000-token vocabulary: ``nn.Transformer`` with encoder self-attention and decoder
  self- and cross-attention, an ``nn.Embedding`` input and a Linear decoder);
- an LSTM language model (embedding, a 2-layer LSTM of width 256, a Linear head).

Each is exported twice in one run: once with the attention (or recurrent) layers left out
of both callbacks (``exclude``), which is what the package did before issue 16 (1.51x on
the demo Transformer, 1.00x from an LSTM's weights), and once with them compressed. The
ratio is float32 state-dict bytes over ``model.safetensors`` bytes. The *compressed share*
ratio counts only the weights the callbacks compress (float32 bytes of those parameters
over their bytes in the file: codes, bitmask, scales); its limit with float16 scales,
50% bitmask-sparse, is 32 / (1 + 0.5·4 + 16/g) bits: 9.4x at g40, 9.1x at g32. Embeddings,
biases and norms stay float32 and bound the whole-file ratio.

    python benchmarks/architecture_size.py [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from common import headline, print_table, quiet_trainer
from lightning_compress import CompressedExport, MagnitudePruning, QuantizationAwareTraining
from lightning_compress.examples.demo_transformer import DemoTransformerLM

VOCAB, LENGTH = 1000, 32
# What the packed format stores for one quantized weight `w` (formats/packed.py).
_WEIGHT_TENSORS = ("", "_packed", "_shape", "_scale", "_zero_point", "_bitmask")


def demo_transformer() -> DemoTransformerLM:
    return DemoTransformerLM(lr=1e-3, vocab_size=VOCAB)  # ninp 200, nhead 2, nhid 200, 2 layers


class LSTMLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 128)
        self.rnn = nn.LSTM(128, 256, num_layers=2, batch_first=True)
        self.head = nn.Linear(256, VOCAB)

    def forward(self, inputs, target=None):
        return self.head(self.rnn(self.embed(inputs))[0])

    def training_step(self, batch, batch_idx):
        inputs, target = batch
        return F.cross_entropy(self(inputs).reshape(-1, VOCAB), target.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def tokens(steps: int):
    data = torch.randint(0, VOCAB, (steps * 8, LENGTH + 1), generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data[:, :-1], data[:, 1:]), batch_size=8)


def share_limit(group: int) -> float:
    """float32 bits over the bits of a 50%-sparse int4 weight: 1 mask bit, 4 bits for the
    kept half, a float16 scale per ``group``."""
    return 32 / (1 + 0.5 * 4 + 16 / group)


def export_size(build, layer_type, group: int, compress_layers: bool, steps: int, directory: Path) -> dict:
    pl.seed_everything(0, verbose=False)
    model = build()
    exclude = None if compress_layers else [layer_type]
    exporter = CompressedExport(directory, input_fn=lambda batch: tuple(batch) if build is demo_transformer
                                else (batch[0],), parity_batches=1)
    callbacks = [MagnitudePruning(0.5, start_step=0, end_step=max(1, steps // 2), exclude=exclude),
                 QuantizationAwareTraining("int4", group_size=group, scale_dtype="float16", start_step=max(1, steps // 2),
                                           exclude=exclude),
                 exporter]
    quiet_trainer(callbacks=callbacks, max_steps=steps).fit(model, tokens(steps))
    assert exporter.report.parity.passed
    file_bytes = (directory / "model.safetensors").stat().st_size
    float_bytes = sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())
    share_float, share_file = _share(model, directory)
    return {"file": file_bytes, "float": float_bytes, "share_float": share_float, "share_file": share_file}


def _share(model: nn.Module, directory: Path) -> tuple:
    """float32 bytes of the compressed weights, and their bytes in the file (every tensor
    stored under a quantized weight's name: codes, bitmask, scales)."""
    metadata = json.loads((directory / "compression.json").read_text())
    parameters = dict(model.named_parameters())
    float_bytes, file_bytes = 0, 0
    with safe_open(directory / "model.safetensors", "pt") as stored:
        names = list(stored.keys())
        for key, entry in metadata["layers"].items():
            param = entry.get("param", "weight")
            weight = key if key.endswith("." + param) else f"{key}.{param}"
            float_bytes += parameters[weight].numel() * 4
            for suffix in _WEIGHT_TENSORS:
                if weight + suffix in names:
                    tensor = stored.get_tensor(weight + suffix)
                    file_bytes += tensor.numel() * tensor.element_size()
    return float_bytes, file_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    cases = [("Lightning demo Transformer", demo_transformer, nn.MultiheadAttention, "attention", 40),
             ("LSTM language model", LSTMLM, nn.LSTM, "LSTM", 32)]
    rows = []
    print("# File size of attention and recurrent models (int4 + 50% sparsity)")
    print()
    with tempfile.TemporaryDirectory() as folder:
        for title, build, layer_type, what, group in cases:
            before = export_size(build, layer_type, group, False, args.steps, Path(folder) / f"{what}-before")
            after = export_size(build, layer_type, group, True, args.steps, Path(folder) / f"{what}-after")
            ratio_before, ratio_after = before["float"] / before["file"], after["float"] / after["file"]
            share = after["share_float"] / after["share_file"]
            rows.append([title, str(group), f"{after['float']:,}", f"{before['file']:,}", f"{ratio_before:.2f}x",
                         f"{after['file']:,}", f"{ratio_after:.2f}x", f"{share:.2f}x"])
            headline("file size", f"{title}, int4 g{group} + 50% sparse, {what} layers compressed (whole file)",
                     f"{ratio_after:.2f}x", f"> {ratio_before:.2f}x with {what} left in float (issue 16)")
            headline("file size", f"{title}, compressed weights only", f"{share:.2f}x",
                     f"approaches {share_limit(group):.1f}x (int4 g{group}, f16 scales, 50% bitmask)")
    print_table(["model", "g", "float32 bytes", f"file, layers left in float", "ratio", "file, all compressed",
                 "ratio", "compressed share"], rows)
    print()
    print("Target: with attention/recurrent layers compressed, the compressed share approaches the"
          " format's limit (32 / (1 + 2 + 16/g)); embeddings, biases and norms stay float32.")


if __name__ == "__main__":
    main()
