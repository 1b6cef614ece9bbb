"""Export and load_packed memory and time against model size, this implementation and the
previous one (commit 4f49dc0, before streaming) side by side in one run (issue 18).

Three LlamaForCausalLM sizes (transformers ``LlamaConfig``, random init, nothing
downloaded; vocabulary 32000, untied head) with int4 group-128 weights on every Linear
layer, head included (``round_to_nearest``: the QAT transform installed and enabled, as
at the end of a QAT run). Each figure comes from a fresh process that first exports and
loads a tiny model (so lazily imported modules are in its baseline), then:

- export: builds the model (``baseline`` is the resident memory before it), resets the
  peak (``/proc/self/clear_refs``), exports with the parity check on one batch of 32
  tokens; peak = VmHWM - baseline, over the float32 model's bytes (the model included:
  the issue's 8.3x).
- load: ``load_packed(directory, factory)``; peak = VmHWM - baseline over the bytes the
  loaded model holds (its packed codes and scales, float layers and buffers); ``kept``:
  resident memory after it, over the same.

The previous implementation runs from a git worktree of 4f49dc0 (``PYTHONPATH``), created
in the system's temporary directory if missing. A run that would not fit this shared
machine's free memory is capped (``RLIMIT_AS``) and reported as not fitting. The
processes' memory is their own: other work on the machine does not change it, only the
times (2 shared cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PREVIOUS = "4f49dc0"
SIZES = {  # name -> hidden, layers, heads, intermediate
    "134M": (768, 12, 12, 2048),
    "271M": (1024, 16, 16, 2816),
    "529M": (1280, 22, 20, 3584),
}
EXPORT_TARGET, LOAD_TARGET = 1.3, 1.3


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field)).split()[1]) * 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def _llama(size: str):
    import torch
    import transformers

    hidden, layers, heads, intermediate = SIZES[size] if size in SIZES else (128, 2, 4, 256)
    config = transformers.LlamaConfig(vocab_size=32000 if size in SIZES else 256, hidden_size=hidden,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=heads, intermediate_size=intermediate,
                                      max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def worker(mode: str, size: str, directory: str, budget: int) -> dict:
    """One measurement, in this (fresh) process; the implementation is whatever
    ``lightning_compress`` PYTHONPATH finds."""
    import gc

    import torch
    from torch import nn

    import lightning_compress
    from lightning_compress import export, load_packed
    from lightning_compress.quant.spec import QuantSpec
    from lightning_compress.quant.weights import round_to_nearest

    torch.set_num_threads(1)
    tokens = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(1))

    def quantized(name):
        model = _llama(name)
        round_to_nearest(model, QuantSpec(4, "group", 128), targets=[nn.Linear])
        return model

    with tempfile.TemporaryDirectory() as warm:  # lazy imports land in the baseline
        export(quantized("tiny"), Path(warm) / "out", inputs=[tokens])
        load_packed(Path(warm) / "out", lambda: _llama("tiny"))
    gc.collect()
    if budget:
        resource.setrlimit(resource.RLIMIT_AS, (_status("VmSize") + budget, resource.RLIM_INFINITY))
    base = _status("VmRSS")
    started = time.perf_counter()
    try:
        if mode == "export":
            model = quantized(size)
            model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            gc.collect()
            _reset_peak()
            started = time.perf_counter()
            export(model, directory, inputs=[tokens], compressed_tensors=False)
            seconds = time.perf_counter() - started
            return {"peak": _status("VmHWM") - base, "model": model_bytes, "seconds": seconds,
                    "file": (Path(directory) / "model.safetensors").stat().st_size, "code": lightning_compress.__file__}
        _reset_peak()
        loaded = load_packed(directory, lambda: _llama(size))
        seconds = time.perf_counter() - started
        held = sum(t.numel() * t.element_size() for t in [*loaded.parameters(), *loaded.buffers()])
        return {"peak": _status("VmHWM") - base, "kept": _status("VmRSS") - base, "held": held, "seconds": seconds}
    except MemoryError:
        return {"failed": f"ran out of the {budget / 2**30:.1f} GB allowed"}
    except RuntimeError as error:
        if "alloc" not in str(error).lower():
            raise
        return {"failed": f"ran out of the {budget / 2**30:.1f} GB allowed"}


def _available() -> int:
    with open("/proc/meminfo") as info:
        return int(next(line for line in info if line.startswith("MemAvailable")).split()[1]) * 1024


def _previous_tree(work: Path) -> Path:
    """The package as of :data:`PREVIOUS`, extracted with ``git archive`` (the checkout is not touched)."""
    tree = work / PREVIOUS
    tree.mkdir()
    archive = subprocess.run(["git", "archive", PREVIOUS, "lightning_compress"], cwd=REPO, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def measure(implementation: Path, mode: str, size: str, directory: Path, need: int) -> dict:
    """Run :func:`worker` in a fresh process with ``implementation`` first on the path,
    capped to the free memory minus 3 GB when ``need`` (an estimate) comes near it."""
    spare = _available() - (3 << 30)
    budget = spare if need > spare else 0
    env = {**os.environ, "PYTHONPATH": str(implementation)}
    done = subprocess.run([sys.executable, __file__, "--worker", mode, size, str(directory), str(budget)],
                          capture_output=True, text=True, cwd=implementation, env=env)
    if done.returncode != 0:
        if budget:
            return {"failed": f"did not fit in {budget / 2**30:.1f} GB (exit {done.returncode})"}
        raise RuntimeError(f"{mode} {size} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(sizes) -> None:
    sys.path.insert(0, str(HERE))
    from common import headline, machine, print_table

    work = Path(tempfile.mkdtemp(prefix="export-memory-"))
    results: dict = {}
    try:
        trees = {"streaming": REPO, f"previous ({PREVIOUS})": _previous_tree(work)}
        for size in sizes:
            for label, tree in trees.items():
                out = work / f"{label.split()[0]}-{size}"
                figures = results.setdefault((label, size), {})
                params = sum(_parameter_count(size))
                old = label.startswith("previous")
                figures["export"] = measure(tree, "export", size, out, int((8.5 if old else 1.5) * params * 4))
                source = out if (out / "model.safetensors").exists() else work / f"streaming-{size}"
                figures["load"] = measure(tree, "load", size, source, int((6.0 if old else 1.5) * params * 4))
                print(f"{label} {size}: {json.dumps(figures)}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _report(results, headline, machine, print_table)


def _parameter_count(size: str):
    hidden, layers, heads, intermediate = SIZES[size]
    yield 2 * 32000 * hidden + hidden
    yield layers * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden)


def _report(results, headline, machine, print_table) -> None:
    print("# Export and load_packed memory against model size (issue 18)")
    print()
    print(f"LlamaForCausalLM, vocabulary 32000, untied head, int4 group-128 weights on every Linear (head included),"
          f" random init; {machine()}, 1 thread. Peak resident memory above each fresh process's baseline;"
          " export: over the float32 model (the model itself included), with the parity check on 32 tokens;"
          " load: over what the loaded model holds (packed codes and scales, float layers, buffers), from a"
          " factory (`load_packed(dir, build)`).")
    print()
    rows = []
    for (label, size), figures in results.items():
        export, load = figures["export"], figures["load"]
        rows.append([size, label, *_export_cells(export), *_load_cells(load)])
    print_table(["model", "implementation", "float32 model", "export peak", "export peak / model", "export s",
                 "file", "load peak", "load peak / held", "kept / held", "load s"], rows)
    print()
    print(f"Target (issue 18): export peak at most {EXPORT_TARGET}x the float model with the parity check on; load"
          f" peak at most {LOAD_TARGET}x the packed size plus the float layers.")
    for (label, size), figures in results.items():
        if not label.startswith("streaming"):
            continue
        export, load = figures["export"], figures["load"]
        previous = results[(f"previous ({PREVIOUS})", size)]
        if "peak" in export:
            old = previous["export"]
            was = f" (previous: {old['peak'] / old['model']:.2f}x)" if "peak" in old else " (previous: did not fit)"
            headline("memory", f"export peak RSS / float32 model, {size} LLaMA int4 g128, parity on{was}",
                     f"{export['peak'] / export['model']:.2f}x", f"<= {EXPORT_TARGET}x (issue 18)")
        if "peak" in load:
            old = previous["load"]
            was = f" (previous: {old['peak'] / old['held']:.2f}x)" if "peak" in old else " (previous: did not fit)"
            headline("memory", f"load_packed peak RSS / packed + float layers, {size} LLaMA{was}",
                     f"{load['peak'] / load['held']:.2f}x", f"<= {LOAD_TARGET}x (issue 18)")


def _mb(value: int) -> str:
    return f"{value / 2**20:,.0f} MB"


def _export_cells(export: dict) -> list:
    if "failed" in export:
        return ["", export["failed"], "", "", ""]
    return [_mb(export["model"]), _mb(export["peak"]), f"{export['peak'] / export['model']:.2f}x",
            f"{export['seconds']:.1f}", _mb(export["file"])]


def _load_cells(load: dict) -> list:
    if "failed" in load:
        return [load["failed"], "", "", ""]
    return [_mb(load["peak"]), f"{load['peak'] / load['held']:.2f}x", f"{load['kept'] / load['held']:.2f}x",
            f"{load['seconds']:.1f}"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {list(SIZES)}")
    parser.add_argument("--worker", nargs=4, metavar=("MODE", "SIZE", "DIR", "BUDGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, size, directory, budget = args.worker
        print(json.dumps(worker(mode, size, directory, int(budget))))
    else:
        main(args.sizes.split(","))
