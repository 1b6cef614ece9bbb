"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) compressed weight-only (issue 16).

Every weight matrix of a recurrent layer (``weight_ih_l<k>``, ``weight_hh_l<k>``, their
``_reverse`` twins, an LSTM's projection ``weight_hr_l<k>``) is targeted by QAT and pruning
on its own grid and mask, packed, and loaded back dequantized. References: torchao's fake
quantizer, weight counts written out by hand, and onnxruntime run directly.
"""

from __future__ import annotations

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lightning_compress import CompressedExport, MagnitudePruning, QuantizationAwareTraining, load_packed
from lightning_compress._torchao import import_torchao
from lightning_compress.core.targeting import select_layers
from lightning_compress.formats.errors import ExportError, PackedFormatError
from lightning_compress.formats.packed import METADATA_FILE, WEIGHTS_FILE, metadata_bytes
from lightning_compress.quant.weights import DEFAULT_TARGET_TYPES, QUANTIZABLE_TYPES
from tests.conftest import make_trainer

torchao_qat = import_torchao("torchao.quantization.qat")
VOCAB, WIDTH, HIDDEN, PROJ, LENGTH = 32, 16, 32, 16, 10
LSTM_WEIGHTS = [f"rnn.weight_{kind}_l{layer}{suffix}" for layer in (0, 1) for suffix in ("", "_reverse")
                for kind in ("ih", "hh", "hr")]
LSTM_NO_PROJ = [name for name in LSTM_WEIGHTS if "_hr_" not in name]


class RecurrentLM(pl.LightningModule):
    """Embedding -> 2-layer bidirectional recurrent layer -> Linear head over the vocabulary."""

    def __init__(self, kind: str = "LSTM", proj_size: int = PROJ) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        extra = {"proj_size": proj_size} if kind == "LSTM" else {}
        self.rnn = getattr(nn, kind)(WIDTH, HIDDEN, num_layers=2, batch_first=True, bidirectional=True, **extra)
        self.head = nn.Linear(2 * (proj_size or HIDDEN if kind == "LSTM" else HIDDEN), VOCAB)

    def forward(self, tokens):
        return self.head(self.rnn(self.embed(tokens))[0])

    def training_step(self, batch, batch_idx):
        tokens, target = batch
        return F.cross_entropy(self(tokens).reshape(-1, VOCAB), target.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def token_loader(seed: int = 0, batches: int = 6, batch_size: int = 8):
    tokens = torch.randint(0, VOCAB, (batches * batch_size, LENGTH + 1), generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:]),
                                       batch_size=batch_size)


def int4_g16(weight):
    """torchao's symmetric int4 fake quantization, groups of 16 along the input."""
    return torchao_qat.IntxFakeQuantizer(torchao_qat.IntxFakeQuantizeConfig(torch.int4, group_size=16))(weight)


def run_onnxruntime(path, inputs):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {spec.name: x.numpy() for spec, x in zip(session.get_inputs(), inputs)}
    return torch.from_numpy(np.asarray(session.run(None, feeds)[0]))


def sqnr_db(reference, other):
    reference, other = reference.double().flatten(), other.double().flatten()
    return float(20 * torch.log10(reference.norm() / (reference - other).norm()))


def test_every_weight_matrix_of_a_recurrent_layer_is_a_target():
    """The recurrent types are default targets, one entry per weight matrix (no biases)."""
    assert {nn.LSTM, nn.GRU, nn.RNN} <= set(DEFAULT_TARGET_TYPES) & set(QUANTIZABLE_TYPES)
    selected = select_layers(RecurrentLM("LSTM"), targets=None, exclude=None, supported=QUANTIZABLE_TYPES,
                             default=DEFAULT_TARGET_TYPES)
    assert list(selected) == LSTM_WEIGHTS + ["head"]
    gru = select_layers(RecurrentLM("GRU"), targets=["rnn"], exclude=None, supported=QUANTIZABLE_TYPES,
                        default=DEFAULT_TARGET_TYPES)
    assert list(gru) == LSTM_NO_PROJ
    with pytest.raises(ValueError, match="selects no layer"):
        select_layers(RecurrentLM("RNN"), targets=[nn.RNN], exclude=["rnn"], supported=QUANTIZABLE_TYPES,
                      default=DEFAULT_TARGET_TYPES)


def test_int4_sparse_lstm_lm_packs_its_recurrent_weights(tmp_path):
    """int4 g16 + 50% pruning + dynamic int8 activations on the head: every LSTM matrix is
    pruned, on torchao's int4 grid, in the packed file (which is about 1/7 of float32),
    in the ONNX file's numbers, and reloads to the fake-quant model's outputs exactly."""
    pl.seed_everything(0, verbose=False)
    model = RecurrentLM("LSTM", proj_size=0)  # PyTorch's ONNX export refuses LSTM projections
    pruning = MagnitudePruning(0.5, start_step=0, end_step=4, update_every=2)
    qat = QuantizationAwareTraining("int4", group_size=16, activations="int8_dynamic", start_step=4)
    exporter = CompressedExport(tmp_path / "packed", formats=["safetensors", "onnx"], parity_batches=2,
                                input_fn=lambda batch: (batch[0],))
    make_trainer(callbacks=[pruning, qat, exporter], max_steps=8).fit(model, token_loader())

    parity = exporter.report.parity
    assert parity.passed and parity.weights_exact and parity.relative_error == 0.0
    metadata = json.loads((tmp_path / "packed" / METADATA_FILE).read_text())
    parameters = dict(model.named_parameters())
    loaded = load_packed(tmp_path / "packed", RecurrentLM("LSTM", proj_size=0))
    for key in LSTM_NO_PROJ:
        entry = metadata["layers"][key]
        assert (entry["module"], entry["param"], entry["bits"], entry["group_size"]) == \
            ("LSTM", key.split(".")[1], 4, 16)
        assert "activations" not in entry or entry["activations"] is None  # weight-only
        raw = parameters[key].detach()
        assert int((raw == 0).sum()) == raw.numel() // 2  # each matrix pruned to 50%
        got = getattr(loaded.rnn, key.split(".")[1])
        assert torch.equal(got, int4_g16(raw))
    assert loaded.packed_kernels["rnn"] == "dequantize"

    # Weight bytes, by hand: int4 codes (half a byte each) + a bitmask (an eighth) + one
    # float32 scale per 16 weights = 0.5 + 0.125 + 0.25 bytes a weight, against 4.
    recurrent = sum(parameters[key].numel() for key in LSTM_NO_PROJ)
    stored = load_file(tmp_path / "packed" / WEIGHTS_FILE)
    recurrent_bytes = sum(t.numel() * t.element_size() for name, t in stored.items() if name.startswith("rnn.weight_"))
    assert recurrent_bytes <= recurrent * 0.875 + 8 * len(LSTM_NO_PROJ) * 8  # plus packing words per row
    assert all(stored[f"{key}_packed"].dtype == torch.int32 and key not in stored for key in LSTM_NO_PROJ)

    tokens = next(iter(token_loader(seed=1)))[0]
    model.eval()
    with torch.no_grad():
        expected = model(tokens)
        assert torch.equal(loaded(tokens), expected)
    assert sqnr_db(expected, run_onnxruntime(tmp_path / "packed" / "model.onnx", (tokens,))) >= 35


class TimeMajorTagger(nn.Module):
    """A GRU without ``batch_first``: fed ``[time, batch, features]``, as README's ONNX note says."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(WIDTH, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, steps):
        return self.head(self.rnn(steps)[0])


@pytest.mark.parametrize("dynamic_sequence", [False, True])
def test_a_time_major_models_onnx_graph_takes_other_batches_only_with_dynamic_sequence(tmp_path, dynamic_sequence):
    """Dimension 0 of a time-major input is time: by default the graph takes any number of
    steps but only the example's batch size, and with ``onnx_dynamic_sequence=True``
    both. Checked in onnxruntime against PyTorch, at lengths and batch sizes other than
    the example's (10 x 4)."""
    from lightning_compress import export
    from lightning_compress.quant import round_to_nearest
    from lightning_compress.quant.spec import QuantSpec

    torch.manual_seed(0)
    model = TimeMajorTagger()
    round_to_nearest(model, QuantSpec(4, "group", 16), targets=[nn.Linear])
    export(model, tmp_path / "out", inputs=[torch.randn(LENGTH, 4, WIDTH)], formats=["safetensors", "onnx"],
           onnx_dynamic_sequence=dynamic_sequence)
    for shape in [(LENGTH, 4), (LENGTH + 3, 4), (LENGTH, 3), (LENGTH - 4, 2)]:
        steps = torch.randn(*shape, WIDTH)
        if shape[1] != 4 and not dynamic_sequence:
            with pytest.raises(Exception, match=r"(?s)Got invalid dimensions.*index: 1 Got: \d Expected: 4"):
                run_onnxruntime(tmp_path / "out" / "model.onnx", (steps,))
            continue
        with torch.no_grad():
            expected = model(steps)
        assert sqnr_db(expected, run_onnxruntime(tmp_path / "out" / "model.onnx", (steps,))) >= 35


def test_onnx_refusal_of_lstm_projections_is_one_line_and_nothing_is_written(tmp_path):
    """PyTorch cannot export an LSTM with ``proj_size`` to ONNX: ``export`` says so in one
    line (the exporter's message goes on with the whole traced graph) and writes nothing:
    the packed files are not at fault, so none are kept aside as a failed check's are. (In a
    Trainer the compatibility check names it before training: see below.)"""
    from lightning_compress import export
    from lightning_compress.quant.spec import QuantSpec
    from lightning_compress.quant.weights import round_to_nearest

    pl.seed_everything(0, verbose=False)
    model = RecurrentLM("LSTM")
    round_to_nearest(model, QuantSpec(bits=8))
    tokens = torch.randint(0, VOCAB, (2, LENGTH))
    with pytest.raises(ExportError, match=r"^PyTorch's ONNX exporter cannot export this model: Unsupported: ONNX"
                                         r" export of operator LSTM, LSTMs with projections\. Leave 'onnx' out of"
                                         r" `formats` [^\n]*$"):
        export(model, tmp_path / "packed", inputs=[tokens], formats=["safetensors", "onnx"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_static_int8_activations_pass_parity_with_gru_and_rnn(tmp_path, kind):
    """int8 weights with static int8 activations (calibrated on the head while training);
    the recurrent layer is weight-only: no input quantizer on it, exact parity."""
    pl.seed_everything(0, verbose=False)
    model = RecurrentLM(kind)
    qat = QuantizationAwareTraining("int8", activations="int8_static", start_step=2)
    exporter = CompressedExport(tmp_path / "packed", formats=["safetensors", "onnx"], parity_batches=2,
                                input_fn=lambda batch: (batch[0],))
    make_trainer(callbacks=[qat, exporter], max_steps=6).fit(model, token_loader())
    assert exporter.report.parity.passed and exporter.report.parity.relative_error <= 1e-5
    metadata = json.loads((tmp_path / "packed" / METADATA_FILE).read_text())
    recurrent = [key for key in metadata["layers"] if key.startswith("rnn.")]
    assert len(recurrent) == 8 and all(metadata["layers"][key]["bits"] == 8 for key in recurrent)
    assert metadata["layers"]["head"]["activations"] == "int8_static"
    stored = load_file(tmp_path / "packed" / WEIGHTS_FILE)
    assert "rnn.input_scale" not in stored and stored["head.input_scale"].item() > 0
    tokens = next(iter(token_loader(seed=1)))[0]
    model.eval()
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "packed", RecurrentLM(kind), backend="dequantize")(tokens), model(tokens))
        # From a factory (the model built on the meta device): the recurrent weights are made on the CPU.
        built = load_packed(tmp_path / "packed", lambda: RecurrentLM(kind), backend="dequantize")
        assert {p.device.type for p in built.parameters()} == {"cpu"}
        assert torch.equal(built(tokens), model(tokens))


def test_weight_bits_logged_count_the_recurrent_weights():
    """``qat/weight_bits`` is the mean over every quantized weight, the LSTM's included:
    int4 on the recurrent matrices, int8 on the head, weighted by their sizes."""
    pl.seed_everything(0, verbose=False)
    model = RecurrentLM("LSTM")
    logged = {}

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            logged.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    qat = QuantizationAwareTraining("int4", group_size=16, overrides={"head": {"weights": "int8"}})
    make_trainer(callbacks=[qat, Record()], max_steps=1).fit(model, token_loader())
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    recurrent = sum(sizes[key] for key in LSTM_WEIGHTS)
    expected = (4 * recurrent + 8 * sizes["head.weight"]) / (recurrent + sizes["head.weight"])
    assert logged["qat/weight_bits"] == pytest.approx(expected)


def test_resume_continues_the_recurrent_masks_and_grids(tmp_path):
    """A run stopped after its first epoch and resumed ends bit-exact with one that was
    not stopped: every recurrent matrix's mask and learned int4 scales are in the checkpoint."""
    def run(epochs, ckpt_path=None, save=None):
        pl.seed_everything(0, verbose=False)
        model = RecurrentLM("GRU")
        callbacks = [MagnitudePruning(0.5, start_step=0, end_step=6, update_every=2),
                     QuantizationAwareTraining("int4", group_size=16, learn_ranges=True, start_step=2)]
        trainer = make_trainer(callbacks=callbacks, max_epochs=epochs)
        trainer.fit(model, token_loader(batches=4), ckpt_path=ckpt_path)
        if save:
            trainer.save_checkpoint(save)
        return model, trainer

    straight, _ = run(2)
    run(1, save=tmp_path / "epoch1.ckpt")
    state = torch.load(tmp_path / "epoch1.ckpt", weights_only=True)["callbacks"]
    saved = {key for entry in state.values() for key in entry.get("masks", entry.get("layers", {}))}
    assert saved == set(LSTM_NO_PROJ) | {"head"}
    resumed, trainer = run(2, ckpt_path=tmp_path / "epoch1.ckpt")
    assert trainer.global_step == 8
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert int((resumed.rnn.weight_hh_l1 == 0).sum()) == resumed.rnn.weight_hh_l1.numel() // 2


def test_a_recurrent_entry_must_name_its_own_weight(tmp_path):
    """A packed entry for a recurrent weight is keyed ``<layer>.<param>``: a file whose key
    and param disagree is refused, naming the param."""
    pl.seed_everything(0, verbose=False)
    model = RecurrentLM("RNN")
    from lightning_compress import export
    from lightning_compress.quant.spec import QuantSpec
    from lightning_compress.quant.weights import round_to_nearest

    round_to_nearest(model, QuantSpec(bits=8), targets=[nn.RNN])
    export(model, tmp_path / "out", inputs=[torch.randint(0, VOCAB, (2, LENGTH))])
    metadata_path = tmp_path / "out" / METADATA_FILE
    metadata = json.loads(metadata_path.read_text())
    metadata.pop("metadata_sha256", None)
    metadata["layers"]["rnn.weight_ih_l0"]["param"] = "weight_hh_l0"
    metadata_path.write_bytes(metadata_bytes(metadata))  # with its checksum: well-formed, but wrong
    with pytest.raises(PackedFormatError, match="unknown param"):
        load_packed(tmp_path / "out", RecurrentLM("RNN"), backend="dequantize")


def test_the_exclude_a_compatibility_error_suggests_names_single_matrices_and_works(tmp_path):
    """group_size 32 does not divide the 16 inputs of the first GRU layer's two input
    matrices: the one error before training names both weight keys, and the `exclude` it
    suggests (those keys) trains, leaving exactly those matrices in float."""
    from lightning_compress import IncompatibleSettings

    pl.seed_everything(0, verbose=False)
    with pytest.raises(IncompatibleSettings) as error:
        make_trainer(callbacks=[QuantizationAwareTraining("int4", group_size=32)], max_steps=2).fit(
            RecurrentLM("GRU"), token_loader())
    message = str(error.value)
    assert "exclude=['rnn.weight_ih_l0', 'rnn.weight_ih_l0_reverse']" in message
    model = RecurrentLM("GRU")
    qat = QuantizationAwareTraining("int4", group_size=32, exclude=["rnn.weight_ih_l0", "rnn.weight_ih_l0_reverse"])
    make_trainer(callbacks=[qat], max_steps=2).fit(model, token_loader())
    assert sorted(qat.layer_specs) == sorted({*LSTM_NO_PROJ, "head"} - {"rnn.weight_ih_l0", "rnn.weight_ih_l0_reverse"})


def test_onnx_and_lstm_projections_are_named_with_the_other_problems_before_training(tmp_path):
    """An LSTM with proj_size and formats=[..., 'onnx'] is one more problem in the one
    error (beside a group size that does not divide a matrix), not a second run's."""
    from lightning_compress import IncompatibleSettings

    exporter = CompressedExport(tmp_path / "packed", formats=["safetensors", "onnx"], input_fn=lambda batch: (batch[0],))
    trainer = make_trainer(callbacks=[QuantizationAwareTraining("int4", group_size=32), exporter], max_steps=2)
    with pytest.raises(IncompatibleSettings) as error:
        trainer.fit(RecurrentLM("LSTM"), token_loader())
    message = str(error.value)
    assert ("CompressedExport(formats=['safetensors', 'onnx']) cannot be used with this model: the exported model"
            " holds the LSTM layer 'rnn' with proj_size > 0") in message  # one setting, not two "used together"
    assert "rnn.weight_ih_l0" in message  # the group-size problem, in the same message
    assert trainer.global_step == 0 and not (tmp_path / "packed").exists()


def test_layer_table_and_inspect_give_each_recurrent_matrix_its_own_grid(tmp_path, capsys):
    """Half the LSTM's matrices at int8 g8, the rest int4 g16, all 50% pruned: the fit's layer
    table has one row per matrix with its own grid and sparsity, and `inspect` of the
    checkpoint reads each matrix's bits (it showed 32 for all, and the table one row)."""
    from lightning_compress.cli import main
    from tests.test_pruning_callback import TableLogger

    pl.seed_everything(0, verbose=False)
    model, logger = RecurrentLM("GRU"), TableLogger()
    qat = QuantizationAwareTraining("int4", group_size=16, start_step=0, overrides={"rnn.weight_hh*": {"weights": "int8",
                                                                                                   "group_size": 8}})
    trainer = make_trainer(callbacks=[MagnitudePruning(0.5, start_step=0, end_step=1), qat], max_steps=2, logger=logger)
    trainer.fit(model, token_loader())
    columns, rows = logger.tables["compression/layers"]
    table = {row[0]: dict(zip(columns, row)) for row in rows}
    gru = [f"rnn.weight_{kind}_l{layer}{suffix}" for layer in (0, 1) for suffix in ("", "_reverse") for kind in ("ih", "hh")]
    assert sorted(table) == sorted(gru + ["head"])
    for key in gru:
        expected = (8, "g8") if "_hh_" in key else (4, "g16")
        assert (table[key]["weight_bits"], table[key]["granularity"]) == expected, key
        inputs = HIDDEN if "_hh_" in key else WIDTH if "_l0" in key else 2 * HIDDEN  # GRU: 3 gates x HIDDEN rows
        assert table[key]["params"] == 3 * HIDDEN * inputs
        assert table[key]["sparsity"] == pytest.approx(0.5, abs=1 / table[key]["params"])
        assert table[key]["type"] == "GRU"

    trainer.save_checkpoint(tmp_path / "run.ckpt")
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "run.ckpt")]) == 0
    printed = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    for key in gru:
        assert printed[f"rnn.{key.split('.')[1]}"][2] == ("8" if "_hh_" in key else "4"), key
    assert printed["head.weight"][2] == "4" and printed["head.bias"][2] == "32"


def test_layer_table_names_the_recurrent_matrices_a_method_left_out():
    """group_size=32 fits the 32-wide inputs of the hidden-to-hidden and second-layer
    matrices, not the 16-wide first-layer inputs: QAT leaves those out (`skip`). Their rows
    say so, in float; the quantized matrices' rows carry no skip (they all did)."""
    from tests.test_pruning_callback import TableLogger

    pl.seed_everything(0, verbose=False)
    model, logger = RecurrentLM("GRU"), TableLogger()
    qat = QuantizationAwareTraining("int4", group_size=32, start_step=0, on_incompatible="skip", targets=[nn.GRU])
    with pytest.warns(UserWarning, match="rnn.weight_ih_l0"):
        make_trainer(callbacks=[qat], max_steps=1, logger=logger).fit(model, token_loader())
    columns, rows = logger.tables["compression/layers"]
    table = {row[0]: dict(zip(columns, row)) for row in rows}
    left_out = {"rnn.weight_ih_l0", "rnn.weight_ih_l0_reverse"}
    assert set(qat.skipped_layers) == left_out
    gru = [f"rnn.weight_{kind}_l{layer}{suffix}" for layer in (0, 1) for suffix in ("", "_reverse") for kind in ("ih", "hh")]
    assert sorted(table) == sorted(gru)
    for key in gru:
        expected = (32, "float", "qat") if key in left_out else (4, "g32", "")
        assert (table[key]["weight_bits"], table[key]["granularity"], table[key]["skipped"]) == expected, key
