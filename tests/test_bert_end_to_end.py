"""A transformers BERT end to end, as benchmarks/minilm_compress.py runs all-MiniLM-L6-v2,
on a tiny randomly initialised BertModel (hidden 128, 2 layers) so it runs in seconds.

1. Distillation from the float model + 50% pruning of the feed-forward layers + int4 g128
   QAT in one Trainer (callbacks from a recipe dict), exported in the compressed-tensors
   layout: transformers loads it and gives our fake-quant embeddings; so does load_packed;
   the pruned FFN weights are zero in what transformers loaded, attention stays dense.
2. QLoRA (NF4 base + LoRA) with int4 QAT, merged into an int4 export that round-trips.

How close the compressed embeddings stay to the float model's (QAT vs PTQ) is a benchmark
figure, not asserted here.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from lightning_compress import KnowledgeDistillation, LoRA, QuantizationAwareTraining, from_recipe, load_packed
from lightning_compress.callbacks import CompressedExport
from lightning_compress.core.transforms import raw_weight
from lightning_compress.examples.sentences import SentenceEmbedder, embed
from lightning_compress.quant.weights import quantized_weights
from tests.conftest import make_trainer

import transformers
import compressed_tensors  # noqa: F401  (a dev dependency: a missing one fails, never skips)

VOCAB, HIDDEN, INTERMEDIATE, LAYERS = 100, 128, 256, 2
FFN = [f"encoder.layer.{i}.{part}.dense" for i in range(LAYERS) for part in ("intermediate", "output")]
ATTENTION = [f"encoder.layer.{i}.attention.{part}" for i in range(LAYERS)
             for part in ("self.query", "self.key", "self.value", "output.dense")]
# Every Linear has 128 or 256 inputs, so int4 group 128 fits all of them.
TOLERANCE = 1e-5


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
        intermediate_size=INTERMEDIATE, max_position_embeddings=32,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertModel(config)


def sentences(batches: int, seed: int, batch_size: int = 8, length: int = 16) -> torch.utils.data.DataLoader:
    """Random token ids as ``{"input_ids", "attention_mask"}`` batches, with padding."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(batches * batch_size):
        used = int(torch.randint(4, length + 1, (), generator=generator))
        ids = torch.zeros(length, dtype=torch.long)
        ids[:used] = torch.randint(1, VOCAB, (used,), generator=generator)
        samples.append({"input_ids": ids, "attention_mask": (torch.arange(length) < used).long()})
    return torch.utils.data.DataLoader(samples, batch_size=batch_size)


def load_in_transformers(directory) -> nn.Module:
    """``AutoModel.from_pretrained``, after one forward: compressed-tensors decompresses the
    packed weights into ``weight`` on the first forward pass."""
    loaded = transformers.AutoModel.from_pretrained(directory)
    embed(loaded, sentences(1, seed=2))
    return loaded


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A student distilled from its float self, 50%-pruned FFN, int4 g128, exported."""
    out = tmp_path_factory.mktemp("bert") / "export"
    recipe = {
        "distillation": {"teacher": "self", "loss": "cosine", "alpha": 0.0},
        "pruning": {"final_sparsity": 0.5, "start_step": 0, "end_step": 4, "update_every": 2,
                    "targets": ["intermediate.dense", "output.dense"], "exclude": ["attention.output.dense"]},
        "qat": {"weights": "int4", "group_size": 128, "start_step": 2},
        "export": {"dirpath": str(out), "module": "model", "compressed_tensors": True},
    }
    torch.manual_seed(0)
    float_bert = tiny_bert().eval()
    student = SentenceEmbedder(copy.deepcopy(float_bert).train(), lr=1e-3)
    callbacks = from_recipe(recipe)
    make_trainer(callbacks=callbacks, max_steps=8).fit(student, sentences(4, seed=0))
    report = next(c for c in callbacks if isinstance(c, CompressedExport)).report
    return float_bert, student, out, report


def test_transformers_loads_the_export_and_gives_the_fake_quant_embeddings(distilled):
    _, student, out, report = distilled
    assert report.compressed_tensors and report.parity.passed and report.parity.weights_exact
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    loaded = transformers.AutoModel.from_pretrained(out)
    held_out = sentences(2, seed=1)
    fake_quant = embed(student.model, held_out)
    assert max_difference(embed(loaded, held_out), fake_quant) <= TOLERANCE
    # ... because every weight transformers decompressed is our dequantized code, exactly.
    for name, q in quantized_weights(student.model).items():
        assert torch.equal(loaded.get_submodule(name).weight, q.dequantize()), name


def test_load_packed_gives_the_fake_quant_embeddings(distilled):
    float_bert, student, out, _ = distilled
    packed = load_packed(out, copy.deepcopy(float_bert))
    held_out = sentences(2, seed=1)
    assert max_difference(embed(packed, held_out), embed(student.model, held_out)) <= TOLERANCE


def test_pruned_ffn_weights_are_zero_in_the_transformers_model(distilled):
    _, student, out, _ = distilled
    loaded = load_in_transformers(out)
    for name in FFN:
        pruned = raw_weight(student.model.get_submodule(name)) == 0  # the masks zero the raw weights
        assert int(pruned.sum()) == pruned.numel() // 2, name  # exactly 50% per layer
        weight = loaded.get_submodule(name).weight
        assert torch.all(weight[pruned] == 0), name
        # int4 may round a kept small weight to 0 as well, never the reverse
        assert int((weight == 0).sum()) >= pruned.numel() // 2
    for name in ATTENTION:
        assert float((raw_weight(student.model.get_submodule(name)) == 0).float().mean()) < 0.01, name


def test_qlora_merged_int4_export_round_trips(tmp_path):
    torch.manual_seed(0)
    float_bert = tiny_bert().eval()
    student = SentenceEmbedder(copy.deepcopy(float_bert).train(), lr=1e-3)
    teacher = SentenceEmbedder(copy.deepcopy(float_bert))
    out = tmp_path / "qlora"
    export_cb = CompressedExport(out, module="model", compressed_tensors=True)
    callbacks = [
        # every Linear but the pooler, which mean pooling does not use (its adapter would get no gradient)
        LoRA(r=8, lora_alpha=16, base="nf4", exclude_modules=["pooler.dense"]),
        KnowledgeDistillation(teacher, loss="cosine", alpha=0.0),
        QuantizationAwareTraining("int4", group_size=128, start_step=2),
        export_cb,
    ]
    make_trainer(callbacks=callbacks, max_steps=6).fit(student, sentences(3, seed=0))
    assert export_cb.report.compressed_tensors and export_cb.report.parity.passed
    lora = callbacks[0]
    assert len(lora.adapters) == 6 * LAYERS
    assert all(float(adapter.layer.lora_B.detach().abs().max()) > 0 for adapter in lora.adapters.values())  # trained
    held_out = sentences(2, seed=1)
    fake_quant = embed(student.model, held_out)
    loaded = load_in_transformers(out)
    assert not any("lora" in key for key in loaded.state_dict())
    assert max_difference(embed(loaded, held_out), fake_quant) <= TOLERANCE
    for name, q in quantized_weights(student.model).items():
        assert q.spec.bits == 4 and torch.equal(loaded.get_submodule(name).weight, q.dequantize()), name
    packed = load_packed(out, copy.deepcopy(float_bert))
    assert max_difference(embed(packed, held_out), fake_quant) <= TOLERANCE
