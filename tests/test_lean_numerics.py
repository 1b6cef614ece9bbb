"""The memory-lean arithmetic of fake quantization, dequantization and the parity check
computes what the plain formulas and PyTorch's own fake-quant kernels compute, and the
memory it returns is returned."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from lightning_compress import export, load_packed
from lightning_compress.core.memory import release_freed_memory
from lightning_compress.formats import runtime
from lightning_compress.formats.blocks import row_blocks
from lightning_compress.formats.packed import read_packed
from lightning_compress.formats.parity import OutputError, check_parity
from lightning_compress.formats.runtime import PackedWeight
from lightning_compress.quant.fake_quant import (
    QuantizedWeight,
    choose_qparams,
    dequantize_codes,
    fake_quantize,
    quantize_codes,
)
from lightning_compress.quant.spec import QuantSpec
from lightning_compress.quant.weights import round_to_nearest
from tests.conftest import needs_int8_gemm

SPECS = [QuantSpec(bits, "group", 32, symmetric) for bits in (2, 3, 4, 8) for symmetric in (True, False)] + [
    QuantSpec(4, "channel"), QuantSpec(8, "tensor", symmetric=False)]


def _weight(rows=24, cols=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=generator) * torch.rand(rows, 1, generator=generator)


def _torch_fake_quant(weight, scale, zero_point, spec):
    """PyTorch's fused per-channel fake quantization, one channel per group: its forward is
    ``(clamp(round(x * (1/s)) + z) - z) * s`` and its gradient 1 inside the grid, 0 outside."""
    width = weight.numel() // scale.numel()
    groups = weight.reshape(-1, width)
    return torch.fake_quantize_per_channel_affine(groups, scale.reshape(-1), zero_point.reshape(-1).to(torch.int32),
                                                  0, spec.qmin, spec.qmax).view(weight.shape)


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.describe())
def test_fake_quantize_equals_torch_fused_kernel_with_and_without_gradient(spec):
    weight = _weight() * 1.3  # the grid below is chosen on the smaller weight: some values clip
    scale, zero_point = choose_qparams(_weight(), spec)
    leaf = weight.clone().requires_grad_()
    expected = _torch_fake_quant(leaf, scale, zero_point, spec)
    expected.backward(torch.ones_like(expected))
    ours = weight.clone().requires_grad_()
    trained = fake_quantize(ours, scale, zero_point, spec)
    trained.backward(torch.ones_like(trained))
    with torch.no_grad():
        evaluated = fake_quantize(weight, scale, zero_point, spec)
    assert torch.equal(trained, expected) and torch.equal(evaluated, expected)
    assert torch.equal(ours.grad, leaf.grad)
    assert 0 < int((leaf.grad == 0).sum()) < weight.numel()  # some values clipped, some not
    assert evaluated.grad_fn is None and trained.grad_fn is not None


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.describe())
def test_ranges_equal_the_min_max_formula(spec):
    weight = _weight()
    weight[0, :32] = 0.0  # a group of zeros
    groups = weight.reshape(scale_count(weight, spec), -1)
    scale, zero_point = choose_qparams(weight, spec)
    steps = spec.qmax - spec.qmin
    storage = getattr(torch, spec.scale_dtype)
    floor = torch.finfo(storage).smallest_normal  # at least float32's: a scale survives storage
    if spec.symmetric:
        reach = torch.tensor([max(abs(float(g.min())), abs(float(g.max()))) for g in groups])
        expected = (reach / (steps / 2)).clamp(min=floor)
    else:
        low = groups.min(dim=1).values.clamp(max=0)
        high = groups.max(dim=1).values.clamp(min=0)
        expected = ((high - low) / steps).clamp(min=floor)
    expected = expected.to(storage).float()
    assert torch.equal(scale, expected)
    if spec.granularity == "group":  # the group of zeros gets the smallest scale storage keeps
        assert float(scale[0]) == torch.tensor(floor).to(storage).item()


def scale_count(weight, spec):
    return {"group": weight.numel() // 32, "channel": weight.shape[0], "tensor": 1}[spec.granularity]


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.describe())
def test_packed_weight_dequantizes_a_row_block_at_a_time_to_the_formula(spec, monkeypatch):
    # Blocks of 5 rows (the default is 4M elements): 24 rows end in a short block.
    monkeypatch.setattr(runtime, "row_blocks", lambda rows, cols: row_blocks(rows, cols, 5 * cols))
    weight = _weight()
    scale, zero_point = choose_qparams(weight, spec)
    codes = quantize_codes(weight, scale, zero_point, spec)
    layer = type("Layer", (), {})()
    layer.weight = QuantizedWeight(codes, scale, zero_point, spec, tuple(weight.shape))
    packed = PackedWeight(layer)
    by_hand = (codes.float().reshape(-1, weight.numel() // scale.numel()) - zero_point.float().reshape(-1, 1)) \
        * scale.reshape(-1, 1)
    assert torch.equal(packed.dequantize(), by_hand.view(weight.shape))
    assert torch.equal(packed.dequantize(), dequantize_codes(codes, scale, zero_point, spec))
    rows = torch.tensor([23, 0, 7, 7])
    assert torch.equal(packed.dequantize(rows=rows), by_hand.view(weight.shape)[rows])


def test_output_error_sums_match_the_norms_by_hand(monkeypatch):
    figures = OutputError().add(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 0.0]))
    assert figures.relative_error == pytest.approx(0.8, abs=1e-15)  # ||(0, 4)|| / ||(3, 4)||
    assert figures.sqnr_db == pytest.approx(20 * math.log10(5 / 4), abs=1e-12)
    assert OutputError().add(torch.zeros(3), torch.zeros(3)).sqnr_db == math.inf
    zero = OutputError().add(torch.zeros(2), torch.tensor([0.0, 2.0]))
    assert zero.relative_error == 2.0 and zero.sqnr_db == -math.inf
    overflowed = OutputError().add(torch.ones(2), torch.tensor([1.0, math.inf]))
    assert overflowed.relative_error == math.inf and overflowed.sqnr_db == -math.inf
    assert math.isnan(OutputError().add(torch.ones(2), torch.tensor([1.0, math.nan])).sqnr_db)
    # Over several batches and chunks: the norms of the joined outputs, in float64.
    monkeypatch.setattr(OutputError, "CHUNK", 7)
    generator = torch.Generator().manual_seed(0)
    a = [torch.randn(n, generator=generator) for n in (5, 20, 1)]
    b = [x + 1e-3 * torch.randn(x.shape, generator=generator) for x in a]
    running = OutputError()
    for x, y in zip(a, b):
        running.add(x, y)
    joined_a, joined_b = torch.cat(a).double(), torch.cat(b).double()
    by_hand = float((joined_a - joined_b).norm() / joined_a.norm())
    assert running.relative_error == pytest.approx(by_hand, rel=1e-12)
    with pytest.raises(ValueError, match="outputs of 2 and 3 elements"):
        OutputError().add(torch.zeros(2), torch.zeros(3))


class _Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


@needs_int8_gemm
def test_per_layer_figures_over_several_batches_equal_the_layers_run_by_hand(tmp_path):
    """The check compares each layer as the model runs (nothing held per layer); its figures
    equal those of the loaded packed layers fed the recorded inputs, joined over the batches."""
    torch.manual_seed(0)
    model = _Chain()
    round_to_nearest(model, QuantSpec(8, "channel"))
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(n, 16, generator=generator) for n in (3, 5, 4)]
    export(model, tmp_path / "out", inputs=inputs)
    report = check_parity(model, read_packed(tmp_path / "out"), inputs, backend="fbgemm")
    loaded = load_packed(tmp_path / "out", _Chain, backend="fbgemm")
    assert loaded.packed_kernels == {"first": "fbgemm", "second": "fbgemm"}
    seen = {name: [] for name in ("first", "second")}
    hooks = [getattr(model, name).register_forward_hook(
        lambda _, args, out, name=name: seen[name].append((args[0], out))) for name in seen]
    with torch.no_grad():
        for x in inputs:
            model(x)
    for hook in hooks:
        hook.remove()
    rows = {row["layer"]: row for row in report.layers}
    for name, pairs in seen.items():
        reference = torch.cat([out.reshape(-1) for _, out in pairs]).double()
        with torch.no_grad():
            got = torch.cat([getattr(loaded, name)(x).reshape(-1) for x, _ in pairs]).double()
        error = float((reference - got).norm() / reference.norm())
        assert 0 < error < 0.05
        assert rows[name]["relative_error"] == pytest.approx(error, rel=1e-9)
        assert rows[name]["sqnr_db"] == pytest.approx(-20 * math.log10(error), rel=1e-9)
        assert rows[name]["kernel"] == "fbgemm"


TRIM_SCRIPT = textwrap.dedent("""
    import json, torch
    from lightning_compress.core.memory import release_freed_memory

    def rss():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024

    torch.empty(8 << 18).fill_(1)  # freeing an 8 MB block raises glibc's mmap threshold past 4 MB
    blocks = [torch.ones(1 << 20) for _ in range(64)]  # 64 x 4 MB, now from the heap
    del blocks[:-1]  # freed; the last one keeps the heap's top in place
    before = rss()
    trimmed = release_freed_memory()
    print(json.dumps({"trimmed": trimmed, "released": before - rss()}))
""")


GLIBC = platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc_trim")
def test_release_freed_memory_returns_freed_heap_blocks_to_the_system():
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}  # glibc defaults
    done = subprocess.run([sys.executable, "-c", TRIM_SCRIPT], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["trimmed"] is True
    assert figures["released"] >= 200 << 20, figures  # of the 252 MB freed
    assert release_freed_memory() is True


@pytest.mark.parametrize("failure", ["no malloc_trim", "CDLL(None) raises TypeError (Windows)", "not posix"])
def test_release_freed_memory_does_nothing_where_the_c_library_has_no_trim(monkeypatch, failure):
    from lightning_compress.core import memory

    class NoTrim:
        pass

    def cdll(name):
        if failure.startswith("CDLL"):
            raise TypeError("argument of type 'NoneType' is not iterable")
        return NoTrim()

    monkeypatch.setattr(memory, "_trim", memory._UNSET)
    monkeypatch.setattr(memory.ctypes, "CDLL", cdll)
    if failure == "not posix":
        monkeypatch.setattr(memory.os, "name", "nt")
    assert memory.release_freed_memory() is False
    assert memory.release_freed_memory() is False  # decided once, no second attempt raises
    pacer = memory.ReleasePacer(every=10)
    pacer.done(25)  # trims (nothing to call), no error
    assert pacer.pending == 0


def test_release_pacer_trims_once_per_every_bytes(monkeypatch):
    from lightning_compress.core import memory

    calls = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: calls.append(1) or True)
    pacer = memory.ReleasePacer(every=100)
    for size in (40, 40, 40, 10, 90, 5):  # 120 -> trim, 100 -> trim, 5 pending
        pacer.done(size)
    assert len(calls) == 2 and pacer.pending == 5


def test_effective_weights_of_a_training_step_are_trimmed_every_so_many_bytes(monkeypatch):
    """Each effective weight a transformed layer makes (forward, and its recomputation in the
    backward) counts toward a trim; a raw weight read through a layer without stages does
    not, nor does one on another device."""
    from lightning_compress.core import memory
    from lightning_compress.core.transforms import Stage, add_weight_transform

    calls = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: calls.append(1) or True)
    layer_bytes = 64 * 32 * 4
    monkeypatch.setattr(memory, "_EFFECTIVE_WEIGHTS", memory.ReleasePacer(every=3 * layer_bytes))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32, bias=False))
    plain = nn.Linear(32, 64)  # no stages: its weight is the raw parameter
    for layer in (model[0], model[2]):
        add_weight_transform(layer, Stage.FAKE_QUANT, lambda w: w * 2)
    for _ in range(3):
        # Two in the forward, one recomputed in the backward (the first layer's weight is not
        # saved: its input needs no gradient): 3 a step, 9 in all, a trim every 3.
        model(torch.randn(4, 32)).sum().backward()
        plain(torch.randn(4, 32))
    assert len(calls) == 3 and memory._EFFECTIVE_WEIGHTS.pending == 0
    memory.effective_weight_made(torch.empty(64, 32, device="meta"))
    assert memory._EFFECTIVE_WEIGHTS.pending == 0


def test_a_compiled_transformed_model_compiles_once_whatever_the_trim_count(monkeypatch):
    """The count is Python state: a compiled graph that read it guarded on it and recompiled
    at every call (fullgraph: an error at the recompile limit); a trim inside a trace could
    not be traced. Compiled forwards leave the count alone."""
    from lightning_compress.core import memory
    from lightning_compress.core.transforms import Stage, add_weight_transform

    monkeypatch.setattr(memory, "_EFFECTIVE_WEIGHTS", memory.ReleasePacer(every=64 * 32 * 4 * 3))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    for layer in (model[0], model[2]):
        add_weight_transform(layer, Stage.FAKE_QUANT, lambda w: w * 2)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(4, 32)
    with torch.no_grad():
        expected = model(x)
        for _ in range(12):  # past the recompile limit (8)
            assert torch.equal(compiled(x), expected)


class _SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_an_attention_unit_running_its_own_out_proj_does_not_measure_that_layer_twice(tmp_path, monkeypatch):
    """A packed attention layer runs the model's own ``out_proj`` (shared, not copied): while it
    runs, ``out_proj``'s hooks must not add a second, foreign measurement of that layer."""
    torch.manual_seed(0)
    model = _SelfAttention()
    round_to_nearest(model, QuantSpec(8, "channel"))
    inputs = [torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(n)) for n in range(3)]
    export(model, tmp_path / "out", inputs=inputs)
    added = []
    original_add = OutputError.add
    monkeypatch.setattr(OutputError, "add", lambda self, a, b: added.append(a.numel()) or original_add(self, a, b))
    report = check_parity(model, read_packed(tmp_path / "out"), inputs, backend="dequantize")
    assert report.passed and sorted(row["layer"] for row in report.layers) == ["attn", "attn.out_proj"]
    outputs = 3 * 2 * 3 * 8  # per layer: 3 batches of 2 x 3 tokens x 8 features
    # once per layer and batch, then the whole model's outputs once
    assert sum(added) == 2 * outputs + outputs, added


class _Thresholded(nn.Module):
    """An output whose size depends on its values (kept detections, kept tokens)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 64)

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        return y[y > 0.05]


@needs_int8_gemm
def test_an_output_whose_size_changes_on_the_int8_gemm_keeps_the_layers_exact(tmp_path):
    """The int8 GEMM moves values across the threshold, so the output has another size: that
    is an infinite error, and the layers run exact (a kernel choice never fails a correct
    export); forced onto the int8 GEMM, the export fails the check and says so."""
    from lightning_compress import ParityError

    torch.manual_seed(0)
    model = _Thresholded().eval()
    round_to_nearest(model, QuantSpec(8, "channel"))
    inputs = [torch.randn(64, 32, generator=torch.Generator().manual_seed(2))]
    report = export(model, tmp_path / "auto", inputs=inputs).parity
    assert report.passed and report.relative_error == 0.0 and report.kernels == {"a": "dequantize", "b": "dequantize"}
    assert all("model output under" in why for why in report.fallbacks.values())
    loaded = load_packed(tmp_path / "auto", _Thresholded)
    with torch.no_grad():
        assert torch.equal(loaded(inputs[0]), model(inputs[0]))
    with pytest.raises(ParityError, match="int8-GEMM SQNR -inf dB"):
        export(model, tmp_path / "forced", inputs=inputs, backend="fbgemm")


@pytest.mark.parametrize("threshold", [0, None], ids=["large", "small"])
def test_training_hands_back_the_heap_after_large_mask_updates_and_teacher_forwards(monkeypatch, threshold):
    """glibc keeps freed blocks of up to 32 MiB resident: a mask update's keep-masks and a
    teacher's activations would sit on top of the student's backward (0.1x and 0.2x of a
    134M LLaMA under glibc's defaults, benchmarks/training_memory.py). Where they are large,
    each is followed by a release (here: with the threshold at 0); where they are small,
    none, as the pages handed back are faulted in again (23% of a small model's step)."""
    from lightning_compress import KnowledgeDistillation, MagnitudePruning
    from lightning_compress.callbacks import distillation, pruning
    from lightning_compress.core import memory
    from tests.conftest import TinyRegressor, make_trainer, tiny_loader

    original = memory.release_after
    if threshold is not None:
        monkeypatch.setattr(memory, "TRAINING_RELEASE_BYTES", threshold)
    trims = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: trims.append(1) or True)
    seen = {"pruning": [], "teacher": []}
    monkeypatch.setattr(pruning, "release_after", lambda n, device: seen["pruning"].append(n) or original(n, device))
    monkeypatch.setattr(distillation, "release_after",
                        lambda n, device: seen["teacher"].append(n) or original(n, device))
    torch.manual_seed(0)
    module = TinyRegressor()
    prune = MagnitudePruning(0.5, start_step=0, end_step=6, update_every=2)
    # On the CPU whatever LC_TEST_ACCELERATOR says: this is the heap's trim (an accelerator has no trims).
    make_trainer(accelerator="cpu", max_steps=8, callbacks=[prune, KnowledgeDistillation(teacher="self")]).fit(
        module, tiny_loader())
    assert prune.sparsity > 0
    # Mask updates at steps 2, 4 and 6 (0% at step 0), each counting a byte a targeted weight;
    # one teacher forward a step, counting the teacher's bytes.
    weights = sum(p.numel() for name, p in module.named_parameters() if name.endswith("weight"))
    assert seen["pruning"] == [weights] * 3
    assert seen["teacher"] == [4 * sum(p.numel() for p in module.parameters())] * 8
    assert len(trims) == (11 if threshold == 0 else 0)
    # Work on an accelerator frees the accelerator's memory, not the heap: no trim for it.
    assert memory.release_after(1 << 40, torch.device("meta")) is False
    assert len(trims) == (11 if threshold == 0 else 0)


def test_the_teachers_logits_are_used_as_it_made_them_and_autograd_can_save_them():
    """The teacher runs without gradients rather than in inference mode, whose tensors
    autograd refuses to save, so its float32 logits need no copy (0.13x of a 134M LLaMA
    with a 32000-token vocabulary at the step's peak); a bfloat16 teacher's are converted."""
    from lightning_compress.distill.capture import OutputCapture
    from lightning_compress.distill.losses import kl_divergence

    made = []

    class Teacher(nn.Module):
        def forward(self, x):
            made.append(x @ torch.ones(4, 6, dtype=x.dtype))
            return made[-1]

    capture = OutputCapture()
    logits = capture.run_teacher(Teacher(), (torch.randn(3, 4),), {}, None)
    assert logits is made[-1] and not logits.is_inference() and not logits.requires_grad
    student = torch.randn(3, 6, requires_grad=True)
    kl_divergence(student, logits, temperature=2.0).backward()  # saved for the backward: no error
    assert student.grad is not None and student.grad.isfinite().all()
    converted = capture.run_teacher(Teacher(), (torch.randn(3, 4),), {}, torch.bfloat16)
    assert converted.dtype == torch.float32 and torch.equal(converted, made[-1].float())

    class InferenceTeacher(Teacher):
        @torch.inference_mode()
        def forward(self, x):
            return super().forward(x)

    copied = capture.run_teacher(InferenceTeacher(), (torch.randn(3, 4),), {}, None)
    assert made[-1].is_inference() and not copied.is_inference() and torch.equal(copied, made[-1])
    student = torch.randn(3, 6, requires_grad=True)
    kl_divergence(student, copied, temperature=2.0).backward()  # an inference tensor could not be saved


def test_a_copied_transformers_teacher_keeps_no_key_value_cache():
    """In eval mode a transformers model fills a key/value cache in every forward, for
    generation; the teacher's copy only scores, so it does not (0.07x of a 134M LLaMA at
    the teacher's peak). Its logits are the model's; the student's own setting is kept."""
    import transformers

    from lightning_compress.distill.teacher import freeze, frozen_copy

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=32)
    student = transformers.LlamaForCausalLM(config).eval()
    teacher = freeze(frozen_copy(student))
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        ours, theirs = teacher(input_ids=ids), student(input_ids=ids)
    assert student.config.use_cache is True and theirs.past_key_values is not None
    assert teacher.config.use_cache is False and ours.past_key_values is None
    assert torch.equal(ours.logits, theirs.logits)


def test_a_config_that_is_not_transformers_is_left_alone():
    """Only a transformers config's cache switch is turned off: a user's own frozen
    config holding a `use_cache` field is neither changed nor a reason to fail."""
    import dataclasses

    from lightning_compress.distill.teacher import frozen_copy

    @dataclasses.dataclass(frozen=True)
    class Settings:
        use_cache: bool = True

    module = nn.Linear(2, 2)
    module.config = Settings()
    assert frozen_copy(module).config.use_cache is True
