"""Loading what comes from disk is safe: adapter files load only adapters, packed
directories only finite, well-formed tensors, and every bad file, metadata entry or
argument ends in the project's own error (never a raw KeyError/TypeError/OverflowError),
checked by hand for each known case and by a hypothesis fuzz of ``load_packed``."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file, save, save_file
from torch import nn

from lightning_compress import (
    AdapterFormatError,
    LoRA,
    LoRAConfig,
    PackedFormatError,
    export,
    load_adapters,
    load_packed,
    save_adapters,
)
from lightning_compress.cli import main
from lightning_compress.core.transforms import Stage, add_input_transform, raw_weight
from lightning_compress.core.validate import ArgumentError
from lightning_compress.distill.teacher import load_teacher
from lightning_compress.formats.inspection import inspect_packed, verify_packed
from lightning_compress.formats.packed import METADATA_FILE, WEIGHTS_FILE, metadata_bytes
from lightning_compress.lora import inject_adapters
from lightning_compress.lora.inject import select_adapter_layers
from lightning_compress.quant.activations import StaticRangeObserver
from lightning_compress.quant.spec import QuantSpec
from lightning_compress.quant.weights import round_to_nearest
from tests.test_lora import Mixed


# ---------------------------------------------------------------------- a real small export
def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16), nn.LayerNorm(16))


def exported_model() -> nn.Module:
    """Every kind of entry once: an int4 asymmetric group layer with static int8
    activations, a bitmask-sparse int8 layer, bitmask-sparse float tensors, dense biases."""
    model = small_model()
    with torch.no_grad():
        raw_weight(model[2])[:, ::2] = 0
        model[3].weight[::2] = 0
    round_to_nearest(model, QuantSpec(4, "group", 16, symmetric=False), targets=["0"])
    round_to_nearest(model, QuantSpec(8), targets=["2"])
    observer = StaticRangeObserver()
    observer.enabled, observer.calibrating = True, False
    observer.low, observer.high = torch.tensor(-2.0), torch.tensor(3.0)
    add_input_transform(model[0], Stage.INPUT_QUANT, observer)
    return model


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "out"
    export(exported_model(), out, inputs=[torch.randn(4, 32)])
    body = json.loads((out / METADATA_FILE).read_text())
    assert body["layers"]["0"]["activations"] == "int8_static" and body["layers"]["2"]["sparsity"] == "bitmask"
    assert body["tensors"]["3.weight"]["sparsity"] == "bitmask"
    return out


@pytest.fixture
def copy(packed_dir, tmp_path) -> Path:
    return Path(shutil.copytree(packed_dir, tmp_path / "copy"))


def _write(directory: Path, body: dict | None = None, weights: bytes | None = None, resign: bool = True) -> None:
    """Write new metadata and/or weights; ``resign`` records the new weights' SHA-256, so
    the reader gets past the checksum to the decoding."""
    if body is None:
        body = json.loads((directory / METADATA_FILE).read_text())
    if weights is not None:
        (directory / WEIGHTS_FILE).write_bytes(weights)
        if resign:
            body["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    (directory / METADATA_FILE).write_bytes(metadata_bytes(body))


def _edit_metadata(directory: Path, change) -> None:
    body = json.loads((directory / METADATA_FILE).read_text())
    change(body)
    _write(directory, body)


def _edit_tensors(directory: Path, change) -> None:
    tensors = load_safetensors((directory / WEIGHTS_FILE).read_bytes())
    change(tensors)
    _write(directory, weights=save(tensors))


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------- 1. adapters load only adapters
def _adapter_dir(tmp_path: Path, **config) -> Path:
    model = Mixed()
    options = dict(r=2, target_modules=["fc"])
    options.update(config)
    config = LoRAConfig(**options)
    inject_adapters(model, config)
    save_adapters(model, tmp_path, config)
    return tmp_path


def _edit_adapter_tensors(directory: Path, change) -> None:
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    change(tensors)
    save_file(tensors, str(directory / "adapter_model.safetensors"))


def _edit_adapter_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "adapter_config.json").read_text())
    config.update(changes)
    (directory / "adapter_config.json").write_text(json.dumps(config))


def _refused_and_untouched(directory: Path, match: str, model: nn.Module | None = None, **kwargs) -> None:
    model = model or Mixed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFormatError, match=match):
        load_adapters(model, directory, **kwargs)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_base_weight_in_the_adapter_file_is_refused_without_modules_to_save(tmp_path):
    directory = _adapter_dir(tmp_path)
    _edit_adapter_tensors(directory, lambda t: t.update({"base_model.model.head.weight": torch.full((3, 16), 7.0)}))
    _refused_and_untouched(directory, r"tensor 'base_model.model.head.weight' is neither a LoRA weight .*"
                                      r"`modules_to_save` of adapter_config.json \(None\); refusing to overwrite")


def test_a_tensor_outside_the_listed_modules_to_save_is_refused(tmp_path):
    directory = _adapter_dir(tmp_path, modules_to_save=["head"])
    _edit_adapter_tensors(directory, lambda t: t.update({"base_model.model.emb.weight": torch.zeros(20, 8)}))
    _refused_and_untouched(directory, r"'base_model.model.emb.weight' is neither .*\['head'\]")


def test_listed_modules_to_save_still_load(tmp_path):
    directory = _adapter_dir(tmp_path, modules_to_save=["head"])
    _edit_adapter_tensors(directory, lambda t: t.update({"base_model.model.head.weight": torch.full((3, 16), 7.0)}))
    model = Mixed()
    load_adapters(model, directory)
    assert torch.equal(model.head.weight, torch.full((3, 16), 7.0))


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda p: _edit_adapter_config(p, target_modules=["conv"]), r"adapter for 'fc', a layer adapter_config.json does not target"),
        (lambda p: _edit_adapter_config(p, target_modules="^(?:conv)$"), r"does not target .*target_modules='\^\(\?:conv\)\$'"),
        (lambda p: _edit_adapter_config(p, exclude_modules=["fc"]), r"does not target .*exclude_modules=\['fc'\]"),
        (lambda p: _edit_adapter_config(p, target_modules="(unclosed"), r"`target_modules` '\(unclosed' is not a valid regular expression"),
        (lambda p: _edit_adapter_config(p, target_modules=5), r"`target_modules` must be a regex, a list"),
        (lambda p: _edit_adapter_config(p, modules_to_save="head"), r"`modules_to_save` must be a list of module names"),
        (lambda p: _edit_adapter_config(p, r=4), r"lora_A of layer 'fc' has shape \(2, 16\), but a rank-4 adapter .* do not belong together"),
        (
            lambda p: _edit_adapter_tensors(p, lambda t: t.update({"base_model.model.fc.lora_A.weight": torch.full((2, 16), float("nan"))})),
            r"lora_A of layer 'fc' holds NaN or Inf",
        ),
        (
            lambda p: _edit_adapter_tensors(p, lambda t: t.update({"base_model.model.fc.lora_B.weight": torch.zeros(16, 2, dtype=torch.int32)})),
            r"lora_B of layer 'fc' is torch.int32",
        ),
        (
            lambda p: _edit_adapter_tensors(p, lambda t: t.update({
                "base_model.model.emb.lora_A.weight": torch.zeros(2, 20), "base_model.model.emb.lora_B.weight": torch.zeros(8, 2)})),
            r"layer 'emb' is a Embedding, whose adapter tensors are named lora_embedding_A/B",
        ),
        (
            lambda p: _edit_adapter_tensors(p, lambda t: t.update({"base_model.model.fc.lora_embedding_A": torch.zeros(2, 16)})),
            r"layer 'fc' has both lora_A/B.weight and lora_embedding_A/B",
        ),
    ],
)
def test_adapter_files_that_do_not_belong_together_are_refused(tmp_path, corrupt, match):
    directory = _adapter_dir(tmp_path)
    corrupt(directory)
    _refused_and_untouched(directory, match)


def test_adapters_for_a_layer_lora_cannot_adapt_are_refused(tmp_path):
    directory = _adapter_dir(tmp_path)
    _edit_adapter_config(directory, target_modules=None)
    _edit_adapter_tensors(directory, lambda t: t.update({
        "base_model.model.norm.lora_A.weight": torch.zeros(2, 16), "base_model.model.norm.lora_B.weight": torch.zeros(16, 2)}))
    model = Mixed()
    model.norm = nn.LayerNorm(16)
    _refused_and_untouched(directory, r"adapter for 'norm', a LayerNorm; LoRA adapts Linear", model)


def test_a_config_with_another_rank_is_refused(tmp_path):
    directory = _adapter_dir(tmp_path)
    _refused_and_untouched(directory, r"the adapters have r=2, the `config` passed has r=4", config=LoRAConfig(r=4))


def test_the_anchored_regex_our_writer_uses_still_loads(tmp_path):
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8)))  # "0" is also a suffix of "1.0"

    model, config = build(), LoRAConfig(r=2, target_modules=["0"], exclude_modules=["1.0"])
    inject_adapters(model, config)
    assert list(dict(model.named_modules())) == ["", "0", "1", "1.0"]
    with torch.no_grad():
        model[0].lora_B.fill_(0.5)
    save_adapters(model, tmp_path, config)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == "^(?:0)$"
    fresh = build()
    load_adapters(fresh, tmp_path)
    x = torch.randn(3, 8)
    torch.testing.assert_close(fresh(x), model(x))


# ---------------------------------------------------------------------- 2. finite scales and tensors
@pytest.mark.parametrize("value", [float("nan"), 0.0, float("inf"), -1.0])
def test_a_bad_static_activation_scale_is_refused(copy, value):
    _edit_tensors(copy, lambda t: t["0.input_scale"].fill_(value))
    with pytest.raises(PackedFormatError, match=r"tensor '0.input_scale' \(the static activation scale\) is .*not a finite positive"):
        load_packed(copy, small_model())


@pytest.mark.parametrize("key, value", [("0.bias", float("nan")), ("2.bias", float("inf")), ("3.weight_values", float("-inf"))])
def test_nan_or_inf_in_any_loaded_tensor_is_refused_naming_it(copy, key, value):
    _edit_tensors(copy, lambda t: t[key].view(-1)[0].fill_(value))
    with pytest.raises(PackedFormatError, match=rf"tensor '{key}' holds NaN or Inf values"):
        load_packed(copy, small_model())
    with pytest.raises(PackedFormatError, match=rf"tensor '{key}' holds NaN or Inf values"):
        verify_packed(copy)


def test_a_tensor_of_another_kind_than_the_models_is_refused(copy):
    _edit_tensors(copy, lambda t: t.update({"0.bias": t["0.bias"].to(torch.int32)}))
    _edit_metadata(copy, lambda body: body["tensors"]["0.bias"].update(dtype="int32"))
    with pytest.raises(PackedFormatError, match=r"tensor '0.bias': the file holds torch.int32, the model's is torch.float32"):
        load_packed(copy, small_model())


# ---------------------------------------------------------------------- 3. no raw tracebacks
@pytest.mark.parametrize(
    "change, match",
    [
        (lambda b: b["tensors"]["3.weight"].update(shape=[10**400]), r"tensor '3.weight' has shape \[1000.*more than model.safetensors can hold"),
        (lambda b: b["tensors"]["3.weight"].update(shape=[-16]), r"tensor '3.weight' has a bad shape \[-16\]"),
        (lambda b: b["layers"]["0"].update(dtype={"a": 1}), r"layer '0' has a bad dtype \{'a': 1\}"),
        (lambda b: b["tensors"]["0.bias"].update(dtype=["float32"]), r"tensor '0.bias' has a bad dtype \['float32'\]"),
        (lambda b: b["layers"]["0"].update(shape=[0, 32]), r"layer '0' has a bad shape \[0, 32\]; expected a list of positive"),
        (lambda b: b["layers"]["2"].pop("kept"), r"layer '2' needs 'kept' of type int, got None"),
        (lambda b: b["aliases"].update(x=[1]), r"alias 'x' points at unknown tensor \[1\]"),
        (lambda b: b["aliases"].update({"0.bias": "2.bias"}), r"alias '0.bias' would replace a stored tensor"),
    ],
)
def test_bad_metadata_is_a_packed_format_error(copy, change, match):
    _edit_metadata(copy, change)
    with pytest.raises(PackedFormatError, match=match):
        load_packed(copy, small_model())


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda b: b["layers"]["0"].update(shape=[0, 64]), r"layer '0' has a bad shape \[0, 64\]"),
        (lambda b: b["layers"]["0"].pop("kept"), r"layer '0' needs 'kept' of type int"),
        (lambda b: b["tensors"]["3.weight"].pop("kept"), r"tensor '3.weight' needs 'kept' of type int"),
        (lambda b: b["tensors"]["0.bias"].pop("sparsity"), r"tensor '0.bias' has unknown sparsity None"),
        (lambda b: b["tensors"]["0.bias"].update(dtype={"x": 1}), r"tensor '0.bias' has a bad dtype"),
        (lambda b: b["layers"]["0"].update(shape=[10**400, 2]), r"layer '0' has shape .* more than model.safetensors can hold"),
        (lambda b: b["layers"].update({"0": [1, 2]}), r"layer '0' entry is not an object"),
    ],
)
def test_inspect_of_bad_metadata_exits_2_with_one_message(copy, capsys, change, match):
    _edit_metadata(copy, change)
    code, out, err = _cli(capsys, "inspect", str(copy))
    assert code == 2 and out == ""
    assert err.startswith("lightning-compress inspect: error: ") and "Traceback" not in err
    assert re.search(match, err), err


def test_inspect_of_a_checkpoint_whose_state_dict_is_a_list(tmp_path, capsys):
    torch.save({"state_dict": [1, 2], "callbacks": [3]}, tmp_path / "list.ckpt")
    code, _, err = _cli(capsys, "inspect", str(tmp_path / "list.ckpt"))
    assert code == 2 and "'state_dict' is a list, not a mapping" in err


def test_inspect_of_a_checkpoint_with_odd_callbacks_and_recipe_still_prints(tmp_path, capsys):
    from lightning_compress.core.state import RECIPE_CHECKPOINT_KEY

    checkpoint = {"state_dict": {"fc.weight": torch.zeros(2, 2), 3: torch.ones(1)}, "callbacks": {
        "QuantizationAwareTraining": {"layers": [1]}}, RECIPE_CHECKPOINT_KEY: {"recipe": [1]}}
    torch.save(checkpoint, tmp_path / "odd.ckpt")
    code, out, _ = _cli(capsys, "inspect", str(tmp_path / "odd.ckpt"))
    assert code == 0 and "fc.weight" in out


class _Student(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)


def test_a_pickle_teacher_checkpoint_is_refused_without_suggesting_unpickling(tmp_path):
    torch.save({"state_dict": _Student().state_dict(), "module": _Student()}, tmp_path / "pickle.ckpt")
    with pytest.raises(ArgumentError, match=r"is not a weights-only Lightning checkpoint") as caught:
        load_teacher(tmp_path / "pickle.ckpt", _Student)
    assert caught.value.argument == "teacher"
    assert "weights_only=False" not in str(caught.value) and "can still be loaded" not in str(caught.value)


@pytest.mark.parametrize(
    "checkpoint, argument, match",
    [
        ({"state_dict": [1]}, "teacher", r"has no 'state_dict' mapping"),
        ({"state_dict": {}, "hyper_parameters": [1]}, "teacher", r"'hyper_parameters' is not a mapping"),
        ({"state_dict": {}, "hyper_parameters": {"width": "wide"}}, "teacher_class", r"cannot be built from the hyperparameters"),
        ({"state_dict": {"fc.weight": torch.zeros(1)}}, "teacher_class", r"does not fit `teacher_class` _Student"),
    ],
)
def test_bad_teacher_checkpoints_name_the_argument(tmp_path, checkpoint, argument, match):
    torch.save(checkpoint, tmp_path / "t.ckpt")
    with pytest.raises(ArgumentError, match=match) as caught:
        load_teacher(tmp_path / "t.ckpt", _Student)
    assert caught.value.argument == argument


def test_the_lora_rank_has_an_absolute_cap_and_a_per_layer_limit():
    with pytest.raises(ArgumentError, match=r"`r` \(the adapter rank\) must be a positive int, got 1099511627776.*at most 65536"):
        LoRA(r=2**40)
    model = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 16))
    with pytest.raises(ArgumentError, match=r"`r`=8 is larger than layer '0' \(Linear, 16 in, 4 out\) can use.*min\(in, out\) = 4") as caught:
        select_adapter_layers(model, LoRAConfig(r=8))
    assert caught.value.argument == "r"
    with pytest.raises(ArgumentError, match=r"layer '2'"):
        inject_adapters(model, LoRAConfig(r=8), {"2": model[2]})
    assert not hasattr(model[2], "lora_A")
    select_adapter_layers(model, LoRAConfig(r=4))  # the limit itself is fine
    embedding = nn.Sequential(nn.Embedding(100, 6))
    with pytest.raises(ArgumentError, match=r"layer '0' \(Embedding, 100 in, 6 out\)"):
        select_adapter_layers(embedding, LoRAConfig(r=8, target_modules=["0"]))


# ---------------------------------------------------------------------- 4. inspect --verify
def test_verify_passes_on_a_good_export(packed_dir, capsys):
    summary = verify_packed(packed_dir)
    assert summary.startswith(f"verified: {WEIGHTS_FILE}") and "2 quantized layers and 4 tensors" in summary
    code, out, err = _cli(capsys, "inspect", str(packed_dir), "--verify")
    assert code == 0 and err == "" and out.rstrip().endswith(summary)


def test_a_bit_flip_or_truncation_passes_inspect_but_fails_verify(copy, capsys):
    data = bytearray((copy / WEIGHTS_FILE).read_bytes())
    data[-3] ^= 0x10
    (copy / WEIGHTS_FILE).write_bytes(bytes(data))
    assert _cli(capsys, "inspect", str(copy))[0] == 0  # the table reads the metadata only
    code, out, err = _cli(capsys, "inspect", "--verify", str(copy))
    assert code == 2 and out == "" and f"{WEIGHTS_FILE}: checksum mismatch; the file is truncated or corrupted" in err
    (copy / WEIGHTS_FILE).write_bytes(bytes(data[: len(data) // 2]))
    assert _cli(capsys, "inspect", "--verify", str(copy))[0] == 2


def test_an_export_without_a_recorded_checksum_says_so(copy, capsys):
    _edit_metadata(copy, lambda body: body.pop("weights_sha256"))
    with pytest.raises(PackedFormatError, match=rf"no checksum recorded for {WEIGHTS_FILE}"):
        verify_packed(copy)
    code, _, err = _cli(capsys, "inspect", "--verify", str(copy))
    assert code == 2 and "no checksum recorded" in err


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory) -> Path:
    model = small_model()
    round_to_nearest(model, QuantSpec(4, "group", 16), targets=["0", "2"])
    out = tmp_path_factory.mktemp("onnx") / "out"
    export(model, out, inputs=[torch.randn(4, 32)], formats=["safetensors", "onnx"])
    return out


def test_verify_checks_the_files_other_engines_read(onnx_export, tmp_path, capsys):
    body = json.loads((onnx_export / METADATA_FILE).read_text())
    onnx_bytes = (onnx_export / "model.onnx").read_bytes()
    assert body["files_sha256"] == {"model.onnx": hashlib.sha256(onnx_bytes).hexdigest()}
    assert "model.onnx match their SHA-256" in verify_packed(onnx_export)
    copy = Path(shutil.copytree(onnx_export, tmp_path / "copy"))
    flipped = bytearray(onnx_bytes)
    flipped[len(flipped) // 2] ^= 0x01
    (copy / "model.onnx").write_bytes(bytes(flipped))
    assert _cli(capsys, "inspect", str(copy))[0] == 0  # the table reads the metadata only
    code, out, err = _cli(capsys, "inspect", "--verify", str(copy))
    assert code == 2 and out == "" and "model.onnx: checksum mismatch" in err
    (copy / "model.onnx").unlink()
    with pytest.raises(PackedFormatError, match=r"model.onnx: missing; the export wrote it"):
        verify_packed(copy)
    # Without the record (an older export, a .failed-parity folder), the file is named as unchecked.
    (copy / "model.onnx").write_bytes(bytes(flipped))
    _edit_metadata(copy, lambda body: body.pop("files_sha256"))
    summary = verify_packed(copy)
    assert summary.endswith("; NOT verified: model.onnx (no SHA-256 recorded for them: an export older than the"
                            " record, or one whose check failed)")


@pytest.mark.parametrize(
    "record, match",
    [
        ({"../../etc/passwd": "0" * 64}, r"records checksums for \['../../etc/passwd'\], which no export writes"),
        (["model.onnx"], r"'files_sha256' in compression.json is not a mapping"),
        ({"model.onnx": 7}, r"'files_sha256' in compression.json is not a mapping"),
    ],
)
def test_a_malformed_companion_record_is_refused_not_followed(onnx_export, tmp_path, record, match):
    copy = Path(shutil.copytree(onnx_export, tmp_path / "copy"))
    _edit_metadata(copy, lambda body: body.update(files_sha256=record))
    with pytest.raises(PackedFormatError, match=match):
        verify_packed(copy)


def test_an_export_without_companion_files_records_none(packed_dir):
    assert "files_sha256" not in json.loads((packed_dir / METADATA_FILE).read_text())


def test_verify_of_a_checkpoint_says_there_is_no_checksum(tmp_path, capsys):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "a.ckpt")
    code, out, err = _cli(capsys, "inspect", "--verify", str(tmp_path / "a.ckpt"))
    assert code == 2 and out == "" and "no checksum recorded in it" in err


# ---------------------------------------------------------------------- 5. fuzz
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2, 8, 16, 32, 64, 2**31, 2**63, 10**400, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["float32", "float16", "bfloat16", "int8", "uint8", "int32", "int64", "bool", "dense", "bitmask",
                     "tensor", "channel", "group", "int8_static", "int8_dynamic", "Linear", "0.bias", "2.bias", ""]),
    st.text(max_size=8),
)
SHAPES = st.lists(st.integers(min_value=-2, max_value=70) | st.sampled_from([10**400, 2**63, 2**64]), max_size=4)
JSON_VALUES = st.recursive(JSON_SCALARS | SHAPES, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=5)
ENTRY_FIELDS = ["shape", "dtype", "bits", "granularity", "group_size", "symmetric", "scale_dtype", "sparsity", "kept",
                "activations", "bytes", "module", "packing"]
TOP_FIELDS = ["layers", "tensors", "aliases", "format_version", "weights_sha256", "format", "recipe", "library_versions"]
ENTRIES = [("layers", "0"), ("layers", "2"), ("tensors", "0.bias"), ("tensors", "2.bias"), ("tensors", "3.weight"),
           ("tensors", "3.bias")]

EDIT = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(ENTRIES), st.sampled_from(ENTRY_FIELDS), JSON_VALUES),
    st.tuples(st.just("shape"), st.sampled_from(ENTRIES), st.just("shape"), SHAPES),
    st.tuples(st.just("drop"), st.sampled_from(ENTRIES), st.sampled_from(ENTRY_FIELDS), st.none()),
    st.tuples(st.just("entry"), st.sampled_from(ENTRIES), st.none(), JSON_VALUES),
    st.tuples(st.just("rename"), st.sampled_from(ENTRIES), st.none(), st.sampled_from(["", "1", "3", "0.0", "5", "weight", "0.bias"])),
    st.tuples(st.just("top"), st.none(), st.sampled_from(TOP_FIELDS), JSON_VALUES),
    st.tuples(st.just("alias"), st.none(), st.sampled_from(["x", "0.bias", "0.weight", "3.weight"]), JSON_VALUES),
)


def _apply(body: dict, edit) -> None:
    kind, entry, field, value = edit
    if kind == "top":
        body[field] = value
    elif kind == "alias":
        body["aliases"][field] = value
    else:
        section, name = entry
        if kind == "entry":
            body[section][name] = value
        elif kind == "rename":
            body[section][value] = body[section].pop(name)
        elif kind == "drop":
            body[section][name].pop(field, None)
        else:
            body[section][name][field] = value


def _load_or_refuse(directory: Path) -> None:
    """The only outcomes allowed: a model that runs, or a PackedFormatError with a message."""
    for reader in (inspect_packed, verify_packed):
        try:
            assert isinstance(reader(directory), str)
        except PackedFormatError as err:
            assert str(err) and "Traceback" not in str(err)
    try:
        model = load_packed(directory, small_model())
    except PackedFormatError as err:
        assert str(err)
        return
    with torch.no_grad():
        model(torch.randn(2, 32))


FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _fuzz_metadata(packed_dir: Path, edits) -> None:
    body = json.loads((packed_dir / METADATA_FILE).read_text())
    for edit in edits:
        try:
            _apply(body, edit)
        except (KeyError, TypeError, AttributeError):  # an earlier edit removed or replaced the container
            pass
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(shutil.copytree(packed_dir, Path(tmp) / "d"))
        _write(directory, body)
        _load_or_refuse(directory)


def _mutate_header(data: bytes, field: str, value, index: int) -> bytes:
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    names = sorted(k for k in header if k != "__metadata__")
    header[names[index % len(names)]][field] = value
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + size :]


BYTE_EDIT = st.one_of(
    st.tuples(st.just("flip"), st.integers(min_value=0), st.integers(min_value=0, max_value=7)),
    st.tuples(st.just("truncate"), st.integers(min_value=0), st.none()),
    st.tuples(st.just("byte"), st.integers(min_value=0), st.integers(min_value=0, max_value=255)),
    st.tuples(st.just("header"), st.integers(min_value=0), st.tuples(
        st.sampled_from(["dtype", "shape", "data_offsets"]),
        st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "I32", "I64", "BOOL", "F64", "X"]) | SHAPES | JSON_SCALARS)),
)


def _fuzz_bytes(packed_dir: Path, edits, resign: bool) -> None:
    data = bytearray((packed_dir / WEIGHTS_FILE).read_bytes())
    for kind, position, value in edits:
        if kind == "header":
            try:
                data = bytearray(_mutate_header(bytes(data), *value, position))
            except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError):
                pass  # the header is already unreadable: the reader must say so
        elif not data:
            break
        elif kind == "flip":
            data[position % len(data)] ^= 1 << value
        elif kind == "byte":
            data[position % len(data)] = value
        else:
            del data[position % len(data):]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(shutil.copytree(packed_dir, Path(tmp) / "d"))
        _write(directory, weights=bytes(data), resign=resign)
        _load_or_refuse(directory)


@settings(max_examples=300, **FUZZ)
@given(edits=st.lists(EDIT, min_size=1, max_size=3))
def test_fuzzed_metadata_loads_or_raises_packed_format_error(packed_dir, edits):
    _fuzz_metadata(packed_dir, edits)


@settings(max_examples=250, **FUZZ)
@given(edits=st.lists(BYTE_EDIT, min_size=1, max_size=3), resign=st.booleans())
def test_fuzzed_weight_bytes_load_or_raise_packed_format_error(packed_dir, edits, resign):
    _fuzz_bytes(packed_dir, edits, resign)


@pytest.mark.slow
@settings(max_examples=5000, **FUZZ)
@given(edits=st.lists(EDIT, min_size=1, max_size=4))
def test_fuzzed_metadata_long_run(packed_dir, edits):
    _fuzz_metadata(packed_dir, edits)


@pytest.mark.slow
@settings(max_examples=5000, **FUZZ)
@given(edits=st.lists(BYTE_EDIT, min_size=1, max_size=4), resign=st.booleans())
def test_fuzzed_weight_bytes_long_run(packed_dir, edits, resign):
    _fuzz_bytes(packed_dir, edits, resign)


def test_the_fixture_itself_loads_and_matches(packed_dir):
    """The fuzz starts from a good directory: it loads, and the static input stage survives."""
    # every value comes from the files; the exact path (the default may run layer 2 on the int8 GEMM)
    loaded = load_packed(packed_dir, small_model(seed=1), backend="dequantize")
    assert loaded.packed_kernels == {"0": "dequantize", "2": "dequantize"}
    assert math.isclose(float(loaded[0].input_quantizer.input_scale), 5.0 / 255, rel_tol=1e-6)
    x = torch.randn(8, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), exported_model().eval()(x))


def test_a_model_still_carrying_compression_stages_is_refused(packed_dir):
    """Loading into the trained model itself (or another run's) would fake-quantize the
    packed weights again with the stages it still carries: wrong outputs, silently."""
    with pytest.raises(PackedFormatError, match=r"`model` still carries a training run's compression stages \(layer"
                                                r" '0'.*pass a freshly built model"):
        load_packed(packed_dir, exported_model())
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(load_packed(packed_dir, small_model(seed=1), backend="dequantize")(x), exported_model()(x))
