"""Run by tests/test_resume_kill.py: the full compression stack in real processes.

    python stacked_run.py RUN [RUN ...]

Each RUN is ``DIR`` (train to the end in DIR), ``DIR,pause=STEP`` (the same, but stop dead
one optimizer step after checkpoint STEP is on disk, for the test to kill) or
``DIR,resume`` (resume from DIR/ckpt/last.ckpt). One RUN runs in this process. Several run
at once, each in a child forked after the imports (which take most of a run's time), with
its output in ``DIR.log`` (``DIR.resume.log``); this process prints ``STARTED DIR PID``
for each child, then ``EXITED DIR STATUS`` as each ends (``-9``: killed by SIGKILL).

Distillation from a wider teacher (with a learned feature projection), gradual pruning
(steps 4 to 10), int4/int8 QAT with learned ranges and static int8 activations (from step
12, observers calibrating until step 16), CompressedExport, and ModelCheckpoint every 2
optimizer steps with ``save_last``: 5 epochs of 4 batches, so checkpoints fall both inside
epochs and on their last batch.

Mid-epoch checkpoints resume exactly because the training batches come from
:class:`ResumableBatches`, a loader Lightning checkpoints (it has ``state_dict`` /
``load_state_dict``) and whose shuffle depends on the epoch only, not on the global RNG
(which Lightning does not checkpoint). Everything is written under DIR, with relative
paths, so two runs in different directories can be compared file for file:
``ckpt/`` (the checkpoints), ``export/`` (the packed model), ``final.ckpt`` (the whole
trainer state at the end of fit, saved before the export) and ``metrics.pt``.
"""

import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from lightning_compress import (  # noqa: E402
    CompressedExport,
    KnowledgeDistillation,
    MagnitudePruning,
    QuantizationAwareTraining,
)
from tests.conftest import TinyRegressor, make_trainer  # noqa: E402
from tests.scripts.ddp_distill import WideTeacher  # noqa: E402

EPOCHS, BATCHES, BATCH_SIZE = 5, 4, 8
CHECKPOINT_EVERY = 2


class Student(TinyRegressor):
    """TinyRegressor with an LR scheduler, whose state must resume too."""

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)]


class ResumableBatches:
    """Shuffled batches of a tensor dataset that resume mid-epoch.

    Epoch ``e`` is shuffled by a permutation seeded with ``seed + e``, not by the global
    RNG (which Lightning does not checkpoint); Lightning passes the epoch to ``set_epoch``
    through ``.sampler``, as for a ``DistributedSampler``. ``state_dict`` is the number of
    batches handed out in this epoch (Lightning does not prefetch from a loader with a
    length), and after ``load_state_dict`` the next iteration starts after them.
    """

    def __init__(self, x, y, batch_size, seed=0):
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.sampler = self
        self.epoch, self.handed_out, self.resume_at = 0, 0, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.x) // self.batch_size

    def __iter__(self):
        start, self.resume_at = self.resume_at, 0
        self.handed_out = start
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for index in range(start, len(self)):
            rows = order[index * self.batch_size : (index + 1) * self.batch_size]
            self.handed_out = index + 1
            yield self.x[rows], self.y[rows]

    def state_dict(self):
        return {"batches": self.handed_out % len(self)}

    def load_state_dict(self, state):
        self.resume_at = state["batches"]


class PauseAfter(Callback):
    """One optimizer step after checkpoint ``step`` is on disk, say so and stop dead: the
    test kills the process here, with its in-memory state already past the checkpoint."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1:
            print(f"PAUSED after checkpoint {self.step}", flush=True)
            time.sleep(600)
            raise SystemExit("paused for 10 minutes and nobody killed this run")


class Report(Callback):
    """Says where training (re)starts; saves the whole trainer state and the last logged
    metrics at the end of fit, before the export runs."""

    def on_train_start(self, trainer, pl_module):
        print(f"TRAINING from step {trainer.global_step}", flush=True)

    def on_fit_end(self, trainer, pl_module):
        trainer.save_checkpoint("final.ckpt")
        torch.save({k: v.clone() for k, v in trainer.callback_metrics.items()}, "metrics.pt")


def data():
    generator = torch.Generator().manual_seed(0)
    n = BATCHES * BATCH_SIZE
    x, y = torch.randn(n, 4, 8, generator=generator), torch.randn(n, 8, generator=generator)
    val = torch.utils.data.TensorDataset(torch.randn(16, 4, 8, generator=generator), torch.randn(16, 8, generator=generator))
    return ResumableBatches(x, y, BATCH_SIZE), torch.utils.data.DataLoader(val, batch_size=8)


def main(run_dir, pause_after=None, resume=False):
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chdir(run_dir)
    pl.seed_everything(0, verbose=False)
    student = Student()
    torch.manual_seed(1)
    teacher = WideTeacher()
    callbacks = [
        KnowledgeDistillation(teacher, features=[("fc1", "fc1")], projection_lr=1e-2),
        MagnitudePruning(0.6, start_step=4, end_step=10, update_every=2),
        QuantizationAwareTraining(
            "int4", group_size=4, learn_ranges=True, activations="int8_static", start_step=12,
            calibration_steps=4, overrides={"fc2": {"bits": 8}},
        ),
        ModelCheckpoint(dirpath="ckpt", every_n_train_steps=CHECKPOINT_EVERY, save_top_k=-1, save_last=True),
        Report(),
        CompressedExport("export", min_sqnr_db=20.0),
    ]
    if pause_after is not None:
        callbacks.append(PauseAfter(pause_after))
    trainer = make_trainer(max_epochs=EPOCHS, enable_checkpointing=True, callbacks=callbacks)
    train, val = data()
    trainer.fit(student, train, val, ckpt_path="ckpt/last.ckpt" if resume else None)


def parse_run(spec):
    directory, _, option = spec.partition(",")
    if option.startswith("pause="):
        return Path(directory).resolve(), int(option[len("pause="):]), False
    if option not in ("", "resume"):
        raise SystemExit(f"unknown option {option!r} in {spec!r}; use DIR, DIR,pause=STEP or DIR,resume")
    return Path(directory).resolve(), None, option == "resume"


def fork_each(runs):
    children = {}
    for run_dir, pause_after, resume in runs:
        log = Path(f"{run_dir}{'.resume' if resume else ''}.log")
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(descriptor, 1)
                os.dup2(descriptor, 2)
                main(run_dir, pause_after, resume)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = run_dir
        print(f"STARTED {run_dir} {pid}", flush=True)
    while children:
        pid, status = os.wait()
        print(f"EXITED {children.pop(pid)} {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    runs = [parse_run(spec) for spec in sys.argv[1:]]
    if len(runs) == 1:
        main(*runs[0])
    else:
        fork_each(runs)
