"""Training memory: peak resident memory of a few training steps of a 134M-parameter
LLaMA (transformers ``LlamaForCausalLM``, random weights, 8 x 64 tokens, SGD) above the
built model, in units of the float32 model's size, for plain training and for each
compression callback; the same for the previous implementation (a git worktree of
``--previous``) in the same run, each configuration in a fresh process.

    python benchmarks/training_memory.py [--previous 4f49dc0] [--steps 3] [--configs plain,pruning]
                                         [--mmap-threshold 131072]

Peak resident memory is not only what is alive: glibc's malloc raises its mmap threshold
each time a large block is freed (up to 32 MiB), after which blocks below it come from the
heap and are kept after they are freed. A layer's transient effective weight (16 MiB for
this model's attention projections) is such a block, so the peak also holds freed memory.
``--mmap-threshold BYTES`` runs every child (now, previous and plain alike) with
``MALLOC_MMAP_THRESHOLD_=BYTES``, which fixes the threshold, so that the figures measure
what the callbacks keep alive; without it the figures are glibc's defaults, what a user
gets. ``training_memory_live.py`` runs this with the threshold fixed at 128 KiB.

Targets (issue 18): pruning at most +0.1x the float model over plain training, QAT at
most +0.3x, the full stack (pruning + QAT + distillation from the model itself) at most
the teacher's size (1.0x here) + 0.4x.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("plain", "pruning", "qat", "lora", "qlora", "stack")
TARGETS = {"pruning": 0.1, "qat": 0.3, "stack": 1.4}  # over plain, in float-model units


def child(config: str, steps: int) -> None:
    """Runs in a fresh process: build, reset the peak, train, print the figures."""
    import logging
    import warnings

    import lightning.pytorch as pl
    import torch

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import lightning_compress as lc

    sys.path.append(str(Path(__file__).resolve().parent))  # after the library under test
    from llama_lm import CausalLM, peak_rss, peak_rss_reset, token_loader

    torch.set_num_threads(2)
    module = CausalLM()
    model_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    loader = token_loader(steps, 8)
    targets = ["model.model.layers.*"]
    callbacks = {
        "plain": [],
        "pruning": [lc.MagnitudePruning(0.5, targets=targets, schedule="one_shot", start_step=0)],
        "qat": [lc.QuantizationAwareTraining("int4", group_size=32, targets=targets)],
        "lora": [lc.LoRA(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])],
        "qlora": [lc.LoRA(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"], base="nf4")],
        "stack": [lc.MagnitudePruning(0.5, targets=targets, schedule="one_shot", start_step=0),
                  lc.QuantizationAwareTraining("int4", group_size=32, targets=targets),
                  lc.KnowledgeDistillation(teacher="self")],
    }[config]
    baseline = peak_rss_reset()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, loader)
    peak = peak_rss()
    print("RESULT " + json.dumps({"config": config, "model_mb": model_bytes / 2**20,
                                  "above_model": (peak - baseline) / model_bytes}))


def measure(source: Path, config: str, steps: int, mmap_threshold: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": "2"}
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", config, "--steps", str(steps)],
                            capture_output=True, text=True, env=env, cwd=source, timeout=1200)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{config} from {source} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--previous", default="4f49dc0")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, from " + ", ".join(CONFIGS))
    parser.add_argument("--mmap-threshold", type=int, help="MALLOC_MMAP_THRESHOLD_ of every child, in bytes")
    args = parser.parse_args(argv)
    configs = ["plain", *(c for c in args.configs.split(",") if c != "plain")]  # plain: the reference
    if not set(configs) <= set(CONFIGS):
        parser.error(f"--configs: unknown {sorted(set(configs) - set(CONFIGS))}; choose from {', '.join(CONFIGS)}")
    if args.child:
        child(args.child, args.steps)
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import headline

    with tempfile.TemporaryDirectory() as scratch:
        previous = Path(scratch) / "previous"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(previous), args.previous],
                       check=True, capture_output=True)
        try:
            rows = {config: (measure(ROOT, config, args.steps, args.mmap_threshold),
                             measure(previous, config, args.steps, args.mmap_threshold))
                    for config in configs}
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(previous)], capture_output=True)
    model_mb = rows["plain"][0]["model_mb"]
    now_plain, then_plain = rows["plain"][0]["above_model"], rows["plain"][1]["above_model"]
    allocator = ("glibc defaults" if args.mmap_threshold is None
                 else f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}")
    print(f"## Training memory: 134M LLaMA, {args.steps} steps of 8 x 64 tokens, SGD, {allocator}\n")
    print(f"Peak resident memory above the built model ({model_mb:.0f} MB float32), in units of the float model;"
          f" each configuration in a fresh process; previous = `{args.previous}` in the same run.\n")
    print("| callbacks | now | now, over plain | previous | previous, over plain | target over plain |")
    print("|---|---|---|---|---|---|")
    for config, (now, then) in rows.items():
        over_now, over_then = now["above_model"] - now_plain, then["above_model"] - then_plain
        target = f"<= +{TARGETS[config]:.1f}x" if config in TARGETS else ""
        print(f"| {config} | +{now['above_model']:.2f}x | {over_now:+.2f}x | +{then['above_model']:.2f}x |"
              f" {over_then:+.2f}x | {target} |")
        if config != "plain":
            fixed = "" if args.mmap_threshold is None else f", malloc mmap threshold fixed at {args.mmap_threshold} B"
            headline("memory", f"{config}: peak memory over plain training (134M LLaMA{fixed})",
                     f"{over_now:+.2f}x (was {over_then:+.2f}x)", f"<= +{TARGETS[config]:.1f}x" if config in TARGETS else None)


if __name__ == "__main__":
    main()
