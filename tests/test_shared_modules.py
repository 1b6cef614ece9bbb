"""A module registered under several names (a block reused by reference, as in
``nn.ModuleList([block] * n)``, or one layer under two attribute names) compresses,
exports once, and loads back shared, computing what the trained model computes.

``named_modules()`` lists such a module once while ``state_dict()`` holds its tensors
under every name: before, the export stored the other names' weights as the raw float
parameter and its parity check refused the model (``weights differ in ['b.weight']``).
"""

import json
import warnings

import onnxruntime
import pytest
import torch
import transformers
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as pl
from lightning_compress import ExportError, MagnitudePruning, PackedFormatError, QuantizationAwareTraining, QuantSpec, export, load_packed
from lightning_compress.core.targeting import first_registration, shared_module_names
from lightning_compress.formats.packed import METADATA_FILE
from lightning_compress.quant import round_to_nearest

from tests.conftest import make_trainer


class SharedBlocks(pl.LightningModule):
    """A weight-shared stack (one block applied three times) and a projection also
    registered as ``alias``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        block = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.blocks = nn.ModuleList([block] * 3)
        self.project = nn.Linear(32, 32)
        self.alias = self.project
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(self.alias(torch.relu(self.project(x))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _data() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 32, generator=generator)
    return DataLoader(TensorDataset(x, x[:, :4].sin()), batch_size=16)


def test_shared_module_names_maps_every_later_name_to_the_first():
    model = SharedBlocks()
    shared = shared_module_names(model)
    assert shared == {"blocks.1": "blocks.0", "blocks.1.0": "blocks.0.0", "blocks.1.1": "blocks.0.1",
                      "blocks.1.2": "blocks.0.2", "blocks.2": "blocks.0", "blocks.2.0": "blocks.0.0",
                      "blocks.2.1": "blocks.0.1", "blocks.2.2": "blocks.0.2", "alias": "project"}
    assert first_registration("blocks.2.0.weight", shared) == "blocks.0.0.weight"
    assert first_registration("head.bias", shared) == "head.bias"


@pytest.mark.parametrize("as_factory", [True, False])
def test_trained_shared_model_exports_once_and_loads_shared(tmp_path, as_factory):
    model = SharedBlocks()
    qat = QuantizationAwareTraining(weights="int4", group_size=32, start_step=2)
    pruning = MagnitudePruning(0.5, end_step=4, update_every=1)
    make_trainer(max_steps=6, callbacks=[pruning, qat]).fit(model, _data())
    x = torch.randn(8, 32)
    with torch.no_grad():
        expected = model(x)

    report = export(model, tmp_path / "out", inputs=[x])
    metadata = json.loads((tmp_path / "out" / METADATA_FILE).read_text())
    # Each shared layer is stored once, under the name compression uses.
    assert sorted(metadata["layers"]) == ["blocks.0.0", "blocks.0.2", "head", "project"]
    assert not any(key.startswith(("blocks.1", "blocks.2", "alias")) for key in metadata["tensors"])
    assert metadata["aliases"] == {"blocks.1.0.bias": "blocks.0.0.bias", "blocks.1.2.bias": "blocks.0.2.bias",
                                   "blocks.2.0.bias": "blocks.0.0.bias", "blocks.2.2.bias": "blocks.0.2.bias",
                                   "alias.bias": "project.bias"}
    assert report.file_bytes < 3 * 64 * 32 * 2 * 4 / 4  # well under one float copy of the shared block's weights

    loaded = load_packed(tmp_path / "out", SharedBlocks if as_factory else SharedBlocks())
    assert loaded.blocks[0] is loaded.blocks[1] is loaded.blocks[2]
    assert loaded.alias is loaded.project
    assert type(loaded.alias).__name__ == "PackedLinear"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)


def test_a_pruned_float_layer_shared_under_two_names_is_stored_once(tmp_path):
    model = SharedBlocks()
    pruning = MagnitudePruning(0.5, end_step=2, update_every=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(max_steps=3, callbacks=[pruning]).fit(model, _data())
    # The shared module is the one pruned, under every name: no "tied weights" warning.
    assert not [w for w in caught if "share (tied)" in str(w.message)]
    x = torch.randn(4, 32)
    with torch.no_grad():
        expected = model(x)
    export(model, tmp_path / "out", inputs=[x])
    metadata = json.loads((tmp_path / "out" / METADATA_FILE).read_text())
    # The effective (masked) weight under its first name; the raw one under no name.
    assert metadata["aliases"]["alias.weight"] == "project.weight"
    assert metadata["aliases"]["blocks.2.0.weight"] == "blocks.0.0.weight"
    loaded = load_packed(tmp_path / "out", SharedBlocks)
    assert loaded.alias is loaded.project and loaded.blocks[0] is loaded.blocks[2]
    assert (loaded.project.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected)


def test_shared_model_exports_to_onnx_and_runs_in_onnxruntime(tmp_path):
    model = SharedBlocks()
    qat = QuantizationAwareTraining(weights="int4", group_size=32, start_step=1)
    make_trainer(max_steps=3, callbacks=[qat]).fit(model, _data())
    x = torch.randn(8, 32)
    export(model, tmp_path / "out", inputs=[x], formats=("safetensors", "onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "model.onnx"))
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(output), model(x), rtol=1e-5, atol=1e-5)


class TwoLayers(nn.Module):
    """``b`` is ``a`` (shared) or a layer of its own."""

    def __init__(self, share: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(32, 32)
        self.b = self.a if share else nn.Linear(32, 32)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("quantized", [True, False])
def test_a_file_that_stores_the_names_apart_is_refused_by_a_model_that_shares_them(tmp_path, quantized):
    # Loading both a.* and b.* into the one shared module would keep the last, silently
    # (a 0.49 output error before this check).
    model = TwoLayers(share=False)
    if quantized:
        round_to_nearest(model, QuantSpec(4, "group", 32))
    export(model, tmp_path / "out", inputs=[torch.randn(2, 32)])
    for target in (TwoLayers(share=True), lambda: TwoLayers(share=True)):
        with pytest.raises(PackedFormatError, match="stores 'b' on its own, but in TwoLayers 'b' is another name of 'a'"):
            load_packed(tmp_path / "out", target)


class TiedHead(nn.Module):
    """An embedding and an output head that share one weight (``tie``), as language models do."""

    def __init__(self, tie):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.mix = nn.Linear(32, 32)
        self.head = nn.Linear(32, 64, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mix(self.embed(ids))))


def test_a_file_that_stores_two_tensors_is_refused_by_a_model_that_ties_them(tmp_path):
    """The exported model had its head untied (LoRA's merge unties a head it adapted): both
    weights are stored. A tied model would take them into its one tensor, the second over
    the first; the load stopped later at "unexpected tensors ['embed.weight']"."""
    torch.manual_seed(0)
    model = TiedHead(tie=True)
    with torch.no_grad():
        model.head.weight = nn.Parameter(model.embed.weight + 0.01 * torch.randn_like(model.embed.weight))
    round_to_nearest(model, QuantSpec(4, "group", 32), targets=["mix"])
    ids = torch.randint(0, 64, (2, 8))
    export(model, tmp_path / "out", inputs=[ids])
    with pytest.raises(PackedFormatError, match="the file stores 'embed.weight' and 'head.weight' as two tensors .*"
                                                " but TiedHead ties them .* build the model untied"):
        load_packed(tmp_path / "out", lambda: TiedHead(tie=True))
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "out", lambda: TiedHead(tie=False))(ids), model(ids))
    # A tied model's export (the tie kept) loads into the tied model, still tied.
    tied = TiedHead(tie=True)
    export(tied, tmp_path / "tied", inputs=[ids])
    loaded = load_packed(tmp_path / "tied", lambda: TiedHead(tie=True))
    with torch.no_grad():
        assert loaded.head.weight is loaded.embed.weight and torch.equal(loaded(ids), tied(ids))


def test_gptq_start_on_a_module_shared_with_itself_is_not_refused_as_tied(tmp_path):
    model = SharedBlocks()
    qat = QuantizationAwareTraining(weights="int4", group_size=32, init="gptq", start_step=2, calibration_batches=2)
    make_trainer(max_steps=4, callbacks=[qat]).fit(model, _data())
    x = torch.randn(4, 32)
    with torch.no_grad():
        expected = model(x)
    export(model, tmp_path / "out", inputs=[x])
    with torch.no_grad():
        torch.testing.assert_close(load_packed(tmp_path / "out", SharedBlocks)(x), expected, rtol=1e-5, atol=1e-5)


def test_a_transformers_model_with_a_shared_layer_gets_no_compressed_tensors_config(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    model = transformers.LlamaForCausalLM(config).eval()
    model.model.layers[1] = model.model.layers[0]
    round_to_nearest(model, QuantSpec(4, "group", 16), targets=[nn.Linear])
    ids = torch.randint(0, 64, (2, 8))
    # transformers reads every name, and the file holds layers.1 only as layers.0: no config.json.
    report = export(model, tmp_path / "auto", inputs=[ids])
    assert not (tmp_path / "auto" / "config.json").exists()
    assert any("'model.layers.1' is another name of 'model.layers.0'" in note for note in report.notes)
    with torch.no_grad():
        torch.testing.assert_close(load_packed(tmp_path / "auto", lambda: _shared_llama(config))(ids).logits,
                                   model(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ExportError, match="compressed_tensors=True cannot store layer 'model.layers.1'"):
        export(model, tmp_path / "forced", inputs=[ids], compressed_tensors=True)


def _shared_llama(config):
    model = transformers.LlamaForCausalLM(config)
    model.model.layers[1] = model.model.layers[0]
    return model


@pytest.mark.parametrize("argument", ["targets", "exclude"])
def test_naming_only_the_second_name_of_a_shared_module_says_which_name_to_use(argument):
    with pytest.raises(ValueError, match=rf"`{argument}` pattern 'b' matches only 'b', another name of 'a' .*name 'a'"):
        round_to_nearest(TwoLayers(share=True), QuantSpec(4, "group", 32), **{argument: ["b"]})
