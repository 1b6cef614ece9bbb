"""LoRA on ``nn.MultiheadAttention`` (issue 16): its packed ``in_proj_weight`` adapted like a
Linear weight, trained under a real Trainer, stacked with pruning, QAT and the export, and
exchanged with the real ``peft`` package in both directions.

References are computed by hand from the parameters (``W + s·B·A``), or by ``peft`` itself.
PEFT 0.21 adds an attention layer's ``out_proj`` delta twice in its forward (its merge
calls ``out_proj.merge()`` after writing ``W + dW`` itself; huggingface/peft PR #3774):
:func:`peft_reference` measures which PEFT is installed and gives the outputs that PEFT
should match, so these tests hold before and after PEFT's fix.
"""

from __future__ import annotations

import copy
import json
import os
import re
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.demos import Transformer
from safetensors.torch import load_file, save_file
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402  (a test dependency: the real package, never skipped)

from lightning_compress import (  # noqa: E402
    AdapterFormatError,
    CompressedExport,
    LoRA,
    LoRAConfig,
    MagnitudePruning,
    QuantizationAwareTraining,
    load_adapters,
    load_packed,
    merge_adapters,
    save_adapters,
)
from lightning_compress.callbacks.compatibility import IncompatibleSettings  # noqa: E402
from lightning_compress.core.attention import fast_path_disabled  # noqa: E402
from lightning_compress.core.transforms import Stage, get_weight_transform  # noqa: E402
from lightning_compress.formats.packed import METADATA_FILE  # noqa: E402
from lightning_compress.lora import inject_adapters  # noqa: E402
from lightning_compress.quant.nf4 import dequantize_nf4, is_nf4  # noqa: E402
from tests.conftest import make_trainer  # noqa: E402

VOCAB, WIDTH, LENGTH, R, ALPHA = 24, 16, 8, 4, 8.0
SCALING = ALPHA / R


# ---------------------------------------------------------------------- models and data
class Encoder(nn.Module):
    """A plain base model: an ``nn.TransformerEncoder`` and a bare ``nn.MultiheadAttention``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        layer = nn.TransformerEncoderLayer(WIDTH, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.attn = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens, target=None):
        h = self.encoder(self.embed(tokens))
        attended, _ = self.attn(h, h, h)
        return F.log_softmax(self.head(attended + h), -1).flatten(0, 1)


def demo_transformer() -> nn.Module:
    """Lightning's demo ``Transformer`` (``nn.Transformer``: self- and cross-attention), small."""
    return Transformer(vocab_size=VOCAB, ninp=WIDTH, nhead=2, nhid=32, nlayers=1, dropout=0.0)


class LM(pl.LightningModule):
    """A user's module around a base model (``peft_root="model"``)."""

    def __init__(self, build) -> None:
        super().__init__()
        self.model = build()

    def forward(self, inputs, target):
        return self.model(inputs, target)

    def _apply(self, fn, recurse: bool = True):
        if hasattr(self.model, "pos_encoder"):  # Lightning's demo: its table follows no .to() (see examples)
            self.model.pos_encoder.pe = None
        return super()._apply(fn, recurse)

    def training_step(self, batch, batch_idx):
        inputs, target = batch
        return F.nll_loss(self(inputs, target), target.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


MODELS = {"encoder": Encoder, "demo_transformer": demo_transformer}


def token_loader(seed: int = 0, batches: int = 4, batch_size: int = 8):
    tokens = torch.randint(0, VOCAB, (batches * batch_size, LENGTH + 1), generator=torch.Generator().manual_seed(seed))
    dataset = torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size)


def a_batch():
    return next(iter(token_loader(seed=1)))


def attention_names(model):
    return [name for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)]


def run(model, *inputs):
    """Outputs in eval mode as PyTorch computes them unfused (see :func:`peft_reference`)."""
    model.eval()
    with torch.no_grad(), fast_path_disabled():
        return model(*inputs)


def hand_merged(plain: nn.Module, adapted_state: dict, scaling: float = SCALING) -> nn.Module:
    """``plain`` (a fresh model) loaded with ``W + s·B·A`` for every adapted weight of a
    model's ``state_dict`` (its raw weights and ``lora_A``/``lora_B``), by hand."""
    state = {k: v.clone() for k, v in adapted_state.items() if ".lora_" not in k}
    for key, lora_a in adapted_state.items():
        if key.endswith(".lora_A"):
            layer = key[: -len(".lora_A")]
            param = f"{layer}.in_proj_weight" if f"{layer}.in_proj_weight" in state else f"{layer}.weight"
            state[param] = state[param] + scaling * adapted_state[f"{layer}.lora_B"] @ lora_a
    plain.load_state_dict(state)
    return plain


def peft_targets(target_modules, name: str) -> bool:
    """PEFT's test of a module name against ``target_modules`` (a regex of the whole name,
    or a list of names and name suffixes)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def perturb(model, scale=0.2):
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(torch.randn_like(parameter) * scale)


# ---------------------------------------------------------------------- PEFT's out_proj delta
def peft_doubles_out_proj() -> bool:
    """Whether the installed PEFT adds an attention layer's ``out_proj`` delta twice in its
    forward (PEFT 0.21.2 does: huggingface/peft PR #3774)."""
    torch.manual_seed(0)
    holder = nn.Module()
    holder.attn = nn.MultiheadAttention(8, 2, batch_first=True)
    base = copy.deepcopy(holder.attn)
    model = peft.get_peft_model(holder, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["attn"]))
    out_proj = model.base_model.model.attn.base_layer.out_proj
    with torch.no_grad():
        out_proj.lora_B["default"].weight.normal_()
        x = torch.randn(1, 3, 8)
        once = copy.deepcopy(base)
        once.out_proj.weight += out_proj.get_delta_weight("default")
        got = model.base_model.model.attn(x, x, x)[0]
        return not torch.allclose(got, once(x, x, x)[0], atol=1e-6)


def peft_reference(ours: nn.Module, *inputs):
    """What PEFT's forward should give for our adapted ``ours``: its own outputs, or, where
    the installed PEFT adds each attention ``out_proj`` delta twice, those of a copy whose
    out_proj adapters are doubled (so the files are compared, not PEFT's bug)."""
    if not peft_doubles_out_proj():
        return run(ours, *inputs)
    doubled = copy.deepcopy(ours)
    with torch.no_grad():
        for name in attention_names(doubled):
            doubled.get_submodule(f"{name}.out_proj").lora_B.mul_(2)
    return run(doubled, *inputs)


def test_the_installed_peft_is_what_this_file_expects():
    """Records PEFT's MHA out_proj bug while it lasts; fails (so the README is updated)
    once the installed PEFT adds the delta once."""
    assert peft_doubles_out_proj(), "PEFT now applies the out_proj delta once: update README's PEFT note"


# ---------------------------------------------------------------------- training
def fit(module, callbacks, steps=6):
    make_trainer(callbacks=callbacks, max_steps=steps).fit(module, token_loader())


class AdaptersAtStart(pl.Callback):
    """The adapter parameters as the first step finds them."""

    def on_train_start(self, trainer, pl_module):
        self.values = {n: p.detach().clone().cpu() for n, p in pl_module.named_parameters() if ".lora_" in n}


@pytest.mark.parametrize("build", list(MODELS))
def test_default_lora_adapts_attention_and_trains_only_the_adapters(build):
    pl.seed_everything(0, verbose=False)
    module = LM(MODELS[build])
    before = {k: v.clone() for k, v in module.state_dict().items()}
    lora, start = LoRA(r=R, lora_alpha=ALPHA), AdaptersAtStart()
    fit(module, [lora, start])

    attention = attention_names(module)
    assert len(attention) == (2 if build == "encoder" else 3)  # the demo: encoder self, decoder self + cross
    for name in attention:
        layer = module.get_submodule(name)
        assert name in lora.adapters and f"{name}.out_proj" in lora.adapters  # both projections, as PEFT
        assert layer.lora_A.shape == (R, WIDTH) and layer.lora_B.shape == (3 * WIDTH, R)
        raw = layer._parameters["in_proj_weight"]
        assert torch.equal(raw, before[f"{name}.in_proj_weight"]) and not raw.requires_grad
        assert torch.equal(start.values[f"{name}.lora_B"], torch.zeros(3 * WIDTH, R))  # B starts at 0
        for ab in ("lora_A", "lora_B"):
            assert not torch.equal(getattr(layer, ab), start.values[f"{name}.{ab}"])  # and both trained
        by_hand = raw + SCALING * layer.lora_B @ layer.lora_A
        torch.testing.assert_close(layer.in_proj_weight, by_hand, rtol=0, atol=1e-6)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {n for n in module.state_dict() if ".lora_" in n}
    for key, value in before.items():  # every frozen tensor as it was
        assert torch.equal(module.state_dict()[key], value), key

    # The model computes with exactly those weights: a fresh plain model given W + s·B·A.
    state = module.model.state_dict()
    plain = hand_merged(MODELS[build](), state)
    inputs = a_batch()
    torch.testing.assert_close(run(module.model, *inputs), run(plain, *inputs), rtol=1e-5, atol=1e-5)
    module.eval()
    with torch.no_grad():  # PyTorch's fused encoder path reads the effective weights as well
        torch.testing.assert_close(module.model(*inputs), plain.eval()(*inputs), rtol=1e-5, atol=1e-5)


def test_merge_writes_w_plus_sba_then_the_mask_into_in_proj_weight():
    pl.seed_everything(0, verbose=False)
    module = LM(Encoder)
    pruning = MagnitudePruning(0.5, targets=[nn.MultiheadAttention], start_step=0, end_step=2, update_every=1)
    fit(module, [LoRA(r=R, lora_alpha=ALPHA), pruning], steps=4)
    layer = module.model.attn
    mask = get_weight_transform(layer, Stage.MASK, "in_proj_weight").keep
    expected = (layer._parameters["in_proj_weight"] + SCALING * layer.lora_B @ layer.lora_A) * mask
    inputs = a_batch()
    unmerged = run(module.model, *inputs)
    assert "model.attn" in merge_adapters(module)
    merged = layer._parameters["in_proj_weight"]
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)
    assert bool((merged[mask == 0] == 0).all()) and (mask == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert not hasattr(layer, "lora_A") and get_weight_transform(layer, Stage.ADAPTER, "in_proj_weight") is None
    torch.testing.assert_close(run(module.model, *inputs), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", list(MODELS))
def test_lora_pruning_qat_and_export_pack_the_adapted_attention_weights(tmp_path, build):
    pl.seed_everything(0, verbose=False)
    module = LM(MODELS[build])
    exporter = CompressedExport(tmp_path / "packed", input_fn=tuple, parity_batches=2)
    callbacks = [
        LoRA(r=R, lora_alpha=ALPHA),
        MagnitudePruning(0.5, start_step=0, end_step=2, update_every=1),
        QuantizationAwareTraining("int8", start_step=2),
        exporter,
    ]
    fit(module, callbacks)
    parity = exporter.report.parity
    assert parity.passed and parity.weights_exact and parity.relative_error <= 1e-5

    metadata = json.loads((tmp_path / "packed" / METADATA_FILE).read_text())
    loaded = load_packed(tmp_path / "packed", LM(MODELS[build]), backend="dequantize")
    for key in attention_names(module):
        assert metadata["layers"][key]["param"] == "in_proj_weight"
        layer = module.get_submodule(key)
        # The packed in_proj_weight is the trained one: fake_quant(mask ⊙ (W + s·B·A)).
        assert torch.equal(loaded.get_submodule(key).in_proj_weight, layer.in_proj_weight.detach())
        pruned = get_weight_transform(layer, Stage.MASK, "in_proj_weight").pruned
        assert bool((loaded.get_submodule(key).in_proj_weight[pruned] == 0).all())
    inputs = a_batch()
    torch.testing.assert_close(run(loaded, *inputs), run(module, *inputs), rtol=0, atol=0)


def test_qlora_stores_in_proj_weight_in_nf4_and_merges_it():
    pl.seed_everything(0, verbose=False)
    module = LM(Encoder)
    original = module.model.attn.in_proj_weight.detach().clone()
    lora = LoRA(r=R, lora_alpha=ALPHA, base="nf4", nf4_block_size=32, nf4_scaler_block_size=4)
    fit(module, [lora], steps=3)
    layer = module.model.attn
    raw = layer._parameters["in_proj_weight"]
    assert is_nf4(raw) and "model.attn.in_proj_weight" in lora.method_state()["dropped_keys"]
    dense = dequantize_nf4(raw, torch.float32)
    assert (dense - original).abs().max().item() < 0.05  # 4-bit NormalFloat of the same weight
    torch.testing.assert_close(layer.in_proj_weight, dense + SCALING * layer.lora_B @ layer.lora_A, rtol=0, atol=1e-6)
    inputs = a_batch()
    unmerged = run(module.model, *inputs)
    lora.merge()
    assert not is_nf4(layer._parameters["in_proj_weight"])
    torch.testing.assert_close(run(module.model, *inputs), unmerged, rtol=1e-5, atol=1e-5)


def test_dropout_is_named_as_not_acting_on_attention():
    module = LM(Encoder)
    with pytest.warns(UserWarning, match=r"`lora_dropout`=0.1 does not act on the projections of attention layers.*"
                                         r"'model.attn', 'model.attn.out_proj'"):
        fit(module, [LoRA(r=R, lora_dropout=0.1)], steps=1)


# ---------------------------------------------------------------------- PEFT interop
@pytest.mark.parametrize("build", list(MODELS))
def test_adapters_saved_after_training_load_in_peft_with_our_outputs(tmp_path, build):
    pl.seed_everything(0, verbose=False)
    module = LM(MODELS[build])
    base_state = copy.deepcopy(module.model.state_dict())
    fit(module, [LoRA(r=R, lora_alpha=ALPHA, peft_root="model", adapter_dir=tmp_path)])
    perturb(module)  # out_proj adapters far from zero, so a misplaced one shows

    with pytest.warns(UserWarning, match=r"Saved the adapters of nn.MultiheadAttention layers \('encoder|'transformer"
                                         r".*adds that delta twice .*huggingface/peft PR #3774"):
        save_adapters(module.model, tmp_path, LoRAConfig(r=R, lora_alpha=ALPHA))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    attention = attention_names(module.model)
    for name in attention:
        assert saved[f"base_model.model.{name}.lora_A.weight"].shape == (R, WIDTH)
        assert saved[f"base_model.model.{name}.lora_B.weight"].shape == (3 * WIDTH, R)
        assert f"base_model.model.{name}.base_layer.out_proj.lora_A.weight" in saved
        assert f"base_model.model.{name}.out_proj.lora_A.weight" not in saved
    targeted = [name for name, _ in module.model.named_modules() if name and peft_targets(config["target_modules"], name)]
    assert set(attention) <= set(targeted) and not any(name.endswith("out_proj") for name in targeted)

    base = MODELS[build]()
    base.load_state_dict(base_state)
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path))
    inner = theirs.base_model.model
    for name in attention:  # PEFT's own deltas are ours
        ours_layer, their_layer = module.model.get_submodule(name), inner.get_submodule(name)
        torch.testing.assert_close(their_layer.get_delta_weight("default"),
                                   SCALING * ours_layer.lora_B @ ours_layer.lora_A, rtol=0, atol=1e-6)
    inputs = a_batch()
    torch.testing.assert_close(run(theirs, *inputs), peft_reference(module.model, *inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", list(MODELS))
def test_adapters_saved_by_peft_load_into_a_plain_model(tmp_path, build):
    torch.manual_seed(0)
    base_state = MODELS[build]().state_dict()
    source = MODELS[build]()
    source.load_state_dict(base_state)
    linear_and_attention = [re.escape(n) for n, m in source.named_modules()
                            if isinstance(m, (nn.Linear, nn.MultiheadAttention)) and not n.endswith("out_proj")]
    # A regex of whole names: the demo's Linear `decoder` is also the suffix of `transformer.decoder`.
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="^(?:" + "|".join(linear_and_attention) + ")$")
    their_model = peft.get_peft_model(source, config)
    perturb(their_model)
    their_model.save_pretrained(str(tmp_path))
    inputs = a_batch()
    expected = run(their_model, *inputs)

    ours = MODELS[build]()
    ours.load_state_dict(base_state)
    with pytest.warns(UserWarning, match=r"Loaded the adapters of nn.MultiheadAttention layers"):
        load_adapters(ours, tmp_path)
    inner = their_model.base_model.model
    for name in attention_names(ours):
        layer = ours.get_submodule(name)
        torch.testing.assert_close(layer.in_proj_weight, base_state[f"{name}.in_proj_weight"]
                                   + inner.get_submodule(name).get_delta_weight("default"), rtol=0, atol=1e-6)
        out_delta = inner.get_submodule(name).base_layer.out_proj.get_delta_weight("default")
        torch.testing.assert_close(layer.out_proj.weight, base_state[f"{name}.out_proj.weight"] + out_delta,
                                   rtol=0, atol=1e-6)
    # PEFT adds the out_proj deltas twice: compare with what the file means, doubled the same way.
    torch.testing.assert_close(peft_reference(ours, *inputs), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- what PEFT cannot hold
@pytest.mark.parametrize("targets, layer, fix", [
    (["attn"], "attn", r"Adapt 'attn.out_proj' too \(add it to `target_modules`\), or leave 'attn' out"),
    (["attn.out_proj"], "attn.out_proj", r"Adapt 'attn' too, or leave 'attn.out_proj' out"),
])
def test_saving_one_projection_of_an_attention_layer_is_refused(tmp_path, targets, layer, fix):
    model = Encoder()
    inject_adapters(model, LoRAConfig(r=R, target_modules=targets))
    with pytest.raises(ValueError, match=rf"(?s)PEFT's format cannot hold .*'{layer}'.*{fix}"):
        save_adapters(model, tmp_path / "adapter", LoRAConfig(r=R))
    assert not (tmp_path / "adapter").exists()


def test_a_run_that_would_save_one_projection_is_refused_before_training(tmp_path):
    module = LM(Encoder)
    state = copy.deepcopy(module.state_dict())
    lora = LoRA(r=R, target_modules=["attn", "linear1"], adapter_dir=tmp_path / "adapter", peft_root="model")
    with pytest.raises(IncompatibleSettings, match=r"LoRA\(adapter_dir=.*cannot adapt layer 'model.attn'"
                                                   r" \(MultiheadAttention\): attention layer 'model.attn' is adapted"
                                                   r".*or set adapter_dir=None\nFix: add exclude_modules=\['model.attn'\]"):
        fit(module, [lora], steps=1)
    assert not any(".lora_" in k for k in module.state_dict())
    assert all(torch.equal(module.state_dict()[k], v) for k, v in state.items())
    assert not (tmp_path / "adapter").exists()

    # With on_incompatible="skip" that layer gets no adapter, and the file PEFT reads is whole.
    lora = LoRA(r=R, target_modules=["attn", "linear1"], adapter_dir=tmp_path / "adapter", peft_root="model",
                on_incompatible="skip")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        fit(module, [lora], steps=1)
    assert list(lora.adapters) == ["model.encoder.layers.0.linear1"]
    assert peft.PeftModel.from_pretrained(Encoder(), str(tmp_path / "adapter")) is not None


def test_an_out_proj_left_alone_by_a_conflict_is_refused_at_setup(tmp_path):
    """Pruning on the attention layer and LoRA dropout conflict; LoRA (skip) gives the
    attention layer up, which would leave its out_proj adapted alone."""
    module = LM(Encoder)
    lora = LoRA(r=R, lora_dropout=0.1, target_modules=["model.attn", "model.attn.out_proj"],
                adapter_dir=tmp_path / "adapter", on_incompatible="skip")
    pruning = MagnitudePruning(0.5, targets=["model.attn"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"`adapter_dir`=.*layer 'model.attn.out_proj' is the output projection"
                                             r" of the nn.MultiheadAttention 'model.attn', which is not adapted"):
            fit(module, [lora, pruning], steps=1)
    assert not any(".lora_" in k for k in module.state_dict())


def _peft_saved(tmp_path, **changes):
    """A PEFT-saved adapter of ``Encoder`` (attention and head), with ``changes`` applied
    to its tensors: ``{old key: new key or None}``."""
    torch.manual_seed(0)
    model = peft.get_peft_model(Encoder(), peft.LoraConfig(r=R, target_modules=["attn", "head"]))
    model.save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    for old, new in changes.items():
        value = tensors.pop(f"base_model.model.{old}")
        if new is not None:
            tensors[f"base_model.model.{new}"] = value
    save_file(tensors, str(path))
    return tmp_path


@pytest.mark.parametrize("changes, message", [
    ({"attn.base_layer.out_proj.lora_A.weight": "attn.out_proj.lora_A.weight",
      "attn.base_layer.out_proj.lora_B.weight": "attn.out_proj.lora_B.weight"},
     r"adapter for 'attn.out_proj', the out_proj of the nn.MultiheadAttention 'attn'; PEFT never applies"),
    ({"attn.base_layer.out_proj.lora_A.weight": None, "attn.base_layer.out_proj.lora_B.weight": None},
     r"attention layer 'attn' has lora_A/B tensors but no base_layer.out_proj.lora_A/B; .*incomplete"),
    ({"attn.lora_A.weight": None, "attn.lora_B.weight": None},
     r"attention layer 'attn' has base_layer.out_proj.lora_A/B tensors but no lora_A/B; .*incomplete"),
])
def test_files_peft_would_not_apply_as_written_are_refused(tmp_path, changes, message):
    directory = _peft_saved(tmp_path, **changes)
    model = Encoder()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(AdapterFormatError, match=message):
        load_adapters(model, directory)
    assert model.state_dict().keys() == state.keys()


def separate_qkv_model():
    model = nn.Module()
    model.attn = nn.MultiheadAttention(WIDTH, 2, kdim=8, vdim=8, batch_first=True)  # q/k/v weights apart
    model.head = nn.Linear(WIDTH, VOCAB)
    return model


def test_an_attention_layer_with_separate_qkv_weights_is_not_adapted_and_its_out_proj_alone_is_refused(tmp_path):
    model = separate_qkv_model()
    adapters = inject_adapters(model, LoRAConfig(r=R))
    assert sorted(adapters) == ["attn.out_proj", "head"]
    with pytest.raises(ValueError, match=r"'attn.out_proj' is the output projection .*separate q/k/v weights"):
        save_adapters(model, tmp_path, LoRAConfig(r=R))
    # PEFT refuses such a layer too; a file that holds one anyway is refused here.
    with pytest.raises(AdapterFormatError, match=r"adapter for 'attn', a MultiheadAttention; .*one packed in_proj_weight"):
        load_adapters(separate_qkv_model(), _peft_saved(tmp_path))
