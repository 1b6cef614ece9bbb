"""Run by tests/test_distillation.py under strategy="ddp" with 2 CPU processes (gloo).

    python ddp_distill.py OUT_DIR [cache-errors]

KnowledgeDistillation with a separate teacher and a feature pair that needs a learned
projection. Lightning's launcher re-runs this script for rank 1. Each rank checks that the
teacher is not DDP-wrapped and not part of the wrapped model, and saves what it holds to
OUT_DIR/rank<r>.pt.

``cache-errors``: fits whose teacher-output cache fails on one rank only (:func:`cache_errors`);
each rank saves the error it stopped with to OUT_DIR/rank<r>-<scenario>.txt.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from lightning_compress.callbacks.distillation import KnowledgeDistillation  # noqa: E402
from tests.conftest import TinyRegressor, make_trainer, tiny_loader  # noqa: E402
from tests.ddp_process import arm_hang_report, close_process_group  # noqa: E402


class WideTeacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.fc1 = nn.Linear(64, 48)
        self.fc2 = nn.Linear(48, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def check_teacher_outside_ddp(trainer, kd):
    """The model is DDP-wrapped (when distributed), the teacher is not, and neither the
    wrapped model nor the optimizer holds a teacher parameter."""
    wrapped = trainer.strategy.model
    assert isinstance(wrapped, DistributedDataParallel) == (trainer.world_size > 1), type(wrapped)
    assert not isinstance(kd.teacher, DistributedDataParallel)
    assert all(m is not kd.teacher for m in wrapped.modules()), "the teacher is inside the DDP model"
    teacher_params = {id(p) for p in kd.teacher.parameters()}
    assert not teacher_params & {id(p) for p in wrapped.parameters()}
    for group in trainer.optimizers[0].param_groups:
        assert not teacher_params & {id(p) for p in group["params"]}


class CheckAndSave(Callback):
    def __init__(self, kd, out_dir):
        self.kd, self.out_dir = kd, Path(out_dir)
        self.checked = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.checked:
            check_teacher_outside_ddp(trainer, self.kd)
            self.checked = True

    def on_fit_end(self, trainer, pl_module):
        state = {
            "checked": self.checked,
            "world_size": trainer.world_size,
            "weights": {k: v.clone() for k, v in pl_module.state_dict().items()},
            "callback": self.kd.state_dict(),
            "teacher": {k: v.clone() for k, v in self.kd.teacher.state_dict().items()},
        }
        torch.save(state, self.out_dir / f"rank{trainer.global_rank}.pt")


def sample_ids(batch):
    """One integer per sample of tiny_loader's data, from its values (the batch holds no index)."""
    return (batch[0][:, 0, 0] * 2**20).round().long()


def float_ids_on_rank_one(batch):
    ids = sample_ids(batch)
    return ids.float() if torch.distributed.get_rank() == 1 else ids


def fit_until_error(out_dir: Path, scenario: str, teacher_seed: int, index_fn=sample_ids) -> None:
    """One fit with a disk cache in OUT_DIR/cache; the error each rank stopped with (if any)
    goes to OUT_DIR/rank<r>-<scenario>.txt."""
    torch.manual_seed(teacher_seed)
    kd = KnowledgeDistillation(WideTeacher(), cache="disk", cache_dir=out_dir / "cache", index_fn=index_fn)
    trainer = make_trainer(devices=2, strategy="ddp", max_epochs=1, callbacks=[kd])
    try:
        trainer.fit(TinyRegressor(), tiny_loader(batches=4))
    except Exception as error:  # noqa: BLE001 - the test reads which error each rank stopped with
        (out_dir / f"rank{torch.distributed.get_rank()}-{scenario}.txt").write_text(f"{type(error).__name__}: {error}")


def cache_errors(out_dir: Path) -> None:
    """Errors of the cache on one rank only; each must stop both ranks in the same step."""
    files = [out_dir / "cache" / f"teacher_outputs.rank{r}.safetensors" for r in range(2)]
    fit_until_error(out_dir, "written", teacher_seed=0)  # both ranks' caches, from teacher 0
    rank = torch.distributed.get_rank()
    # Only rank 0 reads its cache (rank 1's is deleted), and it is another teacher's.
    if rank == 1:
        files[1].unlink()
    fit_until_error(out_dir, "refused", teacher_seed=1)
    # Rank 1's index_fn gives float indices (refused by the cache on that rank only).
    fit_until_error(out_dir, "index-fn", teacher_seed=1, index_fn=float_ids_on_rank_one)
    # Rank 1's file is cut short (refused when it is loaded, in on_fit_start).
    if rank == 1:
        files[1].write_bytes(files[0].read_bytes()[:100])
    fit_until_error(out_dir, "truncated", teacher_seed=1)


if __name__ == "__main__":
    arm_hang_report()
    out_dir = sys.argv[1]
    if sys.argv[2:] == ["cache-errors"]:
        cache_errors(Path(out_dir))
        close_process_group()
        sys.exit(0)
    pl.seed_everything(0, verbose=False)
    teacher = WideTeacher()
    kd = KnowledgeDistillation(teacher, features=[("fc1", "fc1")], projection_lr=1e-2)
    trainer = make_trainer(devices=2, strategy="ddp", max_epochs=2, callbacks=[kd, CheckAndSave(kd, out_dir)])
    trainer.fit(TinyRegressor(), tiny_loader(batches=8))
    close_process_group()
