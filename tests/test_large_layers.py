"""A layer larger than a row block (an LLM's vocabulary head): the packed exact path computes
it a block of output rows at a time, and the export's check holds one layer's packed modules
at a time while it measures: what bounds the export's and the loader's peak memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress import export, load_packed
from lightning_compress.formats import parity
from lightning_compress.formats.blocks import BLOCK_ELEMENTS
from lightning_compress.formats.runtime import PackedWeight
from lightning_compress.quant.spec import QuantSpec
from lightning_compress.quant.weights import round_to_nearest

VOCABULARY, HIDDEN = 4200, 1024  # a head of 4.3M weights: more than one block (4.19M)


def _lm_head_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, VOCABULARY)).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _lm_head_model()
    round_to_nearest(model, QuantSpec(4, "group", 64))
    directory = tmp_path_factory.mktemp("head") / "out"
    export(model, directory, inputs=[torch.randn(8, 64)])
    return model, directory


def test_the_head_runs_a_row_block_at_a_time_with_the_fake_quant_models_numbers(exported, monkeypatch):
    """The exact path never dequantizes the whole head; each block is at most BLOCK_ELEMENTS
    weights; the output (2-D and 3-D, with the bias) is the fake-quant model's to float32
    rounding, and the input's gradient flows through the blocks."""
    model, directory = exported
    loaded = load_packed(directory, _lm_head_model(1), backend="dequantize")
    assert HIDDEN * VOCABULARY > BLOCK_ELEMENTS
    blocks, whole = [], []
    original_rows, original_whole = PackedWeight.matrix_rows, PackedWeight._dequantize

    def rows(self, block, dtype):
        blocks.append((block.stop - block.start) * self.cols)
        return original_rows(self, block, dtype)

    def dequantize(self, selected, dtype):
        whole.append(tuple(self.shape))
        return original_whole(self, selected, dtype)

    monkeypatch.setattr(PackedWeight, "matrix_rows", rows)
    monkeypatch.setattr(PackedWeight, "_dequantize", dequantize)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = model(x), loaded(x)
    assert whole == [(HIDDEN, 64)]  # the small first layer only
    assert len(blocks) >= 2 and max(blocks) <= BLOCK_ELEMENTS and sum(blocks) == HIDDEN * VOCABULARY
    assert got.shape == expected.shape == (2, 5, VOCABULARY)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(loaded(x[0]).detach(), got[0], rtol=1e-6, atol=1e-6)
    wants_grad = x.clone().requires_grad_()
    loaded(wants_grad).square().sum().backward()
    reference = x.clone().requires_grad_()
    model(reference).square().sum().backward()
    assert torch.allclose(wants_grad.grad, reference.grad, rtol=1e-4, atol=1e-4)


def test_loading_keeps_the_files_int4_words_without_unpacking_them(exported, monkeypatch):
    """load_packed puts the file's int32 words of an int4 layer in the module as they are:
    no int8 codes (twice their size) and no repacking, which had loaded a model dominated
    by an int4 head at 3.5x its file size; the numbers are the fake-quant model's."""
    from lightning_compress.formats import blocks, packed, runtime
    from lightning_compress.formats.packed import open_packed
    from lightning_compress.quant.packing import pack_codes

    model, directory = exported
    calls = []
    for module, name in ((blocks, "unpack_rows"), (packed, "unpack_rows"), (runtime, "pack_rows")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    loaded = load_packed(directory, _lm_head_model(1), backend="dequantize")
    assert calls == []
    head, stored = loaded[2].packed, open_packed(directory).layers["2"].weight
    assert torch.equal(head.codes, pack_codes(stored.codes, 4))  # the words are the codes, packed
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), rtol=1e-5, atol=1e-5)


def test_the_exports_check_holds_one_layers_packed_modules_while_it_measures(monkeypatch, tmp_path):
    """While the fake-quant model runs, each layer's packed module is built when the layer
    runs and dropped after it (the whole packed model is built only for the model-level
    comparison that follows); the check still passes and compares every layer."""
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(6)]).eval()
    round_to_nearest(model, QuantSpec(4, "group", 16))
    held, measuring = [], []
    original_get, original_run = parity._Replacements.get, parity._run_measuring

    def get(self, *args, **kwargs):
        module = original_get(self, *args, **kwargs)
        if measuring:
            held.append(len(self._built))
        return module

    def run(*args, **kwargs):
        measuring.append(True)
        try:
            return original_run(*args, **kwargs)
        finally:
            measuring.clear()

    monkeypatch.setattr(parity._Replacements, "get", get)
    monkeypatch.setattr(parity, "_run_measuring", run)
    report = export(model, tmp_path / "out", inputs=[torch.randn(4, 32)])
    assert len(held) == 6 and max(held) == 1
    assert report.parity.passed and len(report.parity.layers) == 6


def test_a_weight_read_from_the_file_replaces_and_takes_codes_as_any_other(exported):
    """dataclasses.replace and assigning ``codes`` work on an int4 weight read from the file
    (its codes kept in the file's words until read) as on any QuantizedWeight."""
    import dataclasses

    from lightning_compress.formats.packed import open_packed

    _, directory = exported
    stored = open_packed(directory).layers["2"].weight
    codes = stored.codes.clone()
    as_bf16 = dataclasses.replace(stored, dtype=torch.bfloat16)
    assert torch.equal(as_bf16.codes, codes) and as_bf16.dtype == torch.bfloat16
    assert torch.equal(as_bf16.dequantize(), stored.dequantize().to(torch.bfloat16))
    stored.codes = torch.zeros_like(codes)
    assert stored.words is None and not stored.codes.any()
