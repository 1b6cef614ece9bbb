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
from lightning.pytorch import Callback, LightningModule
from torch import nn

from lightning_compress import ArgumentError, CompressedExport, QuantizationAwareTraining, QuantSpec, export, load_packed
from lightning_compress.formats.inputs import batch_inputs
from lightning_compress.formats.packed import METADATA_FILE
from lightning_compress.quant.weights import round_to_nearest
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
    # attention_mask missing between them: None in its place, so an ONNX trace still takes a tuple.
    inputs = batch_inputs({"input_ids": ids, "token_type_ids": types}, model)
    assert len(inputs) == 3 and inputs[0] is ids and inputs[1] is None and inputs[2] is types


class GapWithADefault(nn.Module):
    def forward(self, x, scale=1.0, mask=None):
        return x * scale


def test_a_dict_skipping_a_parameter_that_defaults_to_a_value_stays_keywords():
    """Passing None for ``scale`` would replace its 1.0: keyword arguments instead."""
    assert batch_inputs({"x": X, "mask": Y}, GapWithADefault()) == {"x": X, "mask": Y}
    inputs = batch_inputs({"x": X, "scale": C}, GapWithADefault())
    assert len(inputs) == 2 and inputs[0] is X and inputs[1] is C


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


# ---------------------------------------------------------------------- batches the trial found mishandled
class Pair(nn.Module):
    def forward(self, pair):
        return pair[0]


class OneOptional(nn.Module):
    def forward(self, x, mask=None):
        return x


def test_a_tuple_goes_whole_to_a_forward_that_takes_it_as_one_argument():
    batch = ((X, C), Y)
    inputs = batch_inputs(batch, Pair())
    assert len(inputs) == 1 and inputs[0] is batch[0]  # forward(pair): the tuple itself
    inputs = batch_inputs(batch, OneOptional())
    assert len(inputs) == 2 and inputs[0] is X and inputs[1] is C  # forward(x, mask=None): its elements


def test_a_packed_sequence_is_one_input_never_its_fields():
    from torch.nn.utils.rnn import pack_sequence

    packed = pack_sequence([torch.ones(3, 2), torch.ones(2, 2)])
    for batch in ((packed, Y), packed, [packed]):
        inputs = batch_inputs(batch, One())
        assert isinstance(inputs, tuple) and len(inputs) == 1 and inputs[0] is packed, batch


class PairsModule(LightningModule):
    """Two tensors in, three classes out; ``forward``'s signature is the subclass's."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(4, 16)
        self.h = nn.Linear(16, 3)

    def net(self, image, meta):
        return self.h(torch.relu(self.a(image) + self.b(meta)))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.logits(batch), batch[-1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class TupleForward(PairsModule):
    """``forward(self, pair)`` with ``((image, meta), y)`` batches."""

    def forward(self, pair):
        return self.net(*pair)

    def logits(self, batch):
        return self(batch[0])


class VarArgs(PairsModule):
    """``forward(self, *args)`` with ``(image, meta, y)`` batches: any count binds."""

    def forward(self, *args):
        return self.net(*args)

    def logits(self, batch):
        return self(batch[0], batch[1])


class KeywordOnly(PairsModule):
    """``forward(self, image, *, meta)`` with ``(image, meta, y)`` batches."""

    def forward(self, image, *, meta):
        return self.net(image, meta)

    def logits(self, batch):
        return self(batch[0], meta=batch[1])


def pairs(nested: bool, batches: int = 2):
    generator = torch.Generator().manual_seed(0)
    image, meta = torch.randn(batches * 4, 8, generator=generator), torch.randn(batches * 4, 4, generator=generator)
    y = torch.randint(0, 3, (batches * 4,), generator=generator)
    rows = [((i, m), t) if nested else (i, m, t) for i, m, t in zip(image, meta, y)]
    return torch.utils.data.DataLoader(rows, batch_size=4)


class Steps(Callback):
    count = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        Steps.count += 1


def fit(module, loader, export_cb):
    Steps.count = 0
    make_trainer(max_steps=2, callbacks=[QuantizationAwareTraining("int8"), export_cb, Steps()]).fit(module, loader)


def test_a_forward_taking_a_tuple_exports_with_the_default_input_fn(tmp_path, seeded):
    """The trial's ``forward(self, pair)``: called with the tuple's two tensors, it failed
    with a raw TypeError; now parity and the ONNX file (onnxruntime, run here) match."""
    module = TupleForward()
    export_cb = CompressedExport(tmp_path / "packed", formats=["safetensors", "onnx"])
    fit(module, pairs(nested=True), export_cb)
    assert export_cb.report.parity.passed and export_cb.report.parity.relative_error <= 1e-5
    (image, meta), _ = next(iter(pairs(nested=True)))
    module.eval()
    with torch.no_grad():
        reference = module((image, meta))
    from lightning_compress.formats.onnx import run_onnx

    got = torch.from_numpy(run_onnx(tmp_path / "packed" / "model.onnx", ((image, meta),))[0])
    assert relative_error(reference, got) <= 1e-5


def test_a_packed_sequence_batch_exports_with_the_default_input_fn(tmp_path, seeded):
    from torch.nn.utils.rnn import pack_sequence

    class Recurrent(LightningModule):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.GRU(4, 16), nn.Linear(16, 2)

        def forward(self, packed):
            return self.head(self.rnn(packed)[1][-1])

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    generator = torch.Generator().manual_seed(0)
    rows = [(torch.randn(length, 4, generator=generator), length % 2) for length in (2, 5, 3, 4, 6, 2, 3, 5)]

    def collate(items):
        return pack_sequence([x for x, _ in items], enforce_sorted=False), torch.tensor([y for _, y in items])

    loader = torch.utils.data.DataLoader(rows, batch_size=4, collate_fn=collate)
    module, export_cb = Recurrent(), CompressedExport(tmp_path / "packed")
    fit(module, loader, export_cb)
    assert export_cb.report.parity.passed and export_cb.report.parity.relative_error == 0
    packed, _ = next(iter(loader))
    module.eval()
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "packed", Recurrent(), backend="dequantize")(packed), module(packed))


def test_a_user_input_fn_that_does_not_fit_forward_fails_before_training_naming_it(tmp_path):
    export_cb = CompressedExport(tmp_path / "packed", input_fn=lambda batch: batch[0])
    with pytest.raises(ArgumentError, match=r"^input_fn made 2 positional inputs \(tensor\[4, 8\], tensor\[4, 4\]\) from"
                                            r" the batch \[\[tensor\[4, 8\], tensor\[4, 4\]\], tensor\[4\]\], but"
                                            r" TupleForward.forward\(pair\) cannot take them \(too many positional"
                                            r" arguments\).*input_fn=lambda batch: \(batch\[0\],\)") as caught:
        fit(TupleForward(), pairs(nested=True), export_cb)
    assert caught.value.argument == "input_fn" and Steps.count == 0


def test_a_keyword_only_input_the_default_cannot_pass_fails_naming_input_fn(tmp_path, seeded):
    export_cb = CompressedExport(tmp_path / "packed")
    with pytest.raises(ArgumentError, match=r"^the default input_fn made one input tensor\[4, 8\] from the batch"
                                            r" \[tensor\[4, 8\], tensor\[4, 4\], tensor\[4\]\], but"
                                            r" KeywordOnly.forward\(image, \*, meta\) cannot take them \(missing a"
                                            r" required (keyword-only )?argument: 'meta'\).*input_fn=lambda batch: \{'image': batch\[0\],"
                                            r" 'meta': batch\[1\]\}; in a recipe: export.input_fn") as caught:
        fit(KeywordOnly(), pairs(nested=False), export_cb)
    assert caught.value.argument == "input_fn" and Steps.count == 0
    # The input_fn the message gives exports the model.
    export_cb = CompressedExport(tmp_path / "packed", input_fn=lambda batch: {"image": batch[0], "meta": batch[1]})
    fit(KeywordOnly(), pairs(nested=False), export_cb)
    assert export_cb.report.parity.passed and Steps.count == 2


def test_a_forward_taking_varargs_that_fails_on_the_guess_names_input_fn(tmp_path, seeded):
    """``forward(*args)`` binds any inputs, so the default's guess (the first element) is
    only found wrong inside it; that TypeError becomes the ArgumentError, before training."""
    export_cb = CompressedExport(tmp_path / "packed")
    with pytest.raises(ArgumentError, match=r"^VarArgs.forward\(\*args\) takes \*args, so the default input_fn cannot"
                                            r" tell .* it passed one input tensor\[4, 8\] from the batch .* the forward"
                                            r" raised TypeError: .*missing 1 required positional argument: 'meta'.*"
                                            r"input_fn=lambda batch: \(batch\[0\], batch\[1\]\)") as caught:
        fit(VarArgs(), pairs(nested=False), export_cb)
    assert caught.value.argument == "input_fn" and isinstance(caught.value.__cause__, TypeError)
    assert Steps.count == 0
    export_cb = CompressedExport(tmp_path / "packed", input_fn=lambda batch: (batch[0], batch[1]))
    fit(VarArgs(), pairs(nested=False), export_cb)
    assert export_cb.report.parity.passed and Steps.count == 2


def test_a_type_error_inside_a_forward_that_takes_its_inputs_is_left_alone(tmp_path):
    class Broken(TupleForward):
        def forward(self, pair):
            return self.net(*pair) + "oops"

    with pytest.raises(TypeError, match="unsupported operand") as caught:
        fit(Broken(), pairs(nested=True), CompressedExport(tmp_path / "packed"))
    assert not isinstance(caught.value, ArgumentError) and Steps.count == 0


class RefusesWideBatches(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x, scale=None):
        if scale is not None and scale.dim() > 1:
            raise RuntimeError("scale must be a vector")
        return self.fc(x)


def test_a_model_that_cannot_run_on_the_inputs_is_not_blamed_on_the_packed_files(tmp_path):
    """The model's own forward raised on ``inputs``: its error as it is, with a note of how
    forward bound the inputs, and nothing written or kept as a failed export (it said "the
    check of the packed files failed" and kept them in a .failed-parity folder)."""
    model = RefusesWideBatches()
    round_to_nearest(model, QuantSpec(8, "channel"))
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match=r"^scale must be a vector") as caught:
        export(model, tmp_path / "out", inputs=[(x,), (x, x)])
    assert caught.value.__notes__ == [
        "RefusesWideBatches.forward raised this on the export's inputs[1] as x=tensor[2, 8], scale=tensor[2, 8]. The"
        " export checks the packed model on these inputs (CompressedExport: what `input_fn` returns); if they are not"
        " what forward takes, pass inputs it takes, positionally in its order with None for the parameters between"
        " them, or as keywords"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- the batches of the check at fit end
def test_a_bf16_true_run_checks_its_export_on_inputs_in_the_dtype_the_steps_get(tmp_path, seeded):
    """``precision="bf16-true"`` casts float inputs for every step; the check at the end of
    fit takes its batches from the loader, and fed them as float32 to bfloat16 layers
    ("mat1 and mat2 must have the same dtype"), so the trained run was not exported."""
    module = TwoInputs()
    export_cb = CompressedExport(tmp_path / "packed")
    make_trainer(max_steps=4, precision="bf16-true",
                 callbacks=[QuantizationAwareTraining("int4", group_size=16), export_cb]).fit(
        module, two_input_loader(4, 0), two_input_loader(2, 1))
    assert export_cb.report.parity.passed and export_cb.report.parity.relative_error == 0.0
    x, context, _ = next(iter(two_input_loader(1, seed=2)))
    module.eval()
    with torch.no_grad():
        fake_quant = module(x.bfloat16(), context.bfloat16())
        packed = load_packed(tmp_path / "packed", TwoInputs().bfloat16())(x.bfloat16(), context.bfloat16())
    assert fake_quant.dtype == packed.dtype == torch.bfloat16 and torch.equal(fake_quant, packed)


class MakesATensor(TwoInputs):
    """Its forward makes a tensor (as a positional table is made): in the default dtype,
    which Lightning's "-true" precisions set to the weights' around every step."""

    def forward(self, x, context):
        return super().forward(x * torch.ones(x.shape[-1]), context)


@pytest.mark.parametrize("precision, dtype", [("bf16-true", torch.bfloat16), ("64-true", torch.float64)])
def test_the_export_checks_run_the_forward_under_the_default_dtype_the_steps_ran_under(tmp_path, seeded, precision,
                                                                                        dtype):
    """The dry export (before the first step) and the check at the end ran the forward
    with float32 as the default dtype: torch.ones(16) met bfloat16 weights ("mat1 and
    mat2 must have the same dtype"), before training with the dry export, after it
    without (the files then kept aside as unchecked)."""
    module = MakesATensor()
    export_cb = CompressedExport(tmp_path / "packed")
    make_trainer(max_steps=3, precision=precision,
                 callbacks=[QuantizationAwareTraining("int8"), export_cb]).fit(
        module, two_input_loader(3, 0), two_input_loader(2, 1))
    assert export_cb.dry_report is not None and export_cb.report.parity.relative_error == 0.0
    assert torch.get_default_dtype() == torch.float32  # put back
    x, context, _ = next(iter(two_input_loader(1, seed=2)))
    module.eval()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.no_grad():
            expected = module(x.to(dtype), context.to(dtype))
            packed = load_packed(tmp_path / "packed", MakesATensor().to(dtype))(x.to(dtype), context.to(dtype))
    finally:
        torch.set_default_dtype(previous)
    assert packed.dtype == dtype and torch.equal(packed, expected)


def test_the_int8_gemm_probe_does_not_depend_on_the_callers_default_dtype():
    """It is checked once per process: run first under a bfloat16 default (a bf16-true
    model's check), its float tensors were bfloat16 and the kernel stayed off for good."""
    from lightning_compress.formats.int8_gemm import int8_gemm_available, one_token_gemm_available

    for probe in (int8_gemm_available, one_token_gemm_available):
        probe.cache_clear()
        expected = probe()
        probe.cache_clear()
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            assert probe() == expected
        finally:
            torch.set_default_dtype(previous)
        assert torch.get_default_dtype() == previous


class ScalesItsBytes(TwoInputs):
    """The loader yields uint8 rows; ``on_after_batch_transfer`` makes them floats in
    [0, 1] (as image pipelines do on the device): a Linear cannot take the raw batch."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, context, y = batch
        return x.float() / 255, context.float() / 255, y


def byte_loader(batches: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, 256, (batches * 8, 16), generator=generator, dtype=torch.uint8) for _ in range(2)]
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*rows, torch.randn(batches * 8, 4)),
                                       batch_size=8)


def test_the_check_at_fit_end_gets_the_batches_through_the_module_batch_hooks(tmp_path, seeded):
    module = ScalesItsBytes()
    export_cb = CompressedExport(tmp_path / "packed")
    make_trainer(max_steps=4, callbacks=[QuantizationAwareTraining("int4", group_size=16), export_cb]).fit(
        module, byte_loader(4, 0), byte_loader(2, 1))
    parity = export_cb.report.parity
    assert parity.passed and parity.relative_error is not None and parity.relative_error <= 1e-5


class RaisesOnFiveRows(TwoInputs):
    """Trains on batches of 8; its forward refuses the validation loader's batch of 5."""

    def forward(self, x, context):
        if x.shape[0] == 5:
            raise RuntimeError("no batches of 5")
        return super().forward(x, context)

    def validation_step(self, batch, batch_idx):
        pass


def test_a_model_that_cannot_run_on_the_inputs_at_fit_end_keeps_the_trained_export(tmp_path, seeded):
    """The error may end the process, and the run with it: the packed files are kept in
    <dirpath>.failed-parity (refused by load_packed unless asked) and the error says why
    the check could not run; export() called by hand keeps nothing (test above)."""
    from lightning_compress.formats.errors import ExportError, FailedExportError, PackedFormatError

    module = RaisesOnFiveRows()
    export_cb = CompressedExport(tmp_path / "packed")
    validation = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(5, 16), torch.randn(5, 16), torch.randn(5, 4)), batch_size=5)
    with pytest.raises(ExportError) as caught:
        make_trainer(max_steps=4, callbacks=[QuantizationAwareTraining("int4", group_size=16),
                                                                  export_cb]).fit(
            module, two_input_loader(4, 0), validation)
    kept = tmp_path / "packed.failed-parity"
    message = str(caught.value)
    assert message.startswith("the packed files could not be checked: RuntimeError: no batches of 5.")
    assert "RaisesOnFiveRows.forward raised this on the export's inputs[0]" in message and str(kept) in message
    assert caught.value.directory == kept and not (tmp_path / "packed").exists()
    with pytest.raises(FailedExportError):
        load_packed(kept, TwoInputs())
    with pytest.raises(PackedFormatError, match=r"packed: no such directory; .*packed\.failed-parity holds the files"):
        load_packed(tmp_path / "packed", TwoInputs())
    x, context, _ = next(iter(two_input_loader(1, seed=2)))
    module.eval()
    with pytest.warns(UserWarning), torch.no_grad():
        packed = load_packed(kept, TwoInputs(), allow_failed_parity=True)(x, context)
        assert relative_error(module(x, context), packed) <= 1e-6
