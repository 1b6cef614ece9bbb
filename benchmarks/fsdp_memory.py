"""Sharded training: peak resident memory per rank and step time of pruning + QAT +
distillation on a 134M-parameter LLaMA under FSDP2 (Lightning's ModelParallelStrategy,
``fully_shard`` on every decoder layer and the root) against DDP, 2 CPU processes (gloo),
and the step time against FSDP2 without compression, all in one run.

    python benchmarks/fsdp_memory.py [--steps 4]

Each configuration runs as its own pair of processes; a rank's peak is its resident
memory high-water mark above what it held once the model was built, in units of the
float32 model's size. The teacher (``teacher="self"``) is a frozen copy on every rank,
never sharded with the student: +1.0x per rank by construction.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("fsdp2", "fsdp2+stack", "ddp+stack")


def child(config: str, steps: int, out_dir: Path) -> None:
    import logging
    import warnings

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import lightning_compress as lc
    from llama_lm import CausalLM, peak_rss, peak_rss_reset, token_loader

    torch.set_num_threads(1)  # two ranks on two cores

    class Measure(pl.Callback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_train_batch_start(self, *args):
            self.start = time.perf_counter()

        def on_train_batch_end(self, *args):
            self.times.append(time.perf_counter() - self.start)

    module = CausalLM(shard=config.startswith("fsdp2"))
    model_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    loader = token_loader(2 * steps, 4)  # 4 per rank
    targets = ["model.model.layers.*"]
    compression = [] if config == "fsdp2" else [
        lc.MagnitudePruning(0.5, targets=targets, schedule="one_shot", start_step=0),
        lc.QuantizationAwareTraining("int4", group_size=32, targets=targets),
        lc.KnowledgeDistillation(teacher="self"),
    ]
    strategy = "ddp" if config.startswith("ddp") else ModelParallelStrategy(data_parallel_size=2,
                                                                            tensor_parallel_size=1)
    baseline = peak_rss_reset()
    measure = Measure()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[*compression, measure])
    trainer.fit(module, loader)
    (out_dir / f"{config}-rank{trainer.global_rank}.json").write_text(json.dumps({
        "above_model": (peak_rss() - baseline) / model_bytes, "step_s": statistics.median(measure.times[1:]),
        "model_mb": model_bytes / 2**20}))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    parser = argparse.ArgumentParser()
    parser.add_argument("--child")
    parser.add_argument("--out")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, Path(args.out))
        return
    from common import headline

    results = {}
    with tempfile.TemporaryDirectory() as out:
        for config in CONFIGS:
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            done = subprocess.run([sys.executable, __file__, "--child", config, "--out", out, "--steps",
                                   str(args.steps)], capture_output=True, text=True, env=env, timeout=1800)
            if done.returncode != 0:
                raise RuntimeError(f"{config} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            ranks = [json.loads((Path(out) / f"{config}-rank{r}.json").read_text()) for r in range(2)]
            results[config] = {"above_model": max(r["above_model"] for r in ranks),
                               "step_s": max(r["step_s"] for r in ranks), "model_mb": ranks[0]["model_mb"]}
    base = results["fsdp2"]
    print(f"## Sharded training: 134M LLaMA, FSDP2 vs DDP, 2 CPU processes, {args.steps} steps of 4 x 64 tokens"
          " per rank, SGD\n")
    print(f"Peak resident memory per rank above the built model ({base['model_mb']:.0f} MB float32), the larger"
          " of the two ranks; step time: median after the first step, the slower rank. Stack: pruning 50%"
          " + QAT int4 g32 + distillation from the model itself (a frozen float copy per rank).\n")
    print("| training | peak per rank above the model | step time vs FSDP2 alone |")
    print("|---|---|---|")
    for config, row in results.items():
        print(f"| {config} | +{row['above_model']:.2f}x | {row['step_s'] / base['step_s']:.2f}x |")
    stack, ddp = results["fsdp2+stack"], results["ddp+stack"]
    headline("memory", "FSDP2 stack (pruning+QAT+KD) peak per rank above the model, 2 processes, 134M LLaMA",
             f"+{stack['above_model']:.2f}x (DDP: +{ddp['above_model']:.2f}x)")
    headline("training overhead", "FSDP2 stack (pruning+QAT+KD) step time vs FSDP2 alone, 134M LLaMA",
             f"{stack['step_s'] / base['step_s']:.2f}x")


if __name__ == "__main__":
    main()
