"""Exports of transformers head models load through ``AutoModel`` and their task class.

A ``BertForSequenceClassification`` or ``LlamaForCausalLM`` names its layers under its base
model (``bert.encoder...``, ``model.layers...``); ``AutoModel`` builds the base model alone.
Both loads must compute with the packed weights, not fresh ones: the references are the
fake-quant model we exported (its base model's hidden states, its logits) and its
fake-quantized weights. Tiny models built from configs; nothing is downloaded.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import warnings
import os

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import compressed_tensors  # noqa: E402,F401  (a dev dependency: a missing one fails, never skips)
import transformers  # noqa: E402

from lightning_compress import CompressedExport, ExportError, QuantizationAwareTraining, export, load_packed  # noqa: E402
from lightning_compress.core.transforms import raw_weight  # noqa: E402
from lightning_compress.formats.inspection import verify_packed  # noqa: E402
from lightning_compress.formats.packed import METADATA_FILE  # noqa: E402
from lightning_compress.quant.spec import QuantSpec  # noqa: E402
from lightning_compress.quant.weights import quantized_weights, round_to_nearest  # noqa: E402
from tests.conftest import make_trainer  # noqa: E402

VOCAB = 100


def tiny_bert_classifier() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config).eval()


def tiny_llama(tied: bool) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=32, tie_word_embeddings=tied,
    )
    return transformers.LlamaForCausalLM(config).eval()


# name -> (model, task class, a Linear of the base model left in float, one quantized at int8)
MODELS = {
    "bert": (tiny_bert_classifier, transformers.AutoModelForSequenceClassification, "bert.pooler.dense",
             "bert.encoder.layer.1.output.dense"),
    "llama": (lambda: tiny_llama(tied=False), transformers.AutoModelForCausalLM, "model.layers.1.mlp.down_proj",
              "model.layers.0.self_attn.o_proj"),
    "llama-tied": (lambda: tiny_llama(tied=True), transformers.AutoModelForCausalLM, "model.layers.1.mlp.down_proj",
                   "model.layers.0.self_attn.o_proj"),
}


def token_batch(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # padding, so the mask is used
    return ids, mask


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float((reference.double() - other.double()).norm() / reference.double().norm())


def load_both(directory, task_class, caplog):
    """``AutoModel`` and the task class on ``directory``, with compressed-tensors' "Could not
    match" warnings of each load."""
    loaded, unmatched = [], []
    for auto in (transformers.AutoModel, task_class):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            loaded.append(auto.from_pretrained(directory).eval())
        unmatched.append(sorted(r.getMessage().split("`")[1] for r in caplog.records if "Could not match" in r.getMessage()))
    return loaded, unmatched


@pytest.mark.parametrize("family", list(MODELS))
def test_automodel_and_the_task_class_load_the_fake_quant_model(tmp_path, family, caplog):
    build, task_class, float_layer, int8_layer = MODELS[family]
    model = build()
    prefix = model.base_model_prefix
    round_to_nearest(model, QuantSpec(4, "group", 32), targets=[nn.Linear], exclude=[float_layer, int8_layer])
    round_to_nearest(model, QuantSpec(8, "channel"), targets=[int8_layer])
    quantized = {name: q.dequantize() for name, q in quantized_weights(model).items()}
    head = [name for name in quantized if not name.startswith(prefix + ".")]
    assert head == (["classifier"] if family == "bert" else ["lm_head"])
    ids, mask = token_batch()
    report = export(model, tmp_path / "hf", inputs=[{"input_ids": ids, "attention_mask": mask}])
    assert report.compressed_tensors and report.parity.passed

    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["architectures"] == [type(model).__name__]
    config_digest = hashlib.sha256((tmp_path / "hf" / "config.json").read_bytes()).hexdigest()
    assert json.loads((tmp_path / "hf" / METADATA_FILE).read_text())["files_sha256"]["config.json"] == config_digest
    assert "config.json match their SHA-256" in verify_packed(tmp_path / "hf")  # checked, not listed as unchecked
    assert len(written["quantization_config"]["config_groups"]) == 2  # int4 g32 and int8 channel
    if family == "llama-tied":  # lm_head computes with its own codes, the embedding stays float
        assert written["tie_word_embeddings"] is False

    (base, task), unmatched = load_both(tmp_path / "hf", task_class, caplog)
    assert type(base) is type(model.base_model) and type(task) is type(model)
    assert unmatched == [head, []]  # the base model has no head; every other target matched
    with torch.no_grad():
        ours_hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        ours_logits = model(input_ids=ids, attention_mask=mask).logits
        base_hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state
        task_logits = task(input_ids=ids, attention_mask=mask).logits
    # Measured: 0.0 for all three models (the same weights, the same float operations).
    assert relative_error(ours_hidden, base_hidden) <= 1e-6
    assert relative_error(ours_logits, task_logits) <= 1e-6

    # The weights are the packed codes (compressed-tensors decompressed them on the first
    # forward above), not freshly initialised ones; the float layer is the model's own.
    for name, weight in quantized.items():
        assert torch.equal(task.get_submodule(name).weight, weight), name
        if name not in head:
            assert torch.equal(base.get_submodule(name.removeprefix(prefix + ".")).weight, weight), name
    float_weight = raw_weight(model.get_submodule(float_layer))
    assert torch.equal(task.get_submodule(float_layer).weight, float_weight)
    assert torch.equal(base.get_submodule(float_layer.removeprefix(prefix + ".")).weight, float_weight)


@pytest.mark.parametrize("family, embedding", [("bert", "bert.embeddings.word_embeddings"),
                                               ("llama", "model.embed_tokens")])
def test_an_export_with_a_quantized_embedding_leaves_out_the_config_transformers_cannot_load(tmp_path, family,
                                                                                            embedding):
    """compressed-tensors runs packed Linear layers only: transformers' load of a packed
    Embedding fails (no `weight`), and decompressing it on load gives wrong rows. Such an
    export writes no config.json and says why; load_packed reads it exactly."""
    build, task_class, _, _ = MODELS[family]
    model = build()
    round_to_nearest(model, QuantSpec(4, "group", 32), targets=[nn.Linear])
    round_to_nearest(model, QuantSpec(8, "channel"), targets=[embedding])
    ids, mask = token_batch()
    batch = {"input_ids": ids, "attention_mask": mask}
    report = export(model, tmp_path / "out", inputs=[batch])
    assert not (tmp_path / "out" / "config.json").exists() and not report.compressed_tensors
    assert any(f"compressed-tensors config not written: transformers 5.24 with compressed-tensors 0.20 (tested"
               f" here) cannot load a packed Embedding" in note for note in report.notes), report.notes
    loaded = load_packed(tmp_path / "out", build(), backend="dequantize")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    # What the note is about, so a transformers that loads it shows here: written anyway
    # (for vLLM), the directory does not load, or loads other rows.
    forced = export(model, tmp_path / "forced", inputs=[batch], compressed_tensors=True)
    assert any(f"{embedding!r} is a quantized Embedding" in note for note in forced.notes)
    try:
        task = task_class.from_pretrained(tmp_path / "forced")
    except AttributeError as error:
        assert "'Embedding' object has no attribute 'weight'" in str(error)
    else:
        assert not torch.equal(task.get_submodule(embedding).weight, quantized_weights(model)[embedding].dequantize())


@pytest.mark.parametrize("mixed", [False, True], ids=["one-scheme", "two-schemes"])
def test_targets_and_ignore_match_the_same_layers_in_both_classes(tmp_path, mixed):
    """compressed-tensors' own matcher (what transformers and vLLM call) finds each
    quantized layer in both classes, and ``ignore`` names the Linear layers left in float.
    One scheme for every quantized Linear layer targets the class (``["Linear"]``, as
    llm-compressor writes it); several target each layer by name."""
    from compressed_tensors.utils.match import match_named_modules

    model = tiny_bert_classifier()
    round_to_nearest(model, QuantSpec(4, "group", 32), targets=[nn.Linear], exclude=["pooler.dense", "classifier"])
    round_to_nearest(model, QuantSpec(8, "channel") if mixed else QuantSpec(4, "group", 32), targets=["classifier"])
    export(model, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    groups = config["config_groups"].values()
    assert [group["targets"] == ["Linear"] for group in groups] == ([False, False] if mixed else [True])
    quantized = sorted(quantized_weights(model))
    task = tiny_bert_classifier()
    for group in groups:
        in_task = sorted(name for name, _ in match_named_modules(task, group["targets"], config["ignore"]))
        in_base = sorted(name for name, _ in match_named_modules(task.bert, group["targets"], config["ignore"]))
        expected = ["classifier"] if mixed and group["weights"]["num_bits"] == 8 else [
            name for name in quantized if not (mixed and name == "classifier")]
        assert in_task == expected
        assert in_base == [name.removeprefix("bert.") for name in expected if name != "classifier"]
    assert [name for name, _ in match_named_modules(task, config["ignore"])] == ["bert.pooler.dense"]
    assert [name for name, _ in match_named_modules(task.bert, config["ignore"])] == ["pooler.dense"]


# ---------------------------------------------------------------------- a real Trainer, dict batches
class SequenceClassifier(LightningModule):
    """A transformers head model in ``self.model``, trained on dict batches (with labels)."""

    def __init__(self):
        super().__init__()
        self.model = tiny_bert_classifier().train()

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.model(**batch).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def dict_batches(batches: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(batches * 4):
        ids = torch.randint(1, VOCAB, (12,), generator=generator)
        used = int(torch.randint(6, 13, (), generator=generator))
        samples.append({"input_ids": ids, "attention_mask": (torch.arange(12) < used).long(), "labels": ids[0] % 3})
    return torch.utils.data.DataLoader(samples, batch_size=4)


def test_trained_head_model_exports_from_dict_batches_and_loads_in_transformers(tmp_path, seeded, caplog):
    """QAT under a real Trainer on ``{"input_ids", "attention_mask", "labels"}`` batches; the
    default input_fn feeds the parity check and the ONNX trace without a hand-written one."""
    import onnxruntime  # noqa: F401  (a dev dependency: a missing one fails, never skips)

    module = SequenceClassifier()
    export_cb = CompressedExport(tmp_path / "hf", module="model", formats=["safetensors", "onnx"])
    qat = QuantizationAwareTraining("int4", group_size=32, start_step=1)
    make_trainer(max_steps=4, callbacks=[qat, export_cb]).fit(module, dict_batches(4, seed=0), dict_batches(1, seed=1))
    report = export_cb.report
    assert report.compressed_tensors and report.parity.passed
    assert report.parity.relative_error is not None and report.parity.relative_error <= 1e-5  # outputs compared
    meta = json.loads((tmp_path / "hf" / METADATA_FILE).read_text())
    assert meta["onnx"]["relative_error"] <= 1e-5

    (base, task), unmatched = load_both(tmp_path / "hf", transformers.AutoModelForSequenceClassification, caplog)
    assert unmatched == [[], []]  # one scheme: the group targets the class, which both models hold
    held_out = next(iter(dict_batches(1, seed=2)))
    inputs = {key: held_out[key] for key in ("input_ids", "attention_mask")}
    model = module.model.eval()
    with torch.no_grad():
        assert relative_error(model.bert(**inputs).last_hidden_state, base(**inputs).last_hidden_state) <= 1e-6
        assert relative_error(model(**inputs).logits, task(**inputs).logits) <= 1e-6
        assert F.cross_entropy(task(**inputs).logits, held_out["labels"]).isfinite()
    for name, q in quantized_weights(model).items():
        assert torch.equal(task.get_submodule(name).weight, q.dequantize()), name


def test_a_bfloat16_bert_the_onnx_exporter_cannot_trace_says_what_to_do(tmp_path):
    """PyTorch's TorchScript exporter fails inside torch on a bfloat16 BERT ("ScalarType
    ComplexDouble ..."); the error says it is the dtype and names the two ways out, and the
    float32 copy of the same quantized model exports."""
    model = tiny_bert_classifier()
    round_to_nearest(model, QuantSpec(8, "channel"), targets=[nn.Linear])
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ExportError) as error:
        export(copy.deepcopy(model).bfloat16(), tmp_path / "bf16", inputs=[(ids,)], formats=["safetensors", "onnx"])
    assert "computes in bfloat16, which PyTorch's ONNX exporter fails to trace" in str(error.value)
    assert "leave 'onnx' out of `formats`, or export a float32 copy" in str(error.value)
    export(model, tmp_path / "f32", inputs=[(ids,)], formats=["safetensors", "onnx"])
    assert (tmp_path / "f32" / "model.onnx").is_file()


def test_loading_a_bfloat16_export_into_a_float32_model_warns_and_the_export_dtype_matches(tmp_path):
    """A bfloat16 run's export loaded into a float32 model computes in float32 (about 1e-3
    off what training computed), silently before; in bfloat16 it computes as trained."""
    model = tiny_bert_classifier().bfloat16()
    round_to_nearest(model, QuantSpec(8, "channel"), targets=[nn.Linear])
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    export(model, tmp_path / "bf16", inputs=[(ids,)])
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    with pytest.warns(UserWarning, match=r"the export's float tensors are bfloat16 \(e.g. '.*'\), this model's"
                                         r" float32: .*model.to\(torch.bfloat16\)"):
        as_float32 = load_packed(tmp_path / "bf16", tiny_bert_classifier(), backend="dequantize")
    with pytest.warns(UserWarning, match=r"the export's float tensors are bfloat16 .* this model's float32"):
        load_packed(tmp_path / "bf16", tiny_bert_classifier, backend="dequantize")  # built on meta: the same
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model in the export's dtype, built either way: no warning
        as_trained = load_packed(tmp_path / "bf16", tiny_bert_classifier().bfloat16(), backend="dequantize")
        on_meta = load_packed(tmp_path / "bf16", lambda: tiny_bert_classifier().bfloat16(), backend="dequantize")
    with torch.no_grad():
        assert torch.equal(as_trained(input_ids=ids).logits, trained)
        assert torch.equal(on_meta(input_ids=ids).logits, trained)
        assert not torch.equal(as_float32(input_ids=ids).logits.bfloat16(), trained)
