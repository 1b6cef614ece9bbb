"""compressed-tensors exports as vLLM reads them (issue 17, part 3).

A tiny config-built ``LlamaForCausalLM`` in a LightningModule, trained with QAT and exported
by ``CompressedExport(module="model", compressed_tensors=True)``, for each scheme vLLM
serves: W4A16 (int4 group 128, symmetric or asymmetric), W8A16 (int8 group 128) and W8A8
(int8 weights with int8 per-token dynamic or per-tensor static inputs). Checked with the
real libraries:

- compressed-tensors' own pydantic models validate every config we write;
- llm-compressor 0.14 (``tests/data/llmcompressor``: its output for the same float model
  and scheme, written by ``make_reference.py`` in a scratch environment, since it pins
  other transformers/compressed-tensors versions) writes the same ``config.json`` apart
  from version fields and the calibration ``observer``, and tensors of the same names,
  dtypes and shapes; for asymmetric W4A16 the same bytes;
- ``transformers`` (with compressed-tensors) loads the directory and computes the
  fake-quant model, activation quantization included;
- vLLM does not run here (no GPU): :func:`vllm_scheme` mirrors its scheme selection as
  read from its source, and is checked on each config.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import compressed_tensors  # noqa: E402,F401  (a dev dependency: a missing one fails, never skips)
import transformers  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme  # noqa: E402

from lightning_compress import CompressedExport, QuantizationAwareTraining, export  # noqa: E402
from lightning_compress.formats import compressed_tensors as ct  # noqa: E402
from lightning_compress.formats.errors import ExportError  # noqa: E402
from lightning_compress.formats.packed import PackedLayer  # noqa: E402
from lightning_compress.quant.activations import input_quantizer_of  # noqa: E402
from lightning_compress.quant.packing import pack_codes, unpack_codes  # noqa: E402
from lightning_compress.quant.spec import QuantSpec  # noqa: E402
from lightning_compress.quant.weights import quantized_weights, round_to_nearest  # noqa: E402
from tests.conftest import make_trainer  # noqa: E402

REFERENCE = Path(__file__).resolve().parent / "data" / "llmcompressor"
_spec = importlib.util.spec_from_file_location("make_reference", REFERENCE / "make_reference.py")
reference_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference_script)
tiny_llama, tensor_sha256, state_sha256 = (
    reference_script.tiny_llama, reference_script.tensor_sha256, reference_script.state_sha256)

# llm-compressor scheme -> our QAT settings for it, and the vLLM scheme class it selects.
SCHEMES = {
    "W4A16": (dict(weights="int4", group_size=128), "CompressedTensorsWNA16"),
    "W4A16_ASYM": (dict(weights="int4", group_size=128, symmetric=False), "CompressedTensorsWNA16"),
    "W8A16": (dict(weights="int8", group_size=128), "CompressedTensorsWNA16"),
    "W8A8_ASYM_TOKEN": (dict(weights="int8", activations="int8_dynamic"), "CompressedTensorsW8A8Int8"),
    "W8A8_ASYM_STATIC": (dict(weights="int8", activations="int8_static"), "CompressedTensorsW8A8Int8"),
}


def reference(name: str) -> dict:
    return json.loads((REFERENCE / f"{name}.json").read_text())


def comparable(config: dict) -> dict:
    """``config.json`` without what is allowed to differ: version fields, and the
    ``observer`` (llm-compressor's calibration algorithm; ours writes none)."""
    config = json.loads(json.dumps(config))
    config.pop("transformers_version", None)
    quantization = config["quantization_config"]
    quantization.pop("version", None)
    for group in quantization["config_groups"].values():
        for key in ("weights", "input_activations"):
            if group[key] is not None:
                group[key]["observer"] = None
    return config


def validate(quantization: dict) -> dict:
    """compressed-tensors' models on our ``quantization_config``: every field known (its
    ``QuantizationArgs`` forbid extra fields) and typed right; the dump, for comparing."""
    for group in quantization["config_groups"].values():
        QuantizationScheme.model_validate(group)
        for key in ("weights", "input_activations"):
            if group[key] is not None:
                QuantizationArgs(**group[key])
    return QuantizationConfig.model_validate(quantization).model_dump(mode="json")


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float((reference.double() - other.double()).norm() / reference.double().norm())


class CausalLM(LightningModule):
    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.model = tiny_llama().train()
        self.lr = lr

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def token_batches(batches: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader([torch.randint(1, 100, (12,), generator=generator) for _ in range(batches * 4)],
                                       batch_size=4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``scheme -> (module, export directory, report)``, each trained and exported once."""
    runs = {}

    def run(name):
        if name not in runs:
            out = tmp_path_factory.mktemp(name) / "export"
            module = CausalLM()
            qat = QuantizationAwareTraining(**SCHEMES[name][0], exclude=["lm_head"], start_step=0)
            # backend="dequantize": the exact path; our own int8-GEMM loader is not what this file checks.
            export_cb = CompressedExport(out, module="model", compressed_tensors=True, backend="dequantize")
            make_trainer(max_steps=3, callbacks=[qat, export_cb]).fit(module, token_batches(3, seed=0))
            runs[name] = (module, out, export_cb.report)
        return runs[name]

    return run


@pytest.mark.parametrize("name", list(SCHEMES))
def test_config_and_tensors_are_what_llm_compressor_writes(trained, name):
    _, out, report = trained(name)
    assert report.compressed_tensors and report.parity.passed and report.parity.relative_error == 0.0
    # lm_head excluded: every group is a scheme vLLM serves (asymmetric: transformers' refusal noted)
    assert [note for note in report.notes if "refuses packed zero points" not in note] == []
    ours = json.loads((out / "config.json").read_text())
    theirs = reference(name)
    validate(ours["quantization_config"])
    assert comparable(ours) == comparable(theirs["config"])
    assert validate(comparable(ours)["quantization_config"]) == validate(comparable(theirs["config"])["quantization_config"])
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        layout = {key: [str(f.get_tensor(key).dtype).removeprefix("torch."), list(f.get_tensor(key).shape)]
                  for key in f.keys()}
    assert layout == {key: entry[:2] for key, entry in theirs["tensors"].items()}
    for group in ours["quantization_config"]["config_groups"].values():
        assert ct.vllm_scheme(group) == SCHEMES[name][1]


def test_our_w8a8_differs_from_the_preset_only_in_the_inputs_symmetry(trained):
    """llm-compressor's ``W8A8`` preset quantizes inputs symmetrically; QAT's activation
    quantizers are asymmetric, and the config says so (vLLM serves both)."""
    _, out, _ = trained("W8A8_ASYM_TOKEN")
    ours = comparable(json.loads((out / "config.json").read_text()))
    preset = comparable(reference("W8A8")["config"])
    inputs = preset["quantization_config"]["config_groups"]["group_0"]["input_activations"]
    assert (inputs["symmetric"], inputs["zp_dtype"]) == (True, None)
    inputs.update(symmetric=False, zp_dtype="torch.int8")
    assert ours == preset
    assert ct.vllm_scheme(reference("W8A8")["config"]["quantization_config"]["config_groups"]["group_0"]) == (
        "CompressedTensorsW8A8Int8")


def input_code_differences(model: nn.Module, loaded: nn.Module, ids: torch.Tensor) -> int:
    """Each quantized layer's input, as our model gets it, quantized by QAT and by the
    loaded layer (compressed-tensors): the count of values that differ, each asserted to
    be an exact tie (x / scale = k + 0.5), where compressed-tensors rounds ``x / scale +
    zero_point`` half to even and QAT (like vLLM's int8 kernels) rounds ``x * (1 / scale)``
    before adding the zero point: with an odd zero point the two pick neighbouring codes."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

    inputs, handles = {}, []
    for name, layer in model.named_modules():
        if input_quantizer_of(layer) is not None:
            store = (lambda key: lambda module, args: inputs.__setitem__(key, args[0].detach().clone()))(name)
            handles.append(layer.register_forward_pre_hook(store, prepend=True))  # before QAT quantizes it
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    differing = 0
    for name, x in inputs.items():
        layer, theirs = loaded.get_submodule(name), loaded.get_submodule(name).quantization_scheme.input_activations
        with torch.no_grad():
            ours = input_quantizer_of(model.get_submodule(name))(x, model.get_submodule(name))
            quantized = forward_quantize(layer, x, "input", theirs)
            scale = compute_dynamic_scales_and_zp(x, theirs, layer)[0] if theirs.dynamic else layer.input_scale
        ratio = (x / scale)[ours != quantized]
        assert torch.all((ratio - ratio.floor() - 0.5).abs() <= 1e-4), (name, ratio)
        differing += ratio.numel()
    return differing


@pytest.mark.parametrize("name", ["W4A16", "W8A16", "W8A8_ASYM_TOKEN", "W8A8_ASYM_STATIC"])
def test_transformers_computes_the_fake_quant_model(trained, name):
    """``AutoModelForCausalLM`` runs the weights we trained and applies the input
    quantization the config describes (switched off, the logits move): weight-only, the
    logits are ours exactly; with int8 inputs each layer quantizes the same input to the
    same codes but at exact ties (see :func:`input_code_differences`), and a code one step
    away early on moves later static ranges' codes too."""
    module, out, _ = trained(name)
    model = module.model.eval()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    errors, ties = [], 0
    for seed in (5, 6):
        ids = next(iter(token_batches(1, seed=seed)))
        with torch.no_grad():
            errors.append(relative_error(model(input_ids=ids).logits, loaded(input_ids=ids).logits))
        if "W8A8" in name:
            ties += input_code_differences(model, loaded, ids)
    for layer_name, q in quantized_weights(model).items():  # decompressed by the first forward
        assert torch.equal(loaded.get_submodule(layer_name).weight, q.dequantize()), layer_name
    if "W8A8" not in name:
        assert errors == [0.0, 0.0]
        return
    # Measured: dynamic 0.0 and 0.0 (no tie); static 3.0e-3 (one tie in 12,288 inputs of a
    # layer-0 down_proj) and 0.0.
    assert max(errors) <= 1e-2 and ties <= 4
    assert max(errors) == 0.0 or ties > 0
    ids = next(iter(token_batches(1, seed=5)))
    quantized_inputs = [m for m in loaded.modules() if getattr(m, "quantization_scheme", None) is not None]
    assert len(quantized_inputs) == 14 and all(m.quantization_scheme.input_activations for m in quantized_inputs)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        for layer in quantized_inputs:
            layer.quantization_enabled = False
        assert relative_error(ours, loaded(input_ids=ids).logits) > 5e-3  # measured 0.8% (dynamic), 1.5% (static)


def test_asymmetric_w4a16_decompresses_in_compressed_tensors_but_not_in_this_transformers(trained):
    """The packed zero points vLLM reads: compressed-tensors' own decompressor gives our
    dequantized weights; transformers 5.24 refuses them (a size mismatch), which the
    export says. 5.0, the floor `make test-min` installs, loads the directory and fails
    at the first forward (its decompression hook reads the zero points as int8). 5.17
    ran them: where one does, the loaded model must compute the fake-quant model's logits."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from safetensors.torch import load_file

    module, out, report = trained("W4A16_ASYM")
    assert len(report.notes) == 1 and "transformers 5.24 (tested here) refuses packed zero points" in report.notes[0]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme.model_validate(config["config_groups"]["group_0"])
    tensors = load_file(out / "model.safetensors")
    for name, q in quantized_weights(module.model).items():
        state = {key.removeprefix(f"{name}."): tensor for key, tensor in tensors.items() if key.startswith(f"{name}.")}
        assert torch.equal(PackedQuantizationCompressor.decompress(state, scheme)["weight"], q.dequantize()), name
    ids = torch.randint(0, module.model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    try:
        with torch.no_grad():
            logits = transformers.AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
    except (RuntimeError, ValueError) as error:
        assert "ignore_mismatched_sizes" in str(error) or "Expected torch.int32 but got torch.int8" in str(error)
        return
    with torch.no_grad():
        assert relative_error(module.model.eval()(input_ids=ids).logits, logits) <= 1e-5


@pytest.mark.parametrize("name, spec", [("W4A16_ASYM", QuantSpec(4, "group", 128, symmetric=False)),
                                        ("W4A16", QuantSpec(4, "group", 128)), ("W8A16", QuantSpec(8, "group", 128))])
def test_round_to_nearest_codes_are_llm_compressors_but_at_exact_ties(tmp_path, name, spec):
    """Values, on the float model llm-compressor quantized: asymmetric W4A16 is the same
    bytes. Symmetric scales are the same, and a code differs by one step only at a tie,
    mostly where the weight is its group's -max (x / scale = -7.5 exactly): llm-compressor
    divides (-7.5 rounds half to even, to -8), QAT multiplies by the reciprocal as torchao
    does (-7.4999995, to -7). compressed-tensors' ``quantize`` on our scales gives
    llm-compressor's bytes exactly."""
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from safetensors.torch import load_file

    theirs = reference(name)
    model = tiny_llama()
    assert state_sha256(model.state_dict()) == theirs["float_sha256"], "torch/transformers built another float model"
    floats = {name: layer.weight.detach().clone() for name, layer in model.named_modules() if isinstance(layer, nn.Linear)}
    round_to_nearest(model, spec, targets=[nn.Linear], exclude=["lm_head"])
    export(model, tmp_path / "hf", compressed_tensors=True)
    ours = load_file(tmp_path / "hf" / "model.safetensors")
    same = {key for key, tensor in ours.items() if tensor_sha256(tensor) == theirs["tensors"][key][2]}
    if not spec.symmetric:
        assert same == set(ours)
        return
    assert {key for key in ours if key.endswith("weight_scale")} <= same
    args = QuantizationArgs(**ct.quantization_args(spec.bits, True, "group", spec.group_size))
    ties = 0
    for layer, q in quantized_weights(model).items():
        key = f"{layer}.weight_packed"
        codes = quantize(floats[layer], ours[f"{layer}.weight_scale"], None, args, dtype=torch.int8)
        assert tensor_sha256(pack_codes(codes, spec.bits)) == theirs["tensors"][key][2], key
        mine = unpack_codes(ours[key], spec.bits, q.shape[1])
        differ = mine != codes
        assert torch.all((mine[differ].int() - codes[differ].int()).abs() == 1)
        ratio = floats[layer].reshape(q.shape[0], -1, spec.group_size) / ours[f"{layer}.weight_scale"].unsqueeze(-1)
        ratio = ratio.reshape(q.shape)[differ]
        assert torch.all((ratio - ratio.floor() - 0.5).abs() <= 1e-5), (layer, ratio)
        ties += int(differ.sum())
    assert ties > 0  # measured: 213 (int4) and 228 (int8) of 294,912 codes


def test_bert_dynamic_inputs_match_except_where_transformers_quantizes_2d_inputs_per_tensor(tmp_path):
    """compressed-tensors (transformers) reduces a ``token`` range over the dimensions
    after the first two: a 2-D input ``[batch, hidden]`` (BERT's pooler and classifier)
    gets one range for the whole batch, not one per token as QAT trained (and as vLLM,
    which flattens inputs to ``[tokens, hidden]``, computes). The encoder (3-D inputs) is exact."""
    from tests.test_hf_export import SequenceClassifier, dict_batches

    module = SequenceClassifier()
    export_cb = CompressedExport(tmp_path / "hf", module="model", compressed_tensors=True, backend="dequantize")
    qat = QuantizationAwareTraining("int8", activations="int8_dynamic", start_step=0)
    make_trainer(max_steps=3, callbacks=[qat, export_cb]).fit(module, dict_batches(3, seed=0))
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    model = module.model.eval()
    batch = next(iter(dict_batches(1, seed=2)))
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits = relative_error(model(**inputs).logits, loaded(**inputs).logits)  # decompresses the weights first
        assert relative_error(model.bert(**inputs).last_hidden_state, loaded.bert(**inputs).last_hidden_state) <= 1e-4
    assert 0 < logits <= 2e-2  # measured 5.2e-3


# ---------------------------------------------------------------------- what vLLM would not serve
def test_vllm_scheme_mirrors_its_selection():
    w8 = ct.quantization_args(8, True, "channel")
    token, tensor = ct.input_args("int8_dynamic"), ct.input_args("int8_static")
    group = lambda weights, inputs, layout: {"weights": weights, "input_activations": inputs, "format": layout}  # noqa: E731
    assert ct.vllm_scheme(group(w8, token, "int-quantized")) == "CompressedTensorsW8A8Int8"
    assert ct.vllm_scheme(group(w8, tensor, "int-quantized")) == "CompressedTensorsW8A8Int8"
    assert ct.vllm_scheme(group(w8, None, "pack-quantized")) == "CompressedTensorsWNA16"
    assert ct.vllm_scheme(group(w8, None, "int-quantized")) is None  # vLLM asserts float weights there
    asymmetric8 = ct.quantization_args(8, False, "channel")
    assert ct.vllm_scheme(group(asymmetric8, token, "int-quantized")) is None  # W8A8 needs symmetric weights
    int4 = ct.quantization_args(4, True, "group", 128)
    assert ct.vllm_scheme(group(int4, token, "pack-quantized")) is None  # W4A8-int: not in this layout
    assert ct.vllm_scheme(group(ct.quantization_args(3, True, "channel"), None, "pack-quantized")) is None
    assert ct.vllm_scheme(group(ct.quantization_args(4, True, "tensor"), None, "pack-quantized")) is None


def test_export_notes_what_vllm_would_not_serve(tmp_path):
    """QAT's default targets quantize ``lm_head``, which vLLM loads as a float weight; an
    int4 layer with int8 inputs (W4A8) is written as trained, and noted."""
    model = tiny_llama()
    round_to_nearest(model, QuantSpec(4, "group", 32), targets=[nn.Linear])
    report = export(model, tmp_path / "hf", compressed_tensors=True)
    assert report.compressed_tensors and any("lm_head" in note and "vLLM" in note for note in report.notes)
    w4a8 = {"model.layers.0.mlp.up_proj": PackedLayer(next(iter(quantized_weights(model).values())), "Linear",
                                                      "int8_dynamic")}
    config = ct.quantization_config(w4a8, model)
    group = config["config_groups"]["group_0"]
    assert group["format"] == "pack-quantized" and group["input_activations"]["strategy"] == "token"
    validate(config)
    assert any("no scheme" in note and "int8 dynamic per-token inputs" in note
               for note in ct.vllm_notes(config, w4a8, model))


def test_asymmetric_weights_vllm_cannot_read_are_refused(tmp_path):
    model = tiny_llama()
    round_to_nearest(model, QuantSpec(3, "group", 32, symmetric=False), targets=["model.layers.0.mlp.up_proj"])
    with pytest.raises(ExportError, match="asymmetric 3-bit weights load nowhere.*compressed_tensors=False"):
        export(model, tmp_path / "hf", compressed_tensors=True)
    report = export(model, tmp_path / "auto")  # the default writes our format only, and says why
    assert not report.compressed_tensors and "asymmetric 3-bit" in report.notes[0]
