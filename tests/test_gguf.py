"""GGUF export for llama.cpp, checked with the real reader (the ``gguf`` package).

Tiny config-built transformers models (nothing downloaded), trained through a Lightning
Trainer with the ready recipes. The references are independent of the writer: the
fake-quant model's own weights and logits, llama.cpp's q/k permutation re-implemented here
from its formula, a rope applied both ways, and gguf's own tensor-name map and
dequantization.
"""

from __future__ import annotations

import hashlib
import json
import os

import gguf
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402

from lightning_compress import CompressedExport, export, load_recipe  # noqa: E402
from lightning_compress.cli import main  # noqa: E402
from lightning_compress.core.validate import ArgumentError  # noqa: E402
from lightning_compress.formats.errors import ExportError  # noqa: E402
from lightning_compress.formats.gguf_blocks import encode  # noqa: E402
from lightning_compress.formats.packed import read_metadata  # noqa: E402
from lightning_compress.quant.fake_quant import QuantizedWeight, dequantize_codes  # noqa: E402
from lightning_compress.quant.spec import QuantSpec  # noqa: E402
from lightning_compress.quant.weights import round_to_nearest  # noqa: E402
from tests.conftest import make_trainer  # noqa: E402

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS = 300, 64, 2, 4, 2
CLASSES = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
           "qwen2": transformers.Qwen2ForCausalLM}


def tiny(arch: str = "llama", **config) -> torch.nn.Module:
    torch.manual_seed(0)
    options = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                   num_key_value_heads=KV_HEADS, intermediate_size=128, max_position_embeddings=64)
    options.update(config)
    config_class = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                    "qwen2": transformers.Qwen2Config}[arch]
    return CLASSES[arch](config_class(**options)).eval()


class TinyCausalLM(pl.LightningModule):
    """A transformers causal LM in ``self.model`` (what the gguf recipes export)."""

    def __init__(self, arch: str = "llama", tied: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = tiny(arch, tie_word_embeddings=tied).train()

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def token_loader(samples: int = 8) -> DataLoader:
    ids = torch.randint(0, VOCAB, (samples, 16), generator=torch.Generator().manual_seed(1))
    return DataLoader([{"input_ids": row} for row in ids], batch_size=4)


def llama_cpp_rows(rows: int, heads: int) -> list:
    """The transformers row of each GGUF row, from llama.cpp's permute
    (``w.reshape(heads, 2, d / 2, ...).swapaxes(1, 2)``), written element by element."""
    d = rows // heads
    return [h * d + (i % 2) * (d // 2) + i // 2 for h in range(heads) for i in range(d)]


def read_back(path) -> tuple[dict, dict]:
    """(metadata, tensors dequantized by gguf, with their GGUF types) of a GGUF file."""
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: (torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))), t.tensor_type.name)
               for t in reader.tensors}
    return fields, tensors


def as_transformers(model, tensors: dict, arch: str) -> dict:
    """The GGUF tensors under the model's own names, in its row order (gguf's name map)."""
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), LAYERS)
    state = {}
    for name in model.state_dict():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        gguf_name = gguf_name if gguf_name in tensors or gguf_name != "output.weight" else "token_embd.weight"
        values = tensors[gguf_name][0]
        heads = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(gguf_name.split(".")[-2])
        if heads is not None and arch == "llama":
            values = torch.empty_like(values).index_copy_(0, torch.tensor(llama_cpp_rows(len(values), heads)), values)
        state[name] = values.reshape(model.state_dict()[name].shape)
    return state


def check_file(module: torch.nn.Module, directory, arch: str = "llama") -> dict:
    """Every tensor of ``directory/model.gguf`` equals the fake-quant model's weight, and a
    model rebuilt from the file computes the fake-quant model's logits. Returns the types."""
    gguf_arch = "qwen2" if arch == "qwen2" else "llama"  # Mistral is llama.cpp's llama
    fields, tensors = read_back(directory / "model.gguf")
    effective = {name: t.detach() for name, t in module.state_dict().items()}
    effective.update({f"{name}.weight": m.weight.detach() for name, m in module.named_modules()
                      if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))})
    state = as_transformers(module, tensors, gguf_arch)
    for name, values in state.items():
        assert torch.equal(values, effective[name].float()), name
    rebuilt = type(module)(module.config).eval()
    rebuilt.load_state_dict(state)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids=ids).logits, module(input_ids=ids).logits)
    assert fields["general.architecture"] == gguf_arch
    expected = {"context_length": 64, "embedding_length": HIDDEN, "block_count": LAYERS, "feed_forward_length": 128,
                "attention.head_count": HEADS, "attention.head_count_kv": KV_HEADS, "rope.freq_base": 10000.0,
                "rope.dimension_count": HIDDEN // HEADS, "vocab_size": VOCAB}
    assert {k: fields[f"{gguf_arch}.{k}"] for k in expected} == expected
    assert fields[f"{gguf_arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(module.config.rms_norm_eps)
    return {name: kind for name, (_, kind) in tensors.items()}


# ---------------------------------------------------------------------- the recipes, trained
RECIPE_RUNS = {
    "q4_0": ("gguf_q4_0", [], "Q4_0"),
    "q8_0": ("gguf_q8_0", [], "Q8_0"),
    "q4_1": ("gguf_q4_0", ["qat.symmetric=false", "qat.overrides.embed_tokens.symmetric=true",
                           "qat.overrides.lm_head.symmetric=true"], ("Q4_1", "Q5_0")),
}


@pytest.mark.parametrize("run", list(RECIPE_RUNS))
def test_a_recipe_trains_the_grid_gguf_holds_and_the_file_dequantizes_to_it_bit_for_bit(tmp_path, run):
    name, overrides, projection_types = RECIPE_RUNS[run]
    recipe = load_recipe(name, [f"export.dirpath={tmp_path / 'out'}", *overrides])
    pl.seed_everything(0)
    module = TinyCausalLM()
    trainer = make_trainer(max_steps=6, callbacks=recipe.callbacks())
    trainer.fit(module, token_loader())
    module.eval()
    kinds = check_file(module.model, tmp_path / "out")
    projections = [k for n, k in kinds.items() if n.startswith("blk.") and "norm" not in n]
    assert len(projections) == LAYERS * 7 and set(projections) <= set(np.atleast_1d(projection_types))
    assert kinds["token_embd.weight"] == kinds["output.weight"] == "Q8_0"
    assert {k for n, k in kinds.items() if "norm" in n} == {"F32"}
    metadata = read_metadata(tmp_path / "out")
    assert metadata["gguf"]["weights_exact"] and metadata["gguf"]["tensors"] == kinds
    gguf_digest = hashlib.sha256((tmp_path / "out" / "model.gguf").read_bytes()).hexdigest()
    assert metadata["files_sha256"]["model.gguf"] == gguf_digest  # what `inspect --verify` checks
    report = (tmp_path / "out" / "report.txt").read_text()
    assert "every tensor read back by the gguf package equals the trained weight exactly" in report
    fallbacks = [n for n, k in kinds.items() if k == "Q5_0"]
    assert report.count("Q5_0 instead of Q4_1") == len(fallbacks)
    fields, _ = read_back(tmp_path / "out" / "model.gguf")
    assert fields["general.file_type"] == {"q4_0": 2, "q8_0": 7}.get(run, fields["general.file_type"])
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.tokens"]) == VOCAB


def test_the_dry_export_refuses_a_grid_gguf_cannot_hold_before_the_first_step(tmp_path):
    recipe = load_recipe("gguf_q4_0", [f"export.dirpath={tmp_path / 'out'}", "qat.group_size=64"])
    module = TinyCausalLM()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = make_trainer(max_steps=4, callbacks=recipe.callbacks())
    with pytest.raises(ExportError, match="g64 scales"):
        trainer.fit(module, token_loader())
    assert trainer.global_step == 0 and not (tmp_path / "out").exists()
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_export_command_writes_gguf_from_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("gguf_q8_0", ["export.dirpath=packed", "export.formats=[safetensors]"])
    module = TinyCausalLM()
    trainer = make_trainer(max_steps=2, callbacks=recipe.callbacks())
    trainer.fit(module, token_loader())
    trainer.save_checkpoint("last.ckpt")
    assert not (tmp_path / "packed" / "model.gguf").exists()
    code = main(["export", "--checkpoint", "last.ckpt", "--model", "tests.test_gguf.TinyCausalLM", "-o", "again",
                 "--format", "gguf"])
    assert code == 0
    module.eval()
    assert set(check_file(module.model, tmp_path / "again").values()) == {"Q8_0", "F32"}


# ---------------------------------------------------------------------- layout and numerics
@pytest.mark.parametrize("kind, bits, symmetric, zero_points", [
    ("Q4_0", 4, True, None), ("Q8_0", 8, True, None), ("Q5_0", 5, True, None),
    ("Q4_1", 4, False, (0, -1, -4, 3)),  # every block's minimum is a float16 (direct and flipped layouts)
    ("Q5_0", 4, False, (1, -2, 5)),  # some minimums are not: the whole layer falls back to Q5_0
])
def test_blocks_dequantize_in_gguf_to_our_codes_exactly(kind, bits, symmetric, zero_points):
    spec = QuantSpec(bits, "group", 32, symmetric, "float16")
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(spec.qmin, spec.qmax + 1, (8, 96), generator=generator, dtype=torch.int8)
    codes[0, :32] = torch.arange(spec.qmin, spec.qmin + 32).clamp(max=spec.qmax).to(torch.int8)  # both ends
    scale = (torch.rand(8, 3, generator=generator) * 0.1 + 1e-3).half().float()
    choices = torch.tensor(zero_points or (0,), dtype=torch.int32)
    zero = choices[torch.randint(0, len(choices), (8, 3), generator=generator)]
    weight = QuantizedWeight(codes, scale, zero, spec, (8, 96))
    rows = torch.tensor(llama_cpp_rows(8, 2))
    blocks, written = encode(weight, "Q4_1" if kind == "Q5_0" and not symmetric else kind, rows)
    assert written == kind
    values = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[kind]))
    assert torch.equal(values, dequantize_codes(codes, scale, zero, spec)[rows])


def test_the_rotary_permutation_makes_llama_cpp_rope_compute_transformers_attention_scores():
    """llama.cpp's llama rope rotates adjacent pairs (x[2i], x[2i+1]); transformers rotates
    halves. With the permuted q/k rows the two give the same attention scores."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny()
    attention = model.model.layers[0].self_attn
    x = torch.randn(1, 7, HIDDEN, generator=torch.Generator().manual_seed(3))
    positions = torch.arange(7)[None]
    cos, sin = model.model.rotary_emb(x, positions)
    d = HIDDEN // HEADS

    def heads(weight, n):
        return (x @ weight.T).view(1, 7, n, d).transpose(1, 2)

    with torch.no_grad():
        q, k = apply_rotary_pos_emb(heads(attention.q_proj.weight, HEADS), heads(attention.k_proj.weight, KV_HEADS),
                                    cos, sin)
        q_gguf = heads(attention.q_proj.weight[llama_cpp_rows(HIDDEN, HEADS)], HEADS)
        k_gguf = heads(attention.k_proj.weight[llama_cpp_rows(KV_HEADS * d, KV_HEADS)], KV_HEADS)

    def pair_rope(t):  # ggml's rope mode 0: theta_i = position * base^(-2i/d) on (x[2i], x[2i+1])
        theta = positions[0, :, None] * 10000.0 ** (-torch.arange(0, d, 2) / d)
        even, odd = t[..., 0::2], t[..., 1::2]
        cos, sin = theta.cos(), theta.sin()
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2)

    groups = HEADS // KV_HEADS
    scores = q @ k.repeat_interleave(groups, 1).transpose(-1, -2)
    gguf_scores = pair_rope(q_gguf) @ pair_rope(k_gguf).repeat_interleave(groups, 1).transpose(-1, -2)
    torch.testing.assert_close(gguf_scores, scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_mistral_and_qwen2_round_to_nearest_exports(tmp_path, arch):
    model = tiny(arch)
    round_to_nearest(model, QuantSpec(4, "group", 32, True, "float16"), exclude=["lm_head"])
    export(model, tmp_path / "out", formats=["safetensors", "gguf"])
    kinds = check_file(model, tmp_path / "out", arch)
    assert kinds["output.weight"] == "F32" and kinds["blk.0.attn_q.weight"] == "Q4_0"
    assert ("blk.1.attn_k.bias" in kinds) == (arch == "qwen2")


def test_a_tied_head_equal_to_the_embedding_is_left_to_token_embd(tmp_path):
    model = tiny(tie_word_embeddings=True)
    round_to_nearest(model, QuantSpec(8, "group", 32, True, "float16"), targets=["embed_tokens", "lm_head"])
    report = export(model, tmp_path / "out", formats=["safetensors", "gguf"])
    kinds = check_file(model, tmp_path / "out")
    assert "output.weight" not in kinds and kinds["token_embd.weight"] == "Q8_0"
    assert "output.weight left out" in report.table()


# ---------------------------------------------------------------------- refusals
def test_every_layer_whose_grid_has_no_gguf_type_is_named(tmp_path):
    model = tiny()
    grids = {"q_proj": QuantSpec(4, "group", 64, True, "float16"), "k_proj": QuantSpec(4, "group", 32),
             "v_proj": QuantSpec(3, "group", 32, True, "float16"),
             "o_proj": QuantSpec(8, "group", 32, False, "float16"),
             "gate_proj": QuantSpec(4, "channel", None, True, "float16")}
    for target, spec in grids.items():
        round_to_nearest(model, spec, targets=[target])
    with pytest.raises(ExportError) as refused:
        export(model, tmp_path / "out", formats=["safetensors", "gguf"])
    message = str(refused.value)
    assert "10 layer(s)" in message and not (tmp_path / "out").exists()
    for target in grids:
        for layer in range(LAYERS):
            assert f"model.layers.{layer}.{'mlp' if target == 'gate_proj' else 'self_attn'}.{target}" in message
    for reason in ("g64 scales", "float32 scales", "int3 symmetric codes", "int8 asymmetric codes", "channel scales"):
        assert reason in message


def test_a_model_llama_cpp_cannot_run_is_refused_clearly(tmp_path):
    with pytest.raises(ExportError, match="writes llama.cpp's llama/qwen2 architectures.*got Sequential"):
        export(torch.nn.Sequential(torch.nn.Linear(4, 4)), tmp_path / "a", formats=["safetensors", "gguf"])
    with pytest.raises(ExportError, match=r"module='model'"):
        export(TinyCausalLM(), tmp_path / "b", formats=["safetensors", "gguf"])
    with pytest.raises(ExportError, match="hidden_act='gelu'.*rope type 'linear'"):
        export(tiny(hidden_act="gelu", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
               tmp_path / "c", formats=["safetensors", "gguf"])
    assert not any(tmp_path.iterdir())


def test_tokenizer_and_formats_are_checked_when_built():
    with pytest.raises(ArgumentError, match="add 'gguf' to `formats`"):
        CompressedExport("out", tokenizer=["a"])
    with pytest.raises(ArgumentError, match="`tokenizer` must be None"):
        CompressedExport("out", formats=["safetensors", "gguf"], tokenizer=42)
    with pytest.raises(ArgumentError, match="not a directory holding a tokenizer.json"):
        CompressedExport("out", formats=["safetensors", "gguf"], tokenizer="no/such/dir")
    with pytest.raises(ArgumentError, match=r"list from \['safetensors', 'onnx', 'gguf'\]"):
        CompressedExport("out", formats=["safetensors", "ggml"])


# ---------------------------------------------------------------------- vocabularies
def export_vocabulary(tmp_path, tokenizer, vocab=VOCAB) -> dict:
    model = tiny(vocab_size=vocab)
    export(model, tmp_path / "out", formats=["safetensors", "gguf"], tokenizer=tokenizer)
    return read_back(tmp_path / "out" / "model.gguf")[0]


def test_the_byte_level_and_listed_vocabularies(tmp_path):
    fields = export_vocabulary(tmp_path / "bytes", None)
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert tokens[ord("a")] == "a" and tokens[ord(" ")] == "Ġ" and tokens[ord("\n")] == "Ċ" and tokens[0] == "Ā"
    assert len(set(tokens[:256])) == 256 and set(types[:256]) == {1}
    assert tokens[256] == "<|extra_0|>" and types[256] == 3
    assert fields["tokenizer.ggml.eos_token_id"] == 256 and fields["tokenizer.ggml.pre"] == "default"
    chars = ["\n"] + [chr(c) for c in range(32, 127)] + ["<unk>"]  # the char-LM example's vocabulary
    fields = export_vocabulary(tmp_path / "chars", chars, vocab=len(chars))
    assert fields["tokenizer.ggml.tokens"][:3] == ["Ċ", "Ġ", "!"] and fields["tokenizer.ggml.tokens"][-1] == "<unk>"
    assert fields["tokenizer.ggml.bos_token_id"] == len(chars) - 1
    with pytest.raises(ExportError, match="too few for the byte-level vocabulary"):
        export_vocabulary(tmp_path / "small", None, vocab=len(chars))


def bpe_tokenizer(byte_fallback: bool, pattern: str | None = None):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<unk>", "<s>", "</s>"]
    text = ["the quick brown fox jumps over the lazy dog", "a lazy dog sleeps", "quick quick fox"] * 4
    if byte_fallback:  # Llama 2 / Mistral style: ▁ for spaces, bytes as <0xXX>
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tokenizer.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback()])
        alphabet = [f"<0x{b:02X}>" for b in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=VOCAB - 20, special_tokens=specials + alphabet)
    else:
        tokenizer = Tokenizer(models.BPE())
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pattern is None)]
        if pattern is not None:
            steps.insert(0, pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps) if pattern else steps[0]
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=VOCAB - 20, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(text, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")


@pytest.mark.parametrize("kind", ["gpt-2", "llama-bpe", "llama"])
def test_a_transformers_tokenizer_is_written_as_llama_cpp_reads_it(tmp_path, kind):
    from lightning_compress.formats.gguf_vocab import _LLAMA3

    tokenizer = bpe_tokenizer(kind == "llama", _LLAMA3 if kind == "llama-bpe" else None)
    tokenizer.save_pretrained(tmp_path / "tok")
    fields = export_vocabulary(tmp_path, str(tmp_path / "tok"))
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tokenizer.get_vocab()
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == VOCAB and all(tokens[i] == t for t, i in vocab.items())
    assert tokens[len(vocab):] == [f"[PAD{i}]" for i in range(len(vocab), VOCAB)]
    types = fields["tokenizer.ggml.token_type"]
    assert types[vocab["<s>"]] == 3 and fields["tokenizer.ggml.bos_token_id"] == vocab["<s>"]
    assert fields["tokenizer.ggml.eos_token_id"] == vocab["</s>"]
    assert fields["tokenizer.ggml.model"] == ("llama" if kind == "llama" else "gpt2")
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    if kind == "llama":
        assert types[vocab["<0x41>"]] == 6 and types[vocab["<unk>"]] == 2
        scores = fields["tokenizer.ggml.scores"]
        made = [vocab[m.replace(" ", "")] for m in merges]
        assert [scores[i] for i in made] == sorted((scores[i] for i in made), reverse=True)  # earlier merges first
        assert fields["tokenizer.ggml.add_space_prefix"] is True
    else:
        assert fields["tokenizer.ggml.pre"] == kind and fields["tokenizer.ggml.merges"] == merges


def test_an_unknown_pre_tokenizer_is_refused(tmp_path):
    with pytest.raises(ExportError, match="not one llama.cpp implements"):
        export_vocabulary(tmp_path, bpe_tokenizer(False, r"\w+|\s+"))
