"""The packed format: golden byte layouts, round trips, sparsity, sizes, and bad files."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lightning_compress import ExportError, PackedFormatError, ParityError, export, load_packed
from lightning_compress.core.validate import ArgumentError
from lightning_compress.formats.packed import FORMAT_VERSION, METADATA_FILE, WEIGHTS_FILE, metadata_bytes
from lightning_compress.core.transforms import raw_weight
from lightning_compress.quant.packing import pack_codes, unpack_biased, unpack_codes
from lightning_compress.quant.spec import QuantSpec
from lightning_compress.quant.weights import quantized_weights, round_to_nearest
from tests.conftest import needs_int8_gemm


def mlp(seed: int = 0, width: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 8))


def quantized_mlp(spec: QuantSpec, seed: int = 0, width: int = 64) -> nn.Module:
    model = mlp(seed, width)
    round_to_nearest(model, spec)
    return model


# ---------------------------------------------------------------------- golden layouts
def test_int4_golden_nibble_order():
    # codes -8..7 (+8 → 0..15), 8 a word, value i at bits [4i, 4i+4): low nibble first.
    codes = torch.tensor([[-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7]], dtype=torch.int8)
    packed = pack_codes(codes, 4)
    assert packed.dtype == torch.int32 and packed.shape == (1, 2)
    assert packed[0, 0].item() == 0x76543210
    assert packed[0, 1].item() == 0xFEDCBA98 - 2**32  # int32 two's complement
    assert packed.numpy().tobytes() == bytes([0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE])
    assert torch.equal(unpack_codes(packed, 4, 16), codes)


def test_int8_and_int3_golden_layouts():
    codes = torch.tensor([[-128, -1, 0, 127]], dtype=torch.int8)
    assert pack_codes(codes, 8).numpy().tobytes() == bytes([0x00, 0x7F, 0x80, 0xFF])
    # int3: +4 → 0..7; 11 codes straddle the first word boundary (bits 30..32).
    three = torch.tensor([[-4, -3, -2, -1, 0, 1, 2, 3, 3, 3, 3]], dtype=torch.int8)
    unsigned = [c + 4 for c in three[0].tolist()]
    stream = sum(v << (3 * i) for i, v in enumerate(unsigned))
    expected = [(stream >> 0) & 0xFFFFFFFF, (stream >> 32) & 0xFFFFFFFF]
    packed = pack_codes(three, 3)
    assert packed.shape == (1, 2)
    assert [w & 0xFFFFFFFF for w in packed[0].tolist()] == expected
    assert torch.equal(unpack_codes(packed, 3, 11), three)


@pytest.mark.parametrize("bits", range(2, 9))
def test_packing_matches_compressed_tensors(bits):
    from compressed_tensors.compressors.pack_quantized import helpers  # a dev dependency: never skipped
    generator = torch.Generator().manual_seed(bits)
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (7, 45), generator=generator, dtype=torch.int8)
    ours = pack_codes(codes, bits)
    assert ours.shape == (7, math.ceil(45 * bits / 32))
    assert torch.equal(ours, helpers.pack_to_int32(codes, bits))
    assert torch.equal(helpers.unpack_from_int32(ours, bits, codes.shape), codes)
    assert torch.equal(unpack_codes(ours, bits, 45), codes)
    biased = unpack_biased(ours, bits, 45)  # the runtime's fast path: stored codes, unsigned
    if bits in (2, 4):
        assert biased.dtype == torch.uint8 and torch.equal(biased.to(torch.int16) - 2 ** (bits - 1), codes.to(torch.int16))
    else:
        assert biased is None


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (5, 9), (2, 64), (4, 33)])
def test_byte_packing_of_2_4_8_bits_matches_compressed_tensors(bits, shape):
    """pack_codes builds 2/4/8-bit words from bytes (not a bit stream): every padding case
    against compressed-tensors, and a 1-D tensor as its one row."""
    from compressed_tensors.compressors.pack_quantized import helpers  # a dev dependency: never skipped
    generator = torch.Generator().manual_seed(bits * 100 + shape[1])
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), shape, generator=generator, dtype=torch.int8)
    assert torch.equal(pack_codes(codes, bits), helpers.pack_to_int32(codes, bits))
    assert torch.equal(pack_codes(codes[0], bits), helpers.pack_to_int32(codes[:1], bits)[0])


# ---------------------------------------------------------------------- round trips
SPECS = [
    QuantSpec(bits, granularity, group_size=16 if granularity == "group" else None, symmetric=symmetric)
    for bits in range(2, 9)
    for granularity in ("tensor", "channel", "group")
    for symmetric in (True, False)
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe().replace(" ", "-"))
def test_round_trip_every_bit_width_and_granularity(tmp_path, spec):
    model = quantized_mlp(spec)
    inputs = [torch.randn(4, 32)]
    report = export(model, tmp_path / "out", inputs=inputs)
    assert report.parity.weights_exact and report.parity.relative_error == 0.0
    loaded = load_packed(tmp_path / "out", mlp(seed=1), backend="dequantize")
    trained = quantized_weights(model)
    for name, q in trained.items():
        assert torch.equal(loaded.get_submodule(name).weight, q.dequantize())
    with torch.no_grad():
        assert torch.equal(loaded(inputs[0]), model(inputs[0]))
    # Codes take `bits` bits: the packed file of the 64x64 layer is bits/8 bytes a weight.
    layer_entry = json.loads((tmp_path / "out" / METADATA_FILE).read_text())["layers"]["2"]
    assert layer_entry["bits"] == spec.bits and layer_entry["granularity"] == spec.granularity
    scale_bytes = {"tensor": 4, "channel": 64 * 4, "group": 64 * 4 * 4}[spec.granularity]
    zero_bytes = 0 if spec.symmetric else (1 if spec.granularity == "tensor" else None)
    code_bytes = 64 * math.ceil(64 * spec.bits / 32) * 4
    if zero_bytes is not None:
        shape_bytes = 16 if spec.bits < 8 else 0
        assert layer_entry["bytes"] == code_bytes + scale_bytes + zero_bytes + shape_bytes


def test_float16_scales_are_exact_and_smaller(tmp_path):
    model32 = quantized_mlp(QuantSpec(4, "group", 16))
    model16 = quantized_mlp(QuantSpec(4, "group", 16, scale_dtype="float16"))
    small = export(model16, tmp_path / "f16", inputs=[torch.randn(2, 32)])
    large = export(model32, tmp_path / "f32")
    assert small.parity.weights_exact and small.parity.relative_error == 0.0
    assert small.file_bytes < large.file_bytes
    for q in quantized_weights(model16).values():
        assert torch.equal(q.scale, q.scale.half().float())  # representable: stored losslessly


def test_int4_group128_size_ratio_on_linear_heavy_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512, bias=False), nn.Linear(512, 512, bias=False))
    round_to_nearest(model, QuantSpec(4, "group", 128, scale_dtype="float16"))
    report = export(model, tmp_path / "out")
    # 4 bits + 16/128 bits of scale = 4.125 bits a weight: 7.76x minus the file header.
    assert 7.5 <= report.compression_ratio <= 32 / 4.125


# ---------------------------------------------------------------------- sparsity
def _prune(model: nn.Module, sparsity: float) -> None:
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                cut = layer.weight.abs().flatten().kthvalue(int(sparsity * layer.weight.numel())).values
                layer.weight[layer.weight.abs() <= cut] = 0


def test_sparse_int8_is_stored_as_bitmask_and_at_least_10x_smaller(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256, bias=False), nn.Linear(256, 256, bias=False))
    _prune(model, 0.9)
    round_to_nearest(model, QuantSpec(8))
    report = export(model, tmp_path / "out", inputs=[torch.randn(3, 256)])
    meta = json.loads((tmp_path / "out" / METADATA_FILE).read_text())
    assert {entry["sparsity"] for entry in meta["layers"].values()} == {"bitmask"}
    assert report.compression_ratio >= 10
    loaded = load_packed(tmp_path / "out", nn.Sequential(nn.Linear(256, 256, bias=False), nn.Linear(256, 256, bias=False)))
    for name in ("0", "1"):
        assert torch.equal(loaded.get_submodule(name).weight, model.get_submodule(name).weight)
        assert int((loaded.get_submodule(name).weight == 0).sum()) >= int(0.9 * 256 * 256)  # pruned stays 0


def test_two_four_layers_store_half_the_values(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64, bias=False))
    with torch.no_grad():
        groups = model[0].weight.view(-1, 4)
        smallest = groups.abs().topk(2, dim=1, largest=False).indices
        groups.scatter_(1, smallest, 0.0)
    round_to_nearest(model, QuantSpec(4, "channel"))
    export(model, tmp_path / "out")
    entry = json.loads((tmp_path / "out" / METADATA_FILE).read_text())["layers"]["0"]
    assert entry["sparsity"] == "bitmask" and entry["kept"] <= 64 * 64 // 2


def test_the_report_gives_the_zeros_of_a_pruned_layer_stored_whole(tmp_path):
    # A new user's trial: a 2:4-pruned layer stored as whole codes read "dense".
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 8, bias=False))
    with torch.no_grad():
        groups = model[0].weight.view(-1, 4)
        groups.scatter_(1, groups.abs().topk(2, dim=1, largest=False).indices, 0.0)
    round_to_nearest(model, QuantSpec(4, "channel"))
    report = export(model, tmp_path / "out", sparse_threshold=None)  # codes stored whole
    rows = {row[0]: row for row in report.rows}
    rounded_to_zero = float((model[1].weight == 0).float().mean())  # RTN codes of 0 in the unpruned layer
    assert rows["0"][4] == "dense, 50% zeros" and rows["1"][4] == f"dense, {rounded_to_zero:.0%} zeros"
    report = export(model, tmp_path / "sparse")
    assert {row[0]: row for row in report.rows}["0"][4] == "bitmask 50%"


def test_pruned_float_tensor_is_stored_sparse_and_restored(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 4))
    _prune(model, 0.8)
    export(model, tmp_path / "out", inputs=[torch.randn(2, 128)])
    meta = json.loads((tmp_path / "out" / METADATA_FILE).read_text())
    assert meta["tensors"]["0.weight"]["sparsity"] == "bitmask"
    loaded = load_packed(tmp_path / "out", nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 4)))
    assert torch.equal(loaded[0].weight, model[0].weight) and torch.equal(loaded[1].bias, model[1].bias)


# ---------------------------------------------------------------------- other layer types
class ConvEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.conv = nn.Conv1d(16, 32, 3, padding=1)
        self.head = nn.Linear(32, 4)

    def forward(self, ids):
        h = self.embed(ids).transpose(1, 2)
        return self.head(torch.relu(self.conv(h)).mean(dim=2))


def test_unpack_biased_refuses_a_wrong_column_count_and_reads_one_word_rows():
    codes = torch.randint(-8, 8, (5, 8), dtype=torch.int8)
    packed = pack_codes(codes, 4)  # [5, 1]: one word a row
    assert torch.equal(unpack_biased(packed, 4, 8).to(torch.int16) - 8, codes.to(torch.int16))
    with pytest.raises(ValueError, match="1 words per row cannot hold 9 codes of 4 bits"):
        unpack_biased(packed, 4, 9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_stays_float32_exact_after_the_model_is_cast(tmp_path, dtype):
    spec = QuantSpec(4, "group", 16, symmetric=False)
    export(quantized_mlp(spec), tmp_path / "out", inputs=[torch.randn(2, 32)])
    layer = load_packed(tmp_path / "out", mlp(seed=1)).get_submodule("2").to(dtype)
    packed = layer.packed
    # The reference: signed codes minus the (cast) zero point, times the (cast) scale, in float32.
    codes = unpack_codes(packed.codes, 4, packed.cols).float().view(64, -1, 16)
    expected = ((codes - packed.zero_point.float().view(64, -1, 1)) * packed.scale.float().view(64, -1, 1)).view(64, 64)
    assert packed.scale.dtype == dtype
    assert torch.equal(packed.dequantize(dtype=torch.float32), expected)


def test_conv_and_embedding_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ConvEmbed()
    round_to_nearest(model, QuantSpec(4, "group", 16), targets=[nn.Embedding, nn.Conv1d, nn.Linear])
    ids = torch.randint(0, 50, (3, 7))
    report = export(model, tmp_path / "out", inputs=[ids])
    assert report.parity.relative_error == 0.0
    loaded = load_packed(tmp_path / "out", ConvEmbed)
    assert set(loaded.packed_kernels) == {"embed", "conv", "head"}
    assert type(loaded.embed).__name__ == "PackedEmbedding"
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


# ---------------------------------------------------------------------- the int8 GEMM path
@needs_int8_gemm
def test_int8_gemm_backend_reaches_35db_and_says_which_kernel_ran(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 16))
    round_to_nearest(model, QuantSpec(8))
    inputs = [torch.randn(32, 256) for _ in range(2)]
    report = export(model, tmp_path / "out", inputs=inputs, backend="fbgemm")
    assert report.parity.fast_layers == ["0", "2"]
    assert report.parity.sqnr_db >= 35 and report.parity.relative_error == 0.0
    loaded = load_packed(tmp_path / "out", nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 16)),
                         backend="fbgemm")
    assert loaded.packed_kernels == {"0": "fbgemm", "2": "fbgemm"}
    exact = load_packed(tmp_path / "out", nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 16)))
    assert exact.packed_kernels == {"0": "dequantize", "2": "dequantize"}  # weight-only stays exact


def test_failed_parity_leaves_out_dir_unwritten_and_names_the_worst_layers(tmp_path, int8_gemm_runs):
    model = quantized_mlp(QuantSpec(8))
    with pytest.raises(ParityError, match="worst layers: ") as caught:
        export(model, tmp_path / "out", inputs=[torch.randn(8, 32)], backend="fbgemm", min_sqnr_db=200)
    assert caught.value.report.layers and not (tmp_path / "out").exists()
    # No temporary directory left behind; the packed files are kept aside (tests/test_export_safety.py).
    assert list(tmp_path.iterdir()) == [tmp_path / "out.failed-parity"]


# ---------------------------------------------------------------------- safety
def test_nan_weight_aborts_naming_the_layer(tmp_path):
    model = quantized_mlp(QuantSpec(8))
    with torch.no_grad():
        raw_weight(model[2])[3, 4] = float("nan")
    with pytest.raises(ExportError, match="'2'.*NaN"):
        export(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_directory_needs_overwrite_and_survives_a_failed_export(tmp_path, int8_gemm_runs):
    model = quantized_mlp(QuantSpec(8))
    export(model, tmp_path / "out")
    before = (tmp_path / "out" / WEIGHTS_FILE).read_bytes()
    with pytest.raises(ExportError, match="overwrite=True"):
        export(model, tmp_path / "out")
    with pytest.raises(ParityError):
        export(quantized_mlp(QuantSpec(8), seed=3), tmp_path / "out", overwrite=True,
               inputs=[torch.randn(4, 32)], backend="fbgemm", min_sqnr_db=200)
    assert (tmp_path / "out" / WEIGHTS_FILE).read_bytes() == before
    export(quantized_mlp(QuantSpec(4, "channel"), seed=3), tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / WEIGHTS_FILE).read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_file_at_out_dir_is_refused_as_such_with_or_without_overwrite(tmp_path):
    """The refusal said "pass overwrite=True", which then failed as "not a directory"."""
    (tmp_path / "victim.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ExportError, match=r"victim\.txt exists and is not a directory; export to a directory path"):
            export(quantized_mlp(QuantSpec(8)), tmp_path / "victim.txt", overwrite=overwrite)
    assert (tmp_path / "victim.txt").read_text() == "mine"


def test_the_report_says_larger_when_the_file_is_larger_than_the_float_model(tmp_path):
    """Nothing quantized or pruned: headers and metadata make the file a little larger; it
    said "0.98x smaller"."""
    report = export(nn.Sequential(nn.Linear(8, 4)), tmp_path / "out")
    assert report.file_bytes > report.float32_bytes == (8 * 4 + 4) * 4
    assert f"({report.file_bytes / report.float32_bytes:.2f}x that: not smaller)" in report.table()
    assert "x smaller" not in report.table()
    assert "x smaller)" in export(quantized_mlp(QuantSpec(4, "group", 32)), tmp_path / "q").table()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(backend="gpu"), "`backend`"),
        (dict(sparse_threshold=1.5), "`sparse_threshold`"),
        (dict(max_relative_error=-1), "`max_relative_error`"),
        (dict(min_sqnr_db="high"), "`min_sqnr_db`"),
        (dict(inputs=torch.randn(2, 32)), "`inputs`"),
        (dict(compressed_tensors="yes"), "`compressed_tensors`"),
    ],
)
def test_bad_export_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        export(quantized_mlp(QuantSpec(8)), tmp_path / "out", **kwargs)


def test_compressed_tensors_requires_a_transformers_model(tmp_path):
    with pytest.raises(ExportError, match="transformers model"):
        export(quantized_mlp(QuantSpec(8)), tmp_path / "out", compressed_tensors=True)


# ---------------------------------------------------------------------- bad files
@pytest.fixture
def exported(tmp_path):
    model = quantized_mlp(QuantSpec(4, "group", 16))
    export(model, tmp_path / "out")
    return tmp_path / "out"


def _rewrite_metadata(directory, change):
    body = json.loads((directory / METADATA_FILE).read_text())
    change(body)
    (directory / METADATA_FILE).write_bytes(metadata_bytes(body))


def test_unknown_version_is_refused(exported):
    _rewrite_metadata(exported, lambda body: body.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(PackedFormatError, match=f"format_version {FORMAT_VERSION + 1}.*upgrade"):
        load_packed(exported, mlp())


def test_truncated_weights_are_refused(exported):
    data = (exported / WEIGHTS_FILE).read_bytes()
    (exported / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(PackedFormatError, match=f"{WEIGHTS_FILE}: checksum mismatch"):
        load_packed(exported, mlp())


def test_edited_metadata_is_refused(exported):
    text = (exported / METADATA_FILE).read_text().replace('"bits": 4', '"bits": 5', 1)
    (exported / METADATA_FILE).write_text(text)
    with pytest.raises(PackedFormatError, match="checksum mismatch; the metadata"):
        load_packed(exported, mlp())


def test_missing_files_are_named(exported):
    (exported / WEIGHTS_FILE).unlink()
    with pytest.raises(PackedFormatError, match=WEIGHTS_FILE):
        load_packed(exported, mlp())
    with pytest.raises(PackedFormatError, match="no such directory"):
        load_packed(exported / "nope", mlp())


def test_metadata_that_disagrees_with_the_tensors_names_the_tensor(exported):
    _rewrite_metadata(exported, lambda body: body["layers"]["2"].update(shape=[64, 32]))
    with pytest.raises(PackedFormatError, match="tensor '2.weight_packed' has shape"):
        load_packed(exported, mlp())


def test_wrong_model_is_refused_naming_the_layer(exported):
    with pytest.raises(PackedFormatError, match="layer '0'.*shape.*\\[64, 32\\].*\\[48, 32\\]"):
        load_packed(exported, mlp(width=48))
    with pytest.raises(PackedFormatError, match="not in"):
        load_packed(exported, nn.Sequential(nn.Linear(32, 64)))


def test_bad_loader_arguments(exported):
    with pytest.raises(ValueError, match="`backend`"):
        load_packed(exported, mlp(), backend="cuda")
    with pytest.raises(TypeError, match="`model`"):
        load_packed(exported, 3)


def test_export_reads_stages_on_any_named_weight(tmp_path):
    """Stages on `in_proj_weight` of MultiheadAttention and `weight_hh_l0` of an LSTM are
    exported as the effective weights: the packed model computes what the transformed one
    does, and its file holds the masked values."""
    from lightning_compress.core.transforms import Stage, add_weight_transform

    class AttentionLSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(8, 2)
            self.rnn = nn.LSTM(8, 8)

        def forward(self, x):
            attended, _ = self.attention(x, x, x)
            return self.rnn(attended)[0]

    torch.manual_seed(0)
    model = AttentionLSTM()
    keep_in = (torch.arange(24 * 8).view(24, 8) % 2 == 0).float()
    keep_hh = (torch.arange(32 * 8).view(32, 8) % 4 != 0).float()
    add_weight_transform(model.attention, Stage.MASK, lambda w: w * keep_in, param="in_proj_weight")
    add_weight_transform(model.rnn, Stage.MASK, lambda w: w * keep_hh, param="weight_hh_l0")
    x = torch.randn(5, 2, 8)
    report = export(model, tmp_path / "out", inputs=[x])
    assert report.parity.relative_error == 0.0
    loaded = load_packed(tmp_path / "out", AttentionLSTM())
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(loaded.attention.in_proj_weight, raw_weight(model.attention, "in_proj_weight") * keep_in)
    assert torch.equal(loaded.rnn.weight_hh_l0, raw_weight(model.rnn, "weight_hh_l0") * keep_hh)


def test_overflowing_float16_scales_are_named_as_such(tmp_path):
    """Finite weights whose float16 scales overflow are not blamed on the training run."""
    from lightning_compress.quant.spec import QuantSpec
    from lightning_compress.quant.weights import round_to_nearest

    model = nn.Sequential(nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight.fill_(1e6)  # / 7 (int4 max) is past float16's 65504
    round_to_nearest(model, QuantSpec(4, "channel", scale_dtype="float16"))
    with pytest.raises(ExportError, match=r"layer '0': its weights are finite but their float16 scales overflow.*scale_dtype='float32'"):
        export(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


class MaskedAttentionLM(nn.Module):
    """A GPT-style block that keeps its causal mask as a buffer of 0 and -inf."""

    def __init__(self, length: int = 6, width: int = 16) -> None:
        super().__init__()
        self.register_buffer("causal", torch.triu(torch.full((length, length), float("-inf")), diagonal=1))
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        scores = x @ x.transpose(-1, -2) + self.causal
        return self.proj(scores.softmax(-1) @ x)


def test_a_buffer_of_infinities_exports_and_loads_but_nan_and_infinite_weights_do_not(tmp_path):
    """A -inf causal mask is model data, not a diverged run: it is stored (its entry says
    it holds infinities) and loads back; a NaN in a buffer, an Inf in a parameter, and an
    Inf in a stored tensor whose entry does not say so are refused."""
    torch.manual_seed(0)
    model = MaskedAttentionLM()
    round_to_nearest(model, QuantSpec(8, "channel"))
    x = torch.randn(2, 6, 16)
    report = export(model, tmp_path / "mask", inputs=[x])
    assert report.parity.relative_error == 0.0
    assert json.loads((tmp_path / "mask" / METADATA_FILE).read_text())["tensors"]["causal"]["infinite"] is True
    loaded = load_packed(tmp_path / "mask", MaskedAttentionLM(), backend="dequantize")
    assert torch.equal(loaded.causal, model.causal) and int(loaded.causal.isinf().sum()) == 15
    assert torch.equal(loaded(x), model(x))

    body = json.loads((tmp_path / "mask" / METADATA_FILE).read_text())
    body.pop("metadata_sha256", None)
    del body["tensors"]["causal"]["infinite"]
    (tmp_path / "mask" / METADATA_FILE).write_bytes(metadata_bytes(body))
    with pytest.raises(PackedFormatError, match=r"tensor 'causal(_values)?' holds NaN or Inf"):
        load_packed(tmp_path / "mask", MaskedAttentionLM())

    nan_buffer = MaskedAttentionLM()
    nan_buffer.causal[0, 0] = float("nan")
    with pytest.raises(ExportError, match=r"'causal' holds 1 NaN value\(s\)"):
        export(nan_buffer, tmp_path / "nan", inputs=[x])
    infinite_weight = MaskedAttentionLM()
    with torch.no_grad():
        infinite_weight.proj.bias[3] = float("inf")
    with pytest.raises(ExportError, match=r"'proj.bias' holds 1 NaN/Inf value\(s\)"):
        export(infinite_weight, tmp_path / "inf", inputs=[x])
    assert not (tmp_path / "nan").exists() and not (tmp_path / "inf").exists()


@pytest.mark.parametrize("unreadable", [METADATA_FILE, WEIGHTS_FILE])
def test_a_file_that_cannot_be_read_is_a_packed_format_error_naming_it(exported, monkeypatch, unreadable):
    """An I/O error reading either file (permissions, a failing disk: injected here, since
    the tests may run as root) is a PackedFormatError naming the file, as the loader
    promises for every problem, not a bare OSError."""
    import builtins
    import errno
    from pathlib import Path

    read_bytes = Path.read_bytes

    def failing(path):
        if path.name == unreadable:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", failing)
    real_open = builtins.open

    def failing_open(file, *args, **kwargs):  # model.safetensors is read in chunks, not with read_bytes
        if Path(str(file)).name == unreadable:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", failing_open)
    with pytest.raises(PackedFormatError, match=rf"{unreadable}: cannot be read \(Permission denied\)"):
        load_packed(exported, mlp())


class _EmbedAttend(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm = nn.LayerNorm(16)

    def forward(self, ids):
        x = self.embed(ids)
        return self.norm(self.attn(x, x, x, need_weights=False)[0])


def test_a_loaded_model_follows_half_and_float_in_its_embedding_and_attention(tmp_path):
    """An Embedding's lookups and attention's in_proj_weight are rebuilt in the module's
    dtype: after .half() they were still float32 (a mixed-dtype error in LayerNorm and in
    attention); after .float(), float32 again."""
    from lightning_compress.quant.spec import QuantSpec
    from lightning_compress.quant.weights import round_to_nearest

    model = _EmbedAttend().eval()
    round_to_nearest(model, QuantSpec(4, "channel"))
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    export(model, tmp_path / "out", inputs=[ids])
    loaded = load_packed(tmp_path / "out", _EmbedAttend()).eval()
    with torch.no_grad():
        expected = loaded(ids)
        assert loaded.embed.weight.dtype == torch.float32
        loaded.half()
        assert loaded.embed.weight.dtype == loaded.attn.in_proj_weight.dtype == torch.float16
        halved = loaded(ids)
        assert halved.dtype == torch.float16
        assert torch.allclose(halved.float(), expected, rtol=0.0, atol=2e-2)
        loaded.float()  # (the float parameters and scales keep their float16 rounding)
        assert loaded.embed.weight.dtype == torch.float32 and loaded(ids).dtype == torch.float32


@pytest.mark.parametrize("argument", ["overwrite", "parity", "keep_unchecked"])
def test_export_flags_must_be_booleans_naming_the_argument(tmp_path, argument):
    """`export(..., overwrite="yes")` replaced the folder (CompressedExport refused it)."""
    export(quantized_mlp(QuantSpec(8)), tmp_path / "out")
    before = (tmp_path / "out" / WEIGHTS_FILE).read_bytes()
    with pytest.raises(ArgumentError, match=rf"`{argument}` must be True or False, got 'yes'"):
        export(quantized_mlp(QuantSpec(4, "channel"), seed=3), tmp_path / "out", **{argument: "yes"})
    assert (tmp_path / "out" / WEIGHTS_FILE).read_bytes() == before


def test_a_model_loaded_packed_is_refused_and_its_export_left_as_it_is(tmp_path):
    """A new user's re-export of `load_packed`'s model passed its check and wrote a folder
    without the packed layers, which `load_packed` then refused ("missing ['a.weight']")."""
    export(quantized_mlp(QuantSpec(4, "group", 16)), tmp_path / "out")
    loaded = load_packed(tmp_path / "out", lambda: mlp())
    with pytest.raises(ExportError, match=r"`model` holds layers loaded packed by load_packed \(\['0', '2', '4'\]\): export"
                                          r" packs a trained model's compressed layers, not packed ones"):
        export(loaded, tmp_path / "again")
    assert not (tmp_path / "again").exists()
    again = quantized_mlp(QuantSpec(4, "group", 16))  # the trained model exports again, and loads
    export(again, tmp_path / "again")
    x = torch.randn(3, 32)
    assert torch.equal(load_packed(tmp_path / "again", lambda: mlp())(x), loaded(x))


class RandomScale(nn.Module):
    """Seeded, with a random buffer it does not save: the parameters' initialisation
    consumes random numbers before it is drawn."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(32, 32)
        self.register_buffer("s", torch.rand(32) + 0.5, persistent=False)
        self.register_buffer("mask", torch.ones(32), persistent=False)  # computed alike every time

    def forward(self, x):
        return self.a(x) * self.s * self.mask


def test_unsaved_buffers_the_loaded_model_computes_otherwise_are_named(tmp_path):
    """A new user's factory-built model drew another random buffer (load_packed builds
    it with parameters on the meta device) and computed 1.14 off the trained model,
    without a word."""
    import warnings

    model = RandomScale()
    round_to_nearest(model, QuantSpec(8))
    export(model, tmp_path / "out")
    x = torch.randn(3, 32)
    with pytest.warns(UserWarning, match=r"persistent=False\) have other values in this model than in the model"
                                         r" exported: \['s'\], and the loaded model computes with this model's"):
        from_factory = load_packed(tmp_path / "out", RandomScale)
    assert not torch.equal(from_factory.s, model.s)  # what the warning is about
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*persistent=False")
        built = load_packed(tmp_path / "out", RandomScale())
    assert torch.equal(built(x), model(x))


class GrowingCache(nn.Module):
    """A position table `forward` grows (as some rotary caches do), and a sparse buffer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.register_buffer("positions", torch.arange(4.0), persistent=False)
        self.register_buffer("adjacency", torch.eye(32).to_sparse(), persistent=False)

    def forward(self, x):
        if len(self.positions) < x.shape[0]:
            self.positions = torch.arange(float(x.shape[0]))
        return self.a(x) + self.positions[: x.shape[0], None] * 0


def test_buffers_forward_resizes_and_sparse_buffers_export_and_load_without_a_warning(tmp_path):
    """A sparse buffer crashed the digest (and so the export); a cache `forward` grew
    differs in shape from a new model's and is not compared."""
    import warnings

    model = GrowingCache()
    round_to_nearest(model, QuantSpec(8))
    x = torch.randn(6, 32)
    export(model, tmp_path / "out", inputs=[x])
    assert len(model.positions) == 6
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*persistent=False")
        loaded = load_packed(tmp_path / "out", GrowingCache, backend="dequantize")  # the exact path on any CPU
    assert torch.equal(loaded(x), model(x))
