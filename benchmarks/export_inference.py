"""File size and CPU inference speed of packed exports, side by side in one run.

Model: two transformer MLP blocks (768 -> 3072 -> 768, GELU), 9.4M parameters in Linear
layers. Sizes are model.safetensors vs the float32 safetensors of the same model.
Speed: float32 eager, torchao `quantize_` on CPU, our loaded packed models with
`load_packed`'s defaults (the kernels the export measured; and `cache_dequantized=True`
beside them), and our ONNX files in onnxruntime, at batch 1 and batch 128, timed
interleaved (rotating order, median of rounds) so drift on this shared machine hits
every configuration alike. Each packed model's output SQNR against its fake-quant model
is printed beside it.
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import headline, machine  # noqa: E402
from lightning_compress import export, load_packed  # noqa: E402
from lightning_compress._torchao import import_torchao  # noqa: E402
from lightning_compress.formats.parity import sqnr_db  # noqa: E402
from lightning_compress.quant.spec import QuantSpec  # noqa: E402
from lightning_compress.quant.weights import round_to_nearest  # noqa: E402

D = 768


def build(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    blocks = []
    for _ in range(2):
        blocks += [nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D)]
    return nn.Sequential(*blocks).eval()


def float_bytes(model: nn.Module, directory: Path) -> int:
    from safetensors.torch import save_file

    path = directory / "float.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.stat().st_size


def prune_(model: nn.Module, sparsity: float) -> None:
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                cut = layer.weight.abs().flatten().kthvalue(int(sparsity * layer.weight.numel())).values
                layer.weight[layer.weight.abs() <= cut] = 0


def timed(fn, calls: int) -> float:
    # onnxruntime's pool threads spin for a while after a run, taking the CPU from whatever
    # is timed next (in the rotation below, always the same config: float32 eager); a pause
    # lets them sleep, and every config gets the same one.
    time.sleep(0.2)
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls

INT8_DYNAMIC = "ours int8, dynamic int8 activations (load_packed defaults)"
INT8_WEIGHT_ONLY = "ours int8 weight-only (load_packed defaults)"
INT8_LOOSE = "ours int8 weight-only, exported with min_sqnr_db=30 (load_packed defaults)"
INT4 = "ours int4 g128 (load_packed defaults: dequantize)"
ONNX_INT4_INT8_ACT = "ONNX int4 + int8 activations (MatMulNBits accuracy_level=4, onnx_activations='int8') in onnxruntime"
INFERENCE_TARGETS = {
    INT8_DYNAMIC: ">= 1.5x at both sizes (issues 6, 17)",
    INT8_WEIGHT_ONLY: ">= 1.5x at both sizes (issue 17)",
    "ONNX int8 (MatMulInteger) in onnxruntime": ">= 2x (issue 6)",
    # Exact: onnxruntime's float x int4 kernel, reported; issue 17's >= 3x at batch 1 is
    # asked of the ONNX int4 file, which onnx_activations="int8" makes (36.8 dB).
    ONNX_INT4_INT8_ACT: ">= 3x at batch 1 (issue 17)",
}


def with_dynamic_int8_activations(model: nn.Module) -> nn.Module:
    """Int8 per-channel weights and QAT's dynamic int8 activation stage on every Linear."""
    from lightning_compress.core.transforms import Stage, add_input_transform
    from lightning_compress.quant.activations import DynamicTokenQuantizer

    round_to_nearest(model, QuantSpec(8))
    for layer in model:
        if isinstance(layer, nn.Linear):
            quantizer = DynamicTokenQuantizer()
            quantizer.enabled = True
            add_input_transform(layer, Stage.INPUT_QUANT, quantizer)
    return model


def main() -> None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    work = Path(tempfile.mkdtemp())
    reference = build()
    float_size = float_bytes(reference, work)
    sizes = []
    for label, spec, sparsity, target in [
        ("int8 per-channel", QuantSpec(8), 0.0, 3.9),
        ("int4 group-128, float16 scales", QuantSpec(4, "group", 128, scale_dtype="float16"), 0.0, 7.5),
        ("90% sparse + int8 per-channel", QuantSpec(8), 0.9, 10.0),
    ]:
        model = build()
        if sparsity:
            prune_(model, sparsity)
        round_to_nearest(model, spec)
        report = export(model, work / label.replace(" ", "_"), inputs=[torch.randn(4, D)])
        sizes.append((label, report.file_bytes, float_size / report.file_bytes, target))

    x1, x128 = torch.randn(1, D), torch.randn(128, D)
    # The parity inputs (what the export measures the kernels on) are not the timed ones.
    parity_inputs = [torch.randn(32, D, generator=torch.Generator().manual_seed(7))]
    fake_quant = {}  # label -> the fake-quant model its packed model is compared with
    int8 = build()
    round_to_nearest(int8, QuantSpec(8))
    int8_dir = work / "speed_int8"
    export(int8, int8_dir, inputs=parity_inputs, formats=["safetensors", "onnx"])
    loose_dir = work / "speed_int8_30db"  # what a user who accepts 30 dB gets
    export(int8, loose_dir, inputs=parity_inputs, min_sqnr_db=30)
    int8_dynamic = with_dynamic_int8_activations(build())
    dynamic_dir = work / "speed_int8_dynamic"
    export(int8_dynamic, dynamic_dir, inputs=parity_inputs)
    int4 = build()
    round_to_nearest(int4, QuantSpec(4, "group", 128))
    int4_dir = work / "speed_int4"
    export(int4, int4_dir, inputs=parity_inputs, formats=["safetensors", "onnx"])

    configs = {"float32 eager": reference}
    kernels = {}  # label -> the kernels its layers run ("3 fbgemm, 1 dequantize")
    for label, directory, model in [(INT8_DYNAMIC, dynamic_dir, int8_dynamic), (INT8_WEIGHT_ONLY, int8_dir, int8),
                                    (INT8_LOOSE, loose_dir, int8), (INT4, int4_dir, int4)]:
        for cached in (False, True):
            name = label if not cached else label.replace("load_packed defaults", "cache_dequantized=True").replace(
                ": dequantize", "")
            loaded = load_packed(directory, build(1), cache_dequantized=cached)
            ran = sorted(loaded.packed_kernels.values())
            if cached and ("cached" not in ran or label == INT8_LOOSE):
                continue  # every layer on the int8 GEMM: the cache changes nothing
            configs[name], fake_quant[name] = loaded, model
            kernels[name] = ", ".join(f"{ran.count(kernel)} {kernel}" for kernel in dict.fromkeys(ran))
    torchao = import_torchao()
    from torchao.quantization import quantize_

    for label, make_config in [
        ("torchao int8 dynamic act + int8 weight", lambda q: q.Int8DynamicActivationInt8WeightConfig()),
        ("torchao int4 weight-only (IntxWeightOnly g128)",
         lambda q: q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=q.PerGroup(128))),
    ]:
        try:
            model = copy.deepcopy(reference)
            quantize_(model, make_config(torchao.quantization))
            model(x1)
            configs[label] = model
        except Exception as err:  # a config this torchao cannot run on CPU is reported, not hidden
            print(f"<!-- {label}: {type(err).__name__}: {str(err)[:120]} -->")

    import onnxruntime as ort

    # What `export(..., onnx_activations="int8")` writes (and checks, to 30 dB here).
    int8_act_dirs = {}
    for name, model in (("int8", int8), ("int4", int4)):
        int8_act_dirs[name] = work / f"speed_{name}_int8_activations"
        export(model, int8_act_dirs[name], inputs=parity_inputs, formats=["safetensors", "onnx"],
               onnx_activations="int8", min_sqnr_db=30)
    for label, path in [("ONNX int8 (MatMulInteger) in onnxruntime", int8_act_dirs["int8"]),
                        ("ONNX int4 (MatMulNBits) in onnxruntime", int4_dir),
                        (ONNX_INT4_INT8_ACT, int8_act_dirs["int4"])]:
        onnx_path = path / "model.onnx"
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = torch.get_num_threads()
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        configs[label] = (lambda s, n: (lambda x: torch.from_numpy(s.run(None, {n: x.numpy()})[0])))(session, name)

    rounds = 5
    results = {}
    for batch, x, calls in [(1, x1, 100), (128, x128, 10)]:
        times = {label: [] for label in configs}
        labels = list(configs)
        for index in range(rounds):
            order = labels[index % len(labels):] + labels[: index % len(labels)]
            for label in order:
                model = configs[label]
                with torch.no_grad():
                    times[label].append(timed(lambda: model(x), calls))
        results[batch] = {label: statistics.median(t) for label, t in times.items()}

    with torch.no_grad():
        sqnr = {label: sqnr_db(fake_quant[label](x128), configs[label](x128)) for label in fake_quant}
        # Batch 1 runs another path (fbgemm's one-token kernel): 128 tokens one at a time.
        sqnr1 = {label: sqnr_db(fake_quant[label](x128), torch.cat([configs[label](token) for token in x128.split(1)]))
                 for label in fake_quant}
        sqnr["ONNX int8 (MatMulInteger) in onnxruntime"] = sqnr_db(
            int8(x128), configs["ONNX int8 (MatMulInteger) in onnxruntime"](x128))
        for label in ("ONNX int4 (MatMulNBits) in onnxruntime", ONNX_INT4_INT8_ACT):
            sqnr[label] = sqnr_db(int4(x128), configs[label](x128))

    print("## Export: file size and CPU inference")
    print()
    print(f"`python benchmarks/export_inference.py` ({machine()}); model: 2 MLP blocks 768-3072-768,"
          f" 9.4M parameters; float32 safetensors {float_size:,} bytes.")
    print()
    print("| format | model.safetensors bytes | smaller than float32 | target |")
    print("|---|---|---|---|")
    for label, size, ratio, target in sizes:
        print(f"| {label} | {size:,} | {ratio:.2f}x | >= {target}x |")
        bits = 32 / ratio
        headline("file size", f"{label}, 9.4M-parameter MLP: float32 bytes / model.safetensors bytes",
                 f"{ratio:.2f}x ({bits:.3f} bits/weight)", f">= {target}x (issue 6)")
    print()
    print("| CPU inference | kernels | batch 1 (us) | speed vs float32 | batch 128 (ms) | speed vs float32 |"
          " SQNR vs fake-quant (dB), batch 1 / 128 |")
    print("|---|---|---|---|---|---|---|")
    base1, base128 = results[1]["float32 eager"], results[128]["float32 eager"]
    for label in configs:
        t1, t128 = results[1][label], results[128][label]
        db = "" if label not in sqnr else " / ".join("exact" if value == float("inf") else f"{value:.1f}"
                                                     for value in (sqnr1.get(label), sqnr[label]) if value is not None)
        print(f"| {label} | {kernels.get(label, '')} | {t1 * 1e6:.0f} | {base1 / t1:.2f}x | {t128 * 1e3:.2f} |"
              f" {base128 / t128:.2f}x | {db} |")
        if label != "float32 eager":
            ran = f" [{kernels[label]}]" if label in kernels else ""
            headline("CPU inference", f"{label}{ran}: speed vs float32 eager, batch 1 / batch 128",
                     f"{base1 / t1:.2f}x / {base128 / t128:.2f}x", INFERENCE_TARGETS.get(label))
    print()
    print("The kernels are those the export's parity check chose (min_sqnr_db, 35 dB by default, plus its 1 dB"
          " margin, per layer and for the model, on 32 parity inputs): a layer whose int8 GEMM misses it runs the"
          " exact dequantize path. The SQNR column is measured on the timed batch of 128 (and on its 128 tokens fed"
          " one at a time, for our PyTorch paths), not the parity inputs.")
    print()
    # Each of our paths against torchao's at the same bit width. The int4 CPU serving path
    # is the ONNX export (MatMulNBits); the PyTorch-eager int4 layer dequantizes per call,
    # as torchao's IntxWeightOnly does, and is reported beside it.
    torchao_int8, torchao_int4 = "torchao int8 dynamic act + int8 weight", "torchao int4 weight-only (IntxWeightOnly g128)"
    for label, torchao in ((INT8_DYNAMIC, torchao_int8), ("ONNX int4 (MatMulNBits) in onnxruntime", torchao_int4),
                           (INT4, torchao_int4)):
        target = None if label == INT4 else ">= 1x: faster than torchao on CPU (mission)"
        headline("CPU inference", f"{label} vs {torchao}, batch 1 / batch 128",
                 f"{results[1][torchao] / results[1][label]:.2f}x / {results[128][torchao] / results[128][label]:.2f}x",
                 target)
    print()
    print("Targets: int8 per-channel >= 3.9x smaller, int4 g128 >= 7.5x (7.76x limit with float16"
          " scales), 90% sparse + int8 >= 10x; our int8 (weight-only or not) >= 1.5x faster than float32 eager"
          " at batch 1 and 128; ONNX int8 >= 2x; ONNX int4 >= 3x at batch 1.")


if __name__ == "__main__":
    main()
