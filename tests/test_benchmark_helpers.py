"""Helpers of the benchmark scripts that call the library directly (not the benchmarks:
those are timed runs, `make bench`): an API change that breaks them fails here, not an
hour into a benchmark."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def qat_init(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import qat_init

    yield qat_init
    sys.modules.pop("qat_init", None)


@pytest.fixture
def qat_finetune(qat_init):
    import qat_finetune

    yield qat_finetune
    for name in ("qat_finetune", "qat_regimes"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("init", ["gptq", "awq"])
def test_the_qat_init_benchmarks_ptq_point_is_the_quantized_float_model(qat_init, init):
    """qat_init's post-training points (it handed CalibratedStart the mapping rules, or
    None, and crashed): every Linear's weight lands on its int4 group-32 grid."""
    from lightning_compress.examples.charlm import CharDataModule, CharTransformer
    from lightning_compress.quant.spec import QuantSpec

    torch.manual_seed(0)
    data = CharDataModule(seed=0)
    data.setup()
    model = CharTransformer(vocab_size=len(data.vocabulary), d_model=64, decay_steps=10)
    spec = QuantSpec(4, "group", 32)
    point = qat_init.ptq_point(model, spec, init, data)
    layers = {name: layer for name, layer in point.named_modules() if isinstance(layer, torch.nn.Linear)}
    assert layers
    for name, layer in layers.items():
        groups = layer.weight.detach().reshape(-1, 32).sort(dim=1).values
        distinct = 1 + (groups[:, 1:] != groups[:, :-1]).sum(dim=1)
        assert int(distinct.max()) <= 16, name  # int4 group-32: at most 16 values a group
    float_head = model.head.weight.detach().reshape(-1, 32).sort(dim=1).values
    assert int((1 + (float_head[:, 1:] != float_head[:, :-1]).sum(dim=1)).max()) == 32  # the float model's are not


def test_the_source_corpus_is_the_standard_librarys_own_source(qat_init):
    """qat_regimes' second corpus: windows of the stdlib's top-level ``.py`` files, read
    as text, the held-out tenth after the training text."""
    import sysconfig

    data = qat_init.SourceDataModule(seed=0, max_chars=50_000)
    data.setup()
    root = Path(sysconfig.get_paths()["stdlib"])
    first_file = sorted(root.glob("*.py"))[0].read_text(errors="replace")
    decode = "".join
    chars = data.vocabulary.chars
    ids, targets = data.train_set[0]
    assert decode(chars[i] for i in ids.tolist()) == first_file[:64]  # the corpus starts with the first file
    assert torch.equal(ids[1:], targets[:-1])  # next-character targets
    # 65-character windows (64 inputs, one more target) over the first 45,000 characters
    # (90%) at stride 32, and over the last 5,000 at stride 64.
    assert len(data.train_set) == (45_000 - 65) // 32 + 1 == 1405
    assert len(data.val_set) == (5_000 - 65) // 64 + 1 == 78
    val_ids, _ = data.val_set[0]
    assert decode(chars[i] for i in val_ids.tolist()) == data_text(root)[45_000:45_064]


def data_text(root: Path) -> str:
    return "".join(path.read_text(errors="replace") for path in sorted(root.glob("*.py")))


def test_the_fine_tune_protocol_trains_the_finished_float_model_at_its_final_learning_rate(qat_finetune):
    """qat_finetune's float and QAT fine-tunes start from the finished float model and take
    AdamW steps of its schedule's last learning rate: on a fresh AdamW the first step moves
    every weight with a gradient by lr (|m / sqrt(v)| = 1, less where |g| is near Adam's
    eps) plus the decoupled weight decay."""
    import types

    from lightning_compress.examples.charlm import CharDataModule, CharTransformer

    data = CharDataModule(seed=0, max_chars=20_000)
    data.setup()
    torch.manual_seed(0)
    finished = CharTransformer(vocab_size=len(data.vocabulary), d_model=64, decay_steps=100)
    run = types.SimpleNamespace(seed=0, data=data, d_model=64, float_model=finished)
    tuned = qat_finetune.fine_tune(run, 1)
    lr = 3e-3 * 0.1  # CharTransformer's peak learning rate, decayed to a tenth
    before, after = finished.head.weight.detach(), tuned.head.weight.detach()
    step = (before * (1 - lr * 0.01) - after).abs()  # AdamW: w * (1 - lr * wd), then the Adam step
    moved = step[step > 1e-9]
    assert moved.numel() > 0.9 * step.numel()
    assert float(moved.max()) <= lr * 1.001
    assert float(moved.median()) == pytest.approx(lr, rel=1e-3)
