"""transformers decoders export to ONNX and run in onnxruntime.

A LLaMA called without an attention mask and without a cache looks for packed sequences
with ``(torch.diff(position_ids, prepend=...) != 1).cumsum(-1)``. PyTorch's TorchScript
exporter has no conversion for ``aten::diff`` and writes a ``CumSum`` of bools that
onnxruntime refuses to load; the export supplies the first and mends the second. The
references: ``torch.diff`` and ``torch.cumsum`` themselves, and the trained model's logits.
"""

from __future__ import annotations

import json
import os
import re
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import onnx  # noqa: E402
import onnxruntime  # noqa: E402,F401  (a dev dependency: a missing one fails, never skips)
import transformers  # noqa: E402
from lightning.pytorch import LightningModule  # noqa: E402

from lightning_compress import CompressedExport, QuantizationAwareTraining  # noqa: E402
from lightning_compress.formats.onnx import export_onnx, run_onnx  # noqa: E402
from lightning_compress.formats.packed import METADATA_FILE  # noqa: E402
from tests.conftest import make_trainer  # noqa: E402

VOCAB = 96


class Diff(nn.Module):
    def __init__(self, n: int, dim: int, prepend: bool, append: bool) -> None:
        super().__init__()
        self.n, self.dim, self.prepend, self.append = n, dim, prepend, append

    def forward(self, x):
        edge = x.narrow(self.dim, 0, 1)
        return torch.diff(x, n=self.n, dim=self.dim, prepend=edge - 1.5 if self.prepend else None,
                          append=edge * 3 if self.append else None)


def onnx_ops(path) -> list[str]:
    return [node.op_type for node in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("n, dim, prepend, append", [
    (1, -1, False, False), (1, 1, True, False), (2, -1, True, True), (1, 2, False, True), (3, 1, True, True),
])
def test_diff_conversion_matches_torch_diff(tmp_path, n, dim, prepend, append):
    module = Diff(n, dim, prepend, append)
    example = torch.randn(2, 6, 5)
    export_onnx(module, (example,), tmp_path / "diff.onnx", {})
    other_batch = torch.randn(3, 6, 5)  # the batch dimension is dynamic
    (out,) = run_onnx(tmp_path / "diff.onnx", (other_batch,))
    expected = torch.diff(other_batch, n=n, dim=dim, prepend=other_batch.narrow(dim, 0, 1) - 1.5 if prepend else None,
                          append=other_batch.narrow(dim, 0, 1) * 3 if append else None)
    assert out.shape == tuple(expected.shape)
    np.testing.assert_allclose(out, expected.numpy(), rtol=0, atol=1e-6)


class PackedSequenceIds(nn.Module):
    """transformers' packed-sequence ids: a new sequence wherever positions do not step by 1."""

    def forward(self, positions):
        return (torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1) != 1).cumsum(-1)


def test_a_cumsum_of_bools_loads_in_onnxruntime_and_sums_as_int64(tmp_path):
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    export_onnx(PackedSequenceIds(), (positions,), tmp_path / "packed.onnx", {})
    assert "Cast" in onnx_ops(tmp_path / "packed.onnx")
    other = torch.tensor([[0, 1, 0, 1, 0, 1], [5, 6, 7, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    (out,) = run_onnx(tmp_path / "packed.onnx", (other,))
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, [[0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(out, PackedSequenceIds()(other).numpy())


class FloatCumsum(nn.Module):
    def forward(self, x):
        return x.cumsum(-1)


def test_a_float_cumsum_is_left_as_the_exporter_writes_it(tmp_path):
    x = torch.randn(2, 7)
    export_onnx(FloatCumsum(), (x,), tmp_path / "cumsum.onnx", {})
    assert "Cast" not in onnx_ops(tmp_path / "cumsum.onnx")
    (out,) = run_onnx(tmp_path / "cumsum.onnx", (x,))
    np.testing.assert_allclose(out, x.cumsum(-1).numpy(), rtol=1e-6, atol=1e-6)


def plain_torchscript_export(module, example, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False)


def test_the_diff_conversion_lasts_only_as_long_as_the_export(tmp_path):
    """The caller's exporter is left as found: a plain export afterwards still refuses diff."""
    module = Diff(1, -1, False, False)
    export_onnx(module, (torch.randn(2, 4),), tmp_path / "ours.onnx", {})
    with pytest.raises(torch.onnx.OnnxExporterError, match="aten::diff"):
        plain_torchscript_export(module, torch.randn(2, 4), tmp_path / "plain.onnx")


def test_a_diff_conversion_the_user_registered_is_used_and_kept(tmp_path):
    calls = []

    def users_diff(g, x, n, dim, prepend, append):  # a first difference that also records its call
        calls.append(True)
        one, big, start, before_last = (g.op("Constant", value_t=torch.tensor([v])) for v in (1, 2**62, 0, -1))
        axis = g.op("Constant", value_t=torch.tensor([-1]))
        return g.op("Sub", g.op("Slice", x, one, big, axis), g.op("Slice", x, start, before_last, axis))

    torch.onnx.register_custom_op_symbolic("aten::diff", users_diff, 9)
    try:
        x = torch.randn(2, 5)
        export_onnx(Diff(1, -1, False, False), (x,), tmp_path / "ours.onnx", {})
        assert calls  # the user's conversion, not ours
        (out,) = run_onnx(tmp_path / "ours.onnx", (x,))
        np.testing.assert_allclose(out, torch.diff(x).numpy(), atol=1e-6)
        calls.clear()
        plain_torchscript_export(Diff(1, -1, False, False), x, tmp_path / "plain.onnx")
        assert calls  # still registered after our export
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::diff", 9)


# --------------------------------------------------------------- a LLaMA trained with QAT
class CausalLM(LightningModule):
    """A tiny transformers LLaMA (grouped-query attention) trained on unpadded token batches:
    no attention mask, so transformers looks for packed sequences in the position ids."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=32, use_cache=False,
        )
        self.model = transformers.LlamaForCausalLM(config)

    def forward(self, ids):
        return self.model(input_ids=ids).logits

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        logits = self(ids)
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def token_batches(batches: int, seed: int):
    ids = torch.randint(0, VOCAB, (batches * 4, 12), generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4)


def test_a_llama_trained_with_int4_qat_exports_to_onnx_and_onnxruntime_matches(tmp_path, seeded):
    module = CausalLM()
    export_cb = CompressedExport(tmp_path / "llama", formats=["safetensors", "onnx"])
    qat = QuantizationAwareTraining("int4", group_size=32, start_step=1)
    make_trainer(max_steps=3, callbacks=[qat, export_cb]).fit(module, token_batches(3, seed=0))
    assert export_cb.report.parity.passed
    path = tmp_path / "llama" / "model.onnx"
    linears = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    assert onnx_ops(path).count("MatMulNBits") == len(linears) == 15  # 7 per layer and the head

    held_out = next(iter(token_batches(2, seed=5)))[0][:3]  # another batch size than training's 4
    (logits,) = run_onnx(path, (held_out,))
    with torch.no_grad():
        expected = module.eval()(held_out)
    relative = np.linalg.norm(logits - expected.numpy()) / np.linalg.norm(expected.numpy())
    assert relative <= 1e-5


# ------------------------------------------- a transformers model exported itself (module="model")
def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=32, use_cache=False,
    )
    return transformers.LlamaForCausalLM(config)


def padded_batch(batch: int, seed: int):
    ids = torch.randint(0, VOCAB, (batch, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding, so the mask matters
    return ids, mask


def test_a_causal_lm_exported_itself_takes_only_the_inputs_given(tmp_path):
    """The exporter turned forward's defaults into graph inputs: transformers'
    ``logits_to_keep=0`` became an input, which the export's own onnxruntime check refused
    (and whose tensor 0 kept one position's logits instead of all)."""
    model = tiny_llama().eval()
    export_onnx(model, padded_batch(2, seed=0), tmp_path / "llama.onnx", {})
    assert [i.name for i in onnx.load(str(tmp_path / "llama.onnx")).graph.input] == ["input_0", "input_1"]
    ids, mask = padded_batch(3, seed=1)
    logits = run_onnx(tmp_path / "llama.onnx", (ids, mask))[0]
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    assert logits.shape == (3, 12, VOCAB)
    np.testing.assert_allclose(logits, expected.numpy(), rtol=0, atol=1e-4)


class HoldsTransformersModel(LightningModule):
    """The usual pattern: a transformers model in ``self.model`` trained on dict batches."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.train()

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def dict_batches(batches: int, seed: int):
    samples = []
    for index in range(batches * 4):
        ids, mask = padded_batch(1, seed=seed * 100 + index)
        samples.append({"input_ids": ids[0], "attention_mask": mask[0], "labels": ids[0]})
    return torch.utils.data.DataLoader(samples, batch_size=4)


def test_a_llama_in_self_model_trained_on_dict_batches_exports_to_onnx(tmp_path, seeded):
    module = HoldsTransformersModel(tiny_llama())
    export_cb = CompressedExport(tmp_path / "out", module="model", formats=["safetensors", "onnx"])
    qat = QuantizationAwareTraining("int4", group_size=32, start_step=1)
    make_trainer(max_steps=3, callbacks=[qat, export_cb]).fit(module, dict_batches(3, seed=0))
    assert export_cb.report.parity.passed
    ids, mask = padded_batch(3, seed=7)
    logits = run_onnx(tmp_path / "out" / "model.onnx", (ids, mask))[0]
    with torch.no_grad():
        expected = module.model.eval()(input_ids=ids, attention_mask=mask).logits.numpy()
    assert np.linalg.norm(logits - expected) / np.linalg.norm(expected) <= 1e-5


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=32, use_cache=False)
    return transformers.GPT2LMHeadModel(config)


def test_gpt2_on_dict_batches_exports_its_attention_mask(tmp_path, seeded):
    """GPT-2's forward takes ``past_key_values`` between ``input_ids`` and
    ``attention_mask``: the default input_fn passes ``(input_ids, None, attention_mask)``,
    so the graph takes the mask. (It asked for an input_fn, whose suggested form dropped
    the mask: a graph 0.25 off on padded batches, the export's check passing.)"""
    module = HoldsTransformersModel(tiny_gpt2())
    export_cb = CompressedExport(tmp_path / "out", module="model", formats=["safetensors", "onnx"])
    make_trainer(max_steps=2, callbacks=[QuantizationAwareTraining("int8"), export_cb]).fit(module, dict_batches(2, 0))
    assert [i.name for i in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.input] == ["input_0", "input_1"]
    ids, mask = padded_batch(3, seed=7)
    logits = run_onnx(tmp_path / "out" / "model.onnx", (ids, mask))[0]
    with torch.no_grad():
        expected = module.model.eval()(input_ids=ids, attention_mask=mask).logits.numpy()
        unmasked = module.model(input_ids=ids).logits.numpy()
    assert np.linalg.norm(logits - expected) / np.linalg.norm(expected) <= 1e-5
    assert np.linalg.norm(unmasked - expected) / np.linalg.norm(expected) > 1e-2  # the mask matters here


def test_keyword_inputs_for_onnx_say_to_pass_a_tuple_in_forward_order(tmp_path):
    from lightning_compress import export

    ids, mask = padded_batch(2, seed=0)
    with pytest.raises(ValueError, match=r"formats=\['safetensors', 'onnx'\] includes 'onnx'.* keyword arguments"
                                         r" \(input_ids, attention_mask\)\. Pass a tuple in forward's parameter order"
                                         r".*None where they default to None"):
        export(tiny_gpt2().eval(), tmp_path / "out", inputs=[{"input_ids": ids, "attention_mask": mask}],
               formats=["safetensors", "onnx"])
    assert not (tmp_path / "out").exists()


def test_keyword_only_forward_for_onnx_says_to_export_a_submodule(tmp_path):
    """forward(**batch) takes no positional input: the tuple the message above suggests
    would be refused next, so the message names `module=` instead."""
    from lightning_compress import CompressedExport, QuantizationAwareTraining

    class KeywordsOnly(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(16, 4))

        def forward(self, **batch):
            return self.body(batch["features"])

        def training_step(self, batch, batch_idx):
            return self(features=batch["features"]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    features = torch.randn(16, 16)
    batches = torch.utils.data.DataLoader([{"features": row} for row in features], batch_size=8)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[
                             QuantizationAwareTraining("int8"), CompressedExport(tmp_path / "out", formats=["safetensors", "onnx"])])
    with pytest.raises(ValueError, match=r"but KeywordsOnly\.forward takes keyword arguments only: export a submodule"
                                         r" whose forward takes them positionally \(CompressedExport\(module=\.\.\.\)"):
        trainer.fit(KeywordsOnly(), batches)
    assert trainer.global_step == 0
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[
                             QuantizationAwareTraining("int8"),
                             CompressedExport(tmp_path / "out", formats=["safetensors", "onnx"], module="body",
                                              input_fn=lambda batch: batch["features"])])
    trainer.fit(KeywordsOnly(), batches)  # the fix the message names works
    assert (tmp_path / "out" / "model.onnx").is_file()
    from lightning_compress import export

    with pytest.raises(ValueError, match=r"KeywordsOnly\.forward takes keyword arguments only"):  # tuple inputs too
        export(KeywordsOnly(), tmp_path / "tuple", inputs=[(features[:2],)], formats=["safetensors", "onnx"])


def test_onnx_without_inputs_says_to_pass_them(tmp_path):
    from lightning_compress import export

    model = FloatCumsum()
    with pytest.raises(ValueError, match=r"formats=\['safetensors', 'onnx'\] includes 'onnx'.*pass `inputs`"):
        export(model, tmp_path / "out", inputs=[], formats=["safetensors", "onnx"])


def test_gpt2_given_its_mask_second_says_where_the_mask_went(tmp_path):
    """``(input_ids, attention_mask)`` binds the mask to GPT-2's second parameter, its
    cache: the model raises, with a note saying so, and the packed files are not blamed."""
    from lightning_compress import export

    with pytest.raises(AttributeError) as caught:
        export(tiny_gpt2().eval(), tmp_path / "out", inputs=[padded_batch(2, seed=0)], formats=["safetensors", "onnx"])
    assert re.match(r"GPT2LMHeadModel.forward raised this on the export's inputs\[0\] as input_ids=tensor\[2, 12\],"
                    r" \w+=tensor\[2, 12\]\.", caught.value.__notes__[0])
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------ any sequence length (onnx_dynamic_sequence)
def test_a_llama_exported_for_any_sequence_length_matches_at_other_lengths(tmp_path, seeded):
    module = HoldsTransformersModel(tiny_llama())
    export_cb = CompressedExport(tmp_path / "out", module="model", formats=["safetensors", "onnx"],
                                 onnx_dynamic_sequence=True)
    make_trainer(max_steps=3, callbacks=[QuantizationAwareTraining("int4", group_size=32, start_step=1),
                                         export_cb]).fit(module, dict_batches(3, seed=0))
    path = tmp_path / "out" / "model.onnx"
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in onnx.load(str(path)).graph.input]
    assert dims == [["batch", "input_0_length"], ["batch", "input_1_length"]]
    meta = json.loads((tmp_path / "out" / METADATA_FILE).read_text())
    assert meta["onnx"]["dynamic_sequence"]["checked_lengths"] == [9, 15]  # the example's 12, a quarter less and more
    model = module.model.eval()
    for length in (5, 12, 20):
        ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(length))
        mask = torch.ones_like(ids)
        mask[1, :2] = 0
        logits = run_onnx(path, (ids, mask))[0]
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask).logits.numpy()
        assert logits.shape == (2, length, VOCAB)
        assert np.linalg.norm(logits - expected) / np.linalg.norm(expected) <= 1e-5, length


class HoldsItsLength(nn.Module):
    """Averages over a length read as a Python number: the trace keeps the example's."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.fc = nn.Linear(32, 4)

    def forward(self, ids):
        return self.fc(self.embed(ids).sum(1) / float(ids.shape[1]))


def quantized_example(model):
    from lightning_compress.quant.weights import round_to_nearest
    from lightning_compress.quant.spec import QuantSpec

    round_to_nearest(model, QuantSpec(8, "channel"), targets=[nn.Linear])
    return model.eval()


def export_for_any_length(model, tmp_path, *inputs):
    from lightning_compress import export

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's own warnings about Python numbers
        return export(model, tmp_path / "out", inputs=[inputs], formats=["safetensors", "onnx"],
                      onnx_dynamic_sequence=True)


class LongBranch(HoldsItsLength):
    """A branch on the length, traced at 12 where it is not taken: wrong only when longer."""

    def forward(self, ids):
        h = self.embed(ids)
        if h.shape[1] > 12:
            h = h * 0.5
        return self.fc(h.mean(1))


class SelfAttention(nn.Module):
    """PyTorch's nn.MultiheadAttention: its trace keeps the length in a Reshape."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.attention = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc = nn.Linear(32, 4)

    def forward(self, ids):
        h = self.embed(ids)
        return self.fc(self.attention(h, h, h, need_weights=False)[0])


@pytest.mark.parametrize("model, message", [
    (HoldsItsLength(), r"model.onnx at sequence length 9, shorter than the example's, fails its check \(ParityError: "),
    (LongBranch(), r"model.onnx at sequence length 15, longer than the example's, fails its check \(ParityError: "),
    (SelfAttention(), r"model.onnx at sequence length 9, shorter than the example's, fails its check \(\w+: "),
])
def test_a_trace_that_keeps_the_length_is_refused_for_any_length(tmp_path, model, message):
    """A file that holds at the example's length only fails at a shorter or a longer one,
    naming the option, and nothing is kept as a failed export (the packed files are fine);
    without the option the same model exports."""
    from lightning_compress import ArgumentError, export

    model = quantized_example(model)
    ids = torch.randint(0, VOCAB, (2, 12))
    with pytest.raises(ArgumentError, match=message + r".*kept the example's length as a constant") as caught:
        export_for_any_length(model, tmp_path, ids)
    assert caught.value.argument == "onnx_dynamic_sequence"
    assert list(tmp_path.iterdir()) == []
    export(model, tmp_path / "static", inputs=[(ids,)], formats=["safetensors", "onnx"])


class MaskedAttention(nn.Module):
    """Attention masked with -inf: a row of only padding is NaN, in PyTorch and onnxruntime."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.fc = nn.Linear(32, 32)

    def forward(self, ids, mask):
        h = self.fc(self.embed(ids))
        scores = (h @ h.transpose(1, 2) / 8).masked_fill(mask[:, None, :] == 0, float("-inf"))
        return scores.softmax(-1) @ h


def test_rows_of_only_padding_are_compared_by_their_nans(tmp_path):
    """Cut to 3, the example's first row is all padding: NaN in both. Equal NaNs pass and
    the rest is compared (a NaN error passed a `>` test, whatever the rest held)."""
    model = quantized_example(MaskedAttention())
    ids = torch.randint(0, VOCAB, (2, 4))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    report = export_for_any_length(model, tmp_path, ids, mask)
    meta = json.loads((tmp_path / "out" / METADATA_FILE).read_text())
    assert meta["onnx"]["dynamic_sequence"]["checked_lengths"] == [3, 5]
    assert meta["onnx"]["dynamic_sequence"]["relative_error"] <= 1e-5
    assert "any sequence length (checked at [3, 5] too)" in report.table() + "\n".join(report.notes)


class CrossAttention(nn.Module):
    """An encoder-decoder's two inputs of different lengths."""

    def __init__(self):
        super().__init__()
        self.source, self.target = nn.Embedding(VOCAB, 32), nn.Embedding(VOCAB, 32)
        self.fc = nn.Linear(32, VOCAB)

    def forward(self, source_ids, target_ids):
        memory, queries = self.source(source_ids), self.target(target_ids)
        attended = (queries @ memory.transpose(1, 2) / 8).softmax(-1) @ memory
        return self.fc(attended), self.fc(attended).argmax(-1)  # an integer output beside the logits


def test_inputs_of_different_lengths_each_get_their_own(tmp_path):
    """Each input's dimension 1 has its own name (one name for all made onnxruntime assume
    equal lengths and fail on the example itself); the integer output is left out of the
    comparison, as from the model's (it made outputs of unequal sizes fail a correct file)."""
    model = quantized_example(CrossAttention())
    export_for_any_length(model, tmp_path, torch.randint(0, VOCAB, (2, 12)), torch.randint(0, VOCAB, (2, 8)))
    source, target = torch.randint(0, VOCAB, (3, 17)), torch.randint(0, VOCAB, (3, 5))
    logits, chosen = run_onnx(tmp_path / "out" / "model.onnx", (source, target))
    with torch.no_grad():
        expected_logits, expected_chosen = model(source, target)
    np.testing.assert_allclose(logits, expected_logits.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(chosen, expected_chosen.numpy())


class FixedFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("shape, message", [
    ((2, 16), r"cannot run on the example shortened to length 12 along dimension 1 \(RuntimeError: "),
    ((2,), r"needs inputs with a sequence of two or more along dimension 1 \(got lengths \[\] there"),
])
def test_inputs_without_a_sequence_dimension_are_refused_for_any_length(tmp_path, shape, message):
    from lightning_compress import ArgumentError, export

    model = quantized_example(FixedFeatures() if len(shape) == 2 else Scalar())
    with pytest.raises(ArgumentError, match=message) as caught:
        export(model, tmp_path / "out", inputs=[(torch.randn(*shape),)], formats=["safetensors", "onnx"],
               onnx_dynamic_sequence=True)
    assert caught.value.argument == "onnx_dynamic_sequence"
    assert list(tmp_path.iterdir()) == []


class Scalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(1, 4)

    def forward(self, x):
        return self.fc(x[:, None])


@pytest.mark.parametrize("options, message", [
    ({"onnx_dynamic_sequence": "yes", "formats": ["safetensors", "onnx"]}, r"onnx_dynamic_sequence"),
    ({"onnx_dynamic_sequence": True}, r"`onnx_dynamic_sequence=True` makes model.onnx take any sequence length: add"
                                      r" 'onnx' to `formats`"),
])
def test_onnx_dynamic_sequence_is_validated_when_the_callback_is_built(tmp_path, options, message):
    from lightning_compress import ArgumentError

    with pytest.raises(ArgumentError, match=message) as caught:
        CompressedExport(tmp_path / "out", **options)
    assert caught.value.argument == "onnx_dynamic_sequence"


def test_a_recipe_sets_onnx_dynamic_sequence(tmp_path):
    from lightning_compress import from_recipe

    callbacks = from_recipe({"export": {"dirpath": str(tmp_path / "out"), "formats": ["safetensors", "onnx"],
                                        "onnx_dynamic_sequence": True}})
    (export_cb,) = [c for c in callbacks if isinstance(c, CompressedExport)]
    assert export_cb.config.onnx_dynamic_sequence is True
