"""The export's default input_fn on models whose ``forward`` takes several inputs.

Under a real Trainer: a two-input model exports (parity and ONNX) from ``(x, context, y)``
batches without a hand-written ``input_fn``, checked against the fake-quant model run by
hand; a batch that cannot hold the inputs fails naming ``input_fn`` and what to pass. The
builder's cases are checked on batches whose elements are known by identity.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

from lightning_compress import ArgumentError, CompressedExport, QuantizationAwareTraining, load_packed
from lightning_compress.formats.inputs import batch_inputs
from lightning_compress.formats.packed import METADATA_FILE
from tests.conftest import make_trainer


class TwoInputs(LightningModule):
    """``forward(x, context)``; batches are ``(x, context, y)``."""

    def __init__(self):
        super().__init__()
        self.fc_x = nn.Linear(16, 32)
        self.fc_context = nn.Linear(16, 32)
        self.out = nn.Linear(32, 4)

    def forward(self, x, context):
        return self.out(torch.relu(self.fc_x(x) + self.fc_context(context)))

    def training_step(self, batch, batch_idx):
        x, context, y = batch
        return F.mse_loss(self(x, context), y)

    def validation_step(self, batch, batch_idx):
        x, context, y = batch
        self.log("val/loss", F.mse_loss(self(x, context), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class ThreeInputs(TwoInputs):
    """``forward(x, context, mask)``, but batches are ``(x, context)``: the mask is made in
    ``training_step``, so the batch does not hold every input."""

    def forward(self, x, context, mask):
        return super().forward(x * mask, context)

    def training_step(self, batch, batch_idx):
        x, context = batch
        return self(x, context, torch.ones_like(x)).square().mean()


def two_input_loader(batches: int, seed: int, labels: bool = True):
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(batches * 8, 16, generator=generator), torch.randn(batches * 8, 16, generator=generator)]
    if labels:
        tensors.append(torch.randn(batches * 8, 4, generator=generator))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*tensors), batch_size=8)


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float((reference.double() - other.double()).norm() / reference.double().norm())


def test_two_input_model_exports_with_the_default_input_fn(tmp_path, seeded):
    import onnx
    import onnxruntime as ort

    module = TwoInputs()
    export_cb = CompressedExport(tmp_path / "packed", formats=["safetensors", "onnx"])
    qat = QuantizationAwareTraining("int4", group_size=16, start_step=1)
    make_trainer(max_steps=4, callbacks=[qat, export_cb]).fit(module, two_input_loader(4, 0), two_input_loader(2, 1))
    report = export_cb.report
    assert report.parity.passed and report.parity.relative_error is not None  # outputs were compared
    assert report.parity.relative_error <= 1e-5
    assert json.loads((tmp_path / "packed" / METADATA_FILE).read_text())["onnx"]["relative_error"] <= 1e-5

    x, context, _ = next(iter(two_input_loader(1, seed=2)))
    module.eval()
    with torch.no_grad():
        fake_quant = module(x, context)
        packed = load_packed(tmp_path / "packed", TwoInputs())(x, context)
    assert relative_error(fake_quant, packed) <= 1e-5
    # The ONNX file takes both inputs and computes the fake-quant model's outputs.
    graph = onnx.load(str(tmp_path / "packed" / "model.onnx")).graph
    assert len(graph.input) == 2
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(str(tmp_path / "packed" / "model.onnx"), options, providers=["CPUExecutionProvider"])
    feed = {graph.input[0].name: x.numpy(), graph.input[1].name: context.numpy()}
    assert relative_error(fake_quant, torch.from_numpy(session.run(None, feed)[0])) <= 1e-5


def test_a_batch_without_every_input_fails_naming_input_fn_and_what_to_pass(tmp_path, seeded):
    module = ThreeInputs()
    export_cb = CompressedExport(tmp_path / "packed")
    with pytest.raises(ArgumentError, match=r"ThreeInputs.forward requires 3 inputs \(x, context, mask\), but the batch"
                       r" is a list of 2.*input_fn=lambda batch: \(batch\[0\], batch\[1\], \.\.\.\)") as error:
        make_trainer(max_steps=2, callbacks=[export_cb]).fit(module, two_input_loader(2, 0, labels=False))
    assert error.value.argument == "input_fn"
    assert not (tmp_path / "packed").exists()

    # The input_fn the message asks for exports the model.
    export_cb = CompressedExport(tmp_path / "packed", input_fn=lambda batch: (batch[0], batch[1], torch.ones_like(batch[0])))
    make_trainer(max_steps=2, callbacks=[QuantizationAwareTraining("int8"), export_cb]).fit(
        ThreeInputs(), two_input_loader(2, 0, labels=False)
    )
    assert export_cb.report.parity.passed and export_cb.report.parity.relative_error <= 1e-5


# ---------------------------------------------------------------------- the builder's cases
class One(nn.Module):
    def forward(self, x):
        return x


class Two(nn.Module):
    def forward(self, x, context, scale=1.0):
        return x


class TakesTheBatch(nn.Module):
    def forward(self, batch):
        return batch["image"]


class Keywords(nn.Module):
    def forward(self, x, *, context=None, **kwargs):
        return x


X, C, Y = torch.ones(2), torch.zeros(2), torch.full((2,), 3.0)


def test_tuples_give_as_many_leading_elements_as_forward_requires():
    assert batch_inputs((X, Y), One()) is X  # x of (x, y)
    assert batch_inputs([X], One()) is X
    assert batch_inputs(X, One()) is X
    for batch in ((X, C, Y), [X, C], ((X, C), Y), [[X, C, Y], Y]):
        inputs = batch_inputs(batch, Two())
        assert isinstance(inputs, tuple) and len(inputs) == 2 and inputs[0] is X and inputs[1] is C, batch


def test_dicts_give_what_forward_takes_without_labels():
    assert batch_inputs({"x": X, "label": Y, "index": 7}, One()) == (X,)
    # The forward's leading parameters go positionally, in its order (an ONNX trace takes them).
    inputs = batch_inputs({"context": C, "labels": Y, "x": X}, Two())
    assert inputs[0] is X and inputs[1] is C and len(inputs) == 2
    inputs = batch_inputs(({"context": C, "x": X}, Y), Two())  # ({...}, y)
    assert inputs[0] is X and inputs[1] is C
    # Keyword-only parameters and **kwargs stay keywords.
    assert batch_inputs({"x": X, "context": C, "mask": Y, "y": Y}, Keywords()) == {"x": X, "context": C, "mask": Y}
    batch = {"image": X, "label": Y}
    assert batch_inputs(batch, TakesTheBatch())[0] is batch  # forward(self, batch): the dict itself


def test_a_transformers_dict_batch_goes_in_the_forward_order():
    import transformers

    config = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=8)
    model = transformers.BertModel(config)
    ids, mask, types = torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4), torch.zeros(1, 4, dtype=torch.long)
    inputs = batch_inputs({"attention_mask": mask, "input_ids": ids, "labels": Y}, model)
    assert len(inputs) == 2 and inputs[0] is ids and inputs[1] is mask
    # Not the leading parameters (attention_mask is missing): keyword arguments.
    assert batch_inputs({"input_ids": ids, "token_type_ids": types}, model) == {"input_ids": ids, "token_type_ids": types}


@pytest.mark.parametrize(
    "batch, module, message",
    [
        ((X,), Two(), r"Two.forward requires 2 inputs \(x, context\), but the batch is a tuple of 1, .*"
                      r"input_fn=lambda batch: \(batch\[0\], \.\.\.\)"),
        ((), One(), r"One.forward requires 1 input \(x\), but the batch is a tuple of 0, .*input_fn=lambda batch: \.\.\."),
        ({"x": X, "label": Y}, Two(), r"Two.forward requires x, context, but the batch is a dict with keys \['x', 'label'\],"
                                      r" without context.*input_fn=lambda batch: \(batch\['x'\], \.\.\.\)"),
        ({"image": X, "label": Y}, One(), r"One.forward requires x, .* without x.*input_fn=lambda batch: batch\['image'\]"
                                          r" with the right keys \(or input_fn=lambda batch: \(batch,\) to pass the whole dict\)"),
    ],
)
def test_batches_without_the_inputs_say_what_to_pass(batch, module, message):
    with pytest.raises(ArgumentError, match=message) as error:
        batch_inputs(batch, module)
    assert error.value.argument == "input_fn"
