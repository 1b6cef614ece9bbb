"""Run by tests/test_ddp_stack.py under strategy="ddp" with 2 CPU processes (gloo).

    python ddp_stack.py OUT_DIR

The whole stack: distillation from a wider teacher (a learned feature projection),
gradual pruning (steps 2 to 8), int4/int8 QAT with learned ranges and static int8
activations (from step 8), and CompressedExport into OUT_DIR/packed. 4 epochs of 4 steps
of 8 samples per rank (:class:`Data`), so the same global batches as one process with
batch 16 (the test runs that one in-process with :func:`fit`). Lightning's launcher re-runs this script for rank 1; each
rank checks that the teacher is not DDP-wrapped and saves what it holds to
OUT_DIR/rank<r>.pt.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

from lightning_compress import (  # noqa: E402
    CompressedExport,
    KnowledgeDistillation,
    MagnitudePruning,
    QuantizationAwareTraining,
)
from tests.conftest import TinyRegressor, make_trainer  # noqa: E402
from tests.ddp_process import arm_hang_report, close_process_group  # noqa: E402
from tests.scripts.ddp_distill import WideTeacher, check_teacher_outside_ddp  # noqa: E402

GLOBAL_BATCH, EPOCHS, QAT_START = 16, 4, 8
# Logged losses are averaged over the ranks (equal shards: the global batch's loss);
# these do not depend on the rank, so they must match a single process.
RANK_FREE_METRICS = ("train/loss", "val/loss", "pruning/sparsity_actual", "qat/weight_bits")


class Student(TinyRegressor):
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("train/loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", torch.nn.functional.mse_loss(self(x), y), sync_dist=True)


class Record(Callback):
    """Checks the teacher stays outside DDP; keeps what the test compares: the state just
    before fake quantization starts (step ``QAT_START``, rounding makes later float-level
    differences discontinuous) and at the end of fit (after the export, which is listed
    before this callback)."""

    def __init__(self, kd, pruning, qat, export):
        self.kd, self.pruning, self.qat, self.export = kd, pruning, qat, export
        self.teacher_checked = False
        self.before_qat = self.state = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.teacher_checked:
            check_teacher_outside_ddp(trainer, self.kd)
            self.teacher_checked = True
        if trainer.global_step == QAT_START and self.before_qat is None:
            self.before_qat = {
                "weights": {k: v.clone() for k, v in pl_module.state_dict().items()},
                "pruning": self.pruning.state_dict(),
                "distillation": self.kd.state_dict(),
                "train/loss": trainer.callback_metrics["train/loss"].clone(),
            }

    def on_fit_end(self, trainer, pl_module):
        self.state = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "teacher_checked": self.teacher_checked,
            "wrote_export": self.export.report is not None,
            "before_qat": self.before_qat,
            "weights": {k: v.clone() for k, v in pl_module.state_dict().items()},
            "pruning": self.pruning.state_dict(),
            "qat": self.qat.state_dict(),
            "distillation": self.kd.state_dict(),
            "metrics": {k: trainer.callback_metrics[k].clone() for k in RANK_FREE_METRICS},
        }


class Data(pl.LightningDataModule):
    """Each rank takes every other sample in order (a DistributedSampler without shuffling;
    Lightning's own would shuffle): with 8 per rank, each step's global batch is the 16
    consecutive samples one process with batch 16 takes."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)

        def samples(n):
            return torch.utils.data.TensorDataset(torch.randn(n, 4, 8, generator=generator),
                                                  torch.randn(n, 8, generator=generator))

        self.train, self.val = samples(64), samples(32)

    def _loader(self, dataset):
        world_size, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        return torch.utils.data.DataLoader(dataset, batch_size=GLOBAL_BATCH // world_size, sampler=sampler)

    def train_dataloader(self):
        return self._loader(self.train)

    def val_dataloader(self):
        return self._loader(self.val)


def fit(export_dir, devices):
    """Trains the stack with ``devices`` processes (global batch 16); returns this
    process's :class:`Record` state."""
    pl.seed_everything(0, verbose=False)
    student = Student()
    torch.manual_seed(1)
    kd = KnowledgeDistillation(WideTeacher(), features=[("fc1", "fc1")], projection_lr=1e-2)
    pruning = MagnitudePruning(0.6, start_step=2, end_step=QAT_START, update_every=2)
    # Asymmetric: the symmetric grid (torchao's scale = max|w| / 7.5) puts every group's
    # largest weight exactly on a rounding tie, so the last-bit differences between a sum
    # over two ranks and over one batch flip whole codes and the runs drift apart.
    qat = QuantizationAwareTraining("int4", group_size=4, symmetric=False, learn_ranges=True,
                                    activations="int8_static", start_step=QAT_START, calibration_steps=4,
                                    overrides={"fc2": {"bits": 8}})
    export = CompressedExport(export_dir, min_sqnr_db=20.0)
    record = Record(kd, pruning, qat, export)
    options = {"devices": 2, "strategy": "ddp"} if devices == 2 else {}
    trainer = make_trainer(max_epochs=EPOCHS, callbacks=[kd, pruning, qat, export, record],
                           use_distributed_sampler=False, **options)
    trainer.fit(student, datamodule=Data())
    return record.state


if __name__ == "__main__":
    arm_hang_report()
    out_dir = Path(sys.argv[1])
    state = fit(out_dir / "packed", devices=2)
    torch.save(state, out_dir / f"rank{state['rank']}.pt")
    close_process_group()
