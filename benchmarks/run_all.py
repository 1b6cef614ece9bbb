"""`make bench`: run every benchmark here and rewrite BENCHMARKS.md from what they print.

Each benchmark prints a markdown section (a heading line starting with '#', tables, and
its target) and one ``ROW {json}`` line per headline figure (see ``common.headline``).
The figures of every run are kept in ``benchmarks/results.json``; BENCHMARKS.md is made
from that file: one summary table per area (training overhead, accuracy vs PTQ, file
size, CPU inference, test quality), each row with its command, date and machine and the
issue's target beside the figure, then every benchmark's own tables. The test-quality
entry (the mutation score) is kept there by `make mutation` (`ci/mutation_score.py
--record`), not by a benchmark script. Nothing in BENCHMARKS.md is written by hand.

    python benchmarks/run_all.py              # every benchmark (what `make bench` runs)
    python benchmarks/run_all.py NAME [NAME]  # re-run some; keep the others' last figures
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results.json"
REPORT = HERE.parent / "BENCHMARKS.md"
AREAS = ["training overhead", "memory", "accuracy vs PTQ", "file size", "CPU inference", "test quality"]
# Fewer rounds/seeds than the scripts' defaults for the quicker benchmarks; the scripts' own
# defaults are for a closer look at one area. The durations recorded in BENCHMARKS.md add up
# to about 5.5 hours on 2 cores (2026-11-29): most of it the several-seed accuracy benchmarks
# of issue 19 (qat_init alone 104 minutes), which train every seed's model, so
# `python benchmarks/run_all.py NAME` is the way to re-run one area.
ARGS = {
    "qat_accuracy.py": ["--seeds", "2"],
    "qat_overhead.py": ["--rounds", "3"],
    "pruning_overhead.py": ["--rounds", "5"],
    "lora_minilm.py": ["--rounds", "3"],
    "distill_accuracy.py": ["--seeds", "2"],
    "qat_init.py": ["--seeds", "3"],
    "qat_regimes.py": ["--seeds", "3"],
    "qat_trajectory.py": ["--seeds", "3"],
    "qat_finetune.py": ["--seeds", "3"],
    "qat_ewgs.py": ["--seeds", "5"],
    "qat_averaging.py": ["--seeds", "5"],
}
NOISE_NOTE = (
    "On this 2-core shared machine, repeated runs of the same overhead benchmark moved by up"
    " to about 12% (QAT int8 with dynamic activations: 1.098x in one run, 0.981x in the next),"
    " so a ratio within that distance of its target is not evidence either way."
)
FILE_SIZE_NOTE = (
    "The 4.125-bit limit: int4 codes plus one float16 scale per group of 128 weights take"
    " 4 + 16/128 = 4.125 bits per weight, so a float32 model can shrink at most 32/4.125 = 7.76x"
    " with int4 group-128 weights and float16 scales."
)

CPU_NOTE = (
    "The mission's target, faster than torchao on CPU, is checked on our CPU serving path at"
    " each bit width: int8 through our int8 GEMM in PyTorch (oneDNN's u8 x s8 GEMM; the kernel's"
    " name, `fbgemm`, is PyTorch's name for its x86 int8 engine), int4 through onnxruntime's MatMulNBits on"
    " our ONNX export. PyTorch has no fast int4 CPU kernel on this machine (ATen's"
    " `_weight_int4pack_mm_for_cpu` ran at 0.07x of float32 at batch 1 and 0.02x at batch 128 on"
    " a 3072x3072 layer, in a one-off check outside these benchmarks), so our PyTorch int4 layer"
    " dequantizes inside each call, as torchao's"
    " IntxWeightOnly does; it is reported beside torchao without a target. Before 2026-11-24's"
    " dequantization change it ran at 0.63x / 0.84x of torchao's speed. On an x86 CPU without VNNI"
    " the u8 x s8 int8 GEMM saturates, so our PyTorch int8 layers run the exact dequantize path"
    " there (the kernel column says which ran), and onnxruntime gets uint8 weights in the int8"
    " ONNX file; on 2026-11-30, on a 2-core x86_64 machine with VNNI, this benchmark measured our"
    " int8 layers on the int8 GEMM at 1.60x / 2.26x of float32 (dynamic activations) and"
    " 1.88x / 2.29x (weight-only), and the int8 ONNX file at 2.81x / 2.66x."
)


def machine() -> str:
    import torch

    return f"{platform.machine()}, {os.cpu_count()} cores{_int8_dot()}, torch {torch.__version__}"


def _int8_dot() -> str:
    """", VNNI" or ", no VNNI" on x86 (whether u8 x s8 products add without saturating: the
    int8 GEMM's speed and the kernel PyTorch's int8 layers get depend on it), else ""."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return ", VNNI" if any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8")) else ", no VNNI"


def markdown_section(lines: list) -> list:
    """The markdown a benchmark printed: heading, tables and target lines, with one blank
    line where it left blank lines (so two tables, or a table and the line after it,
    stay apart in GitHub's rendering); anything else it printed is left out."""
    section: list = []
    for line in lines:
        if line.startswith(("#", "|", "Target")):
            section.append(line)
        elif not line.strip() and section and section[-1]:
            section.append("")
    while section and not section[-1]:
        section.pop()
    return section


def run_benchmark(script: Path) -> dict:
    """Run one benchmark; its section, headline rows and how it was run."""
    args = ARGS.get(script.name, [])
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=HERE.parent)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{script.name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    lines = result.stdout.splitlines()
    rows = [json.loads(line[4:]) for line in lines if line.startswith("ROW ")]
    section = markdown_section(lines)
    if not rows or not section:
        raise RuntimeError(f"{script.name} printed no ROW lines or no markdown section")
    return {
        "command": " ".join(["python", f"benchmarks/{script.name}", *args]),
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "seconds": round(seconds),
        "heading": section[0].lstrip("# "),
        "body": section[2:] if len(section) > 1 and not section[1] else section[1:],
        "rows": rows,
    }


FULL_RUN = "_full_run"  # results.json key: how long the last run of every benchmark took


def render(results: dict) -> str:
    """BENCHMARKS.md from the stored results."""
    full_run = results.get(FULL_RUN)
    results = {name: entry for name, entry in results.items() if name != FULL_RUN}
    dates = sorted({entry["date"] for entry in results.values()})
    lines = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (the test-quality row by `make mutation`) from `benchmarks/results.json`"
        f" (runs dated {', '.join(dates)})."
        " Each ratio is measured side by side in one process, so it holds when the shared"
        " machine's absolute speed drifts. " + NOISE_NOTE,
        "",
    ]
    if full_run is not None:
        lines += [f"The last whole `make bench` run ({full_run['date']}) took {full_run['seconds'] / 60:.1f} minutes"
                  "; benchmarks re-run alone since then carry their own date.", ""]
    for area in AREAS:
        lines += [f"## {area[0].upper() + area[1:]}", ""]
        if area == "file size":
            lines += [FILE_SIZE_NOTE, ""]
        if area == "CPU inference":
            lines += [CPU_NOTE, ""]
        lines += ["| measurement | figure | target | command | date | machine |", "|---|---|---|---|---|---|"]
        for name, entry in sorted(results.items()):
            for row in entry["rows"]:
                if row["area"] == area:
                    target = row["target"] or "reported"
                    lines.append(
                        f"| {row['metric']} | {row['figure']} | {target} | `{entry['command']}` | {entry['date']}"
                        f" | {entry['machine']} |"
                    )
        lines.append("")
    lines += ["## Details", "", "Every benchmark's own tables, as it printed them.", ""]
    for name, entry in sorted(results.items()):
        lines += [
            f"### {name}",
            "",
            entry["heading"],
            "",
            f"Command: `{entry['command']}` ({entry['seconds']} s, {entry['date']}, {entry['machine']})",
            "",
            *entry["body"],
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    # A benchmark is a script; shared modules (common.py) have no __main__ block.
    scripts = sorted(p for p in HERE.glob("*.py") if p.name != "run_all.py" and "__main__" in p.read_text())
    chosen = [p for p in scripts if p.stem in sys.argv[1:]] if len(sys.argv) > 1 else scripts
    unknown = set(sys.argv[1:]) - {p.stem for p in scripts}
    if unknown:
        print(f"unknown benchmarks {sorted(unknown)}; choose from {[p.stem for p in scripts]}", file=sys.stderr)
        return 2
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    started = time.perf_counter()
    for script in chosen:
        print(f"running {script.name} {' '.join(ARGS.get(script.name, []))}...", flush=True)
        try:
            entry = run_benchmark(script)
        except RuntimeError as err:
            print(err, file=sys.stderr)
            return 1
        # Read again: another run_all (of other benchmarks) may have saved meanwhile.
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        results[script.stem] = entry
        print(f"  {entry['seconds']} s; " + "; ".join(f"{r['metric']}: {r['figure']}" for r in entry["rows"][:3]), flush=True)
        # Saved after every benchmark, so an interrupted `make bench` keeps what it measured.
        RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if len(chosen) == len(scripts):
        results[FULL_RUN] = {"seconds": round(time.perf_counter() - started), "date": datetime.date.today().isoformat()}
        RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    REPORT.write_text(render(results))
    print(f"wrote {REPORT.name} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
