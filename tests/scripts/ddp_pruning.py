"""Run by tests/test_ddp.py: MagnitudePruning under strategy="ddp" with 2 CPU processes.

Lightning's launcher re-runs this script for rank 1. Each rank saves its masks and
weights to OUT_DIR/rank<r>.pt.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

from lightning_compress import MagnitudePruning  # noqa: E402
from tests.conftest import TinyRegressor, tiny_loader  # noqa: E402


class SaveRankState(Callback):
    def __init__(self, pruning, out_dir):
        self.pruning, self.out_dir = pruning, Path(out_dir)

    def on_fit_end(self, trainer, pl_module):
        state = {
            "masks": self.pruning.state_dict()["masks"],
            "weights": {k: v.clone() for k, v in pl_module.state_dict().items()},
            "sparsity": self.pruning.sparsity,
            "world_size": trainer.world_size,
        }
        torch.save(state, self.out_dir / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    out_dir = sys.argv[1]
    pattern = sys.argv[2] if len(sys.argv) > 2 else "unstructured"
    pl.seed_everything(0, verbose=False)
    pruning = MagnitudePruning(
        None if ":" in pattern else 0.7,
        pattern=pattern,
        start_step=2,
        end_step=8,
        update_every=2,
        scope="layer" if ":" in pattern else "global",
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[pruning, SaveRankState(pruning, out_dir)],
    )
    trainer.fit(TinyRegressor(), tiny_loader(batches=8))
