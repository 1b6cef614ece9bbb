"""Resume anywhere: a stacked run killed with SIGKILL ends, after resuming, bit for bit
where the uninterrupted run ends.

tests/scripts/stacked_run.py trains with distillation (a learned feature projection),
gradual pruning (steps 4-10), QAT (learned ranges, static int8 activations, from step 12)
and CompressedExport, checkpointing every 2 optimizer steps. Each killed run stops dead one
step after its target checkpoint is on disk (so the process has moved past it), gets
SIGKILL from here, and is resumed from ``last.ckpt`` in a new process. Runs that can go
at the same time do, to keep the wall time down.

Data: the training batches come from a loader Lightning checkpoints (``ResumableBatches``)
and whose shuffle depends on the epoch only, so mid-epoch checkpoints (steps 6 and 14)
resume exactly, like the epoch-end one (step 4).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from lightning_compress import MagnitudePruning, QuantizationAwareTraining
from tests.conftest import TinyRegressor, make_trainer
from tests.scripts.stacked_run import ResumableBatches

SCRIPT = Path(__file__).parent / "scripts" / "stacked_run.py"
ROOT = SCRIPT.parents[2]
# checkpoint step -> what the run is doing there
KILL_POINTS = {"before_pruning": 4, "during_schedule": 6, "after_qat_start": 14}
TIMEOUT = 240
# Four runs share the CPU: one thread each (several threads per tiny op on busy cores
# cost 10x the time). Every run uses the same setting, as bit-exactness needs.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


class Launcher:
    """The script started on several runs at once; it forks one child per run after its
    imports and reports the children's pids and exit statuses on its output."""

    def __init__(self, base: Path, name: str, runs: list) -> None:
        self.base, self.log = base, base / f"{name}.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([sys.executable, str(SCRIPT), *runs], stdout=log,
                                            stderr=subprocess.STDOUT, cwd=ROOT, env=ENV)

    def _wait_for(self, path: Path, line: str, child: str | None = None) -> str:
        """Waits until ``line`` is in ``path``; fails early if the launcher (or ``child``,
        whose output ``path`` is) has ended without writing it."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            text = path.read_text() if path.exists() else ""
            if line in text:
                return text
            ended = self.process.poll() is not None and path == self.log
            ended = ended or (child is not None and f"EXITED {self.base / child} " in self.log.read_text())
            assert not ended, f"no {line!r} in {path}:\n{text[-4000:]}"
            assert time.monotonic() < deadline, f"no {line!r} in {path} within {TIMEOUT} s:\n{text[-4000:]}"
            time.sleep(0.1)

    def pid(self, name: str) -> int:
        text = self._wait_for(self.log, f"STARTED {self.base / name} ")
        return int(text.split(f"STARTED {self.base / name} ")[1].split()[0])

    def wait_for_line(self, name: str, line: str) -> None:
        self._wait_for(self.base / f"{name}.log", line, child=name)

    def exit_status(self, name: str) -> int:
        text = self._wait_for(self.log, f"EXITED {self.base / name} ")
        return int(text.split(f"EXITED {self.base / name} ")[1].split()[0])

    def stop(self) -> None:
        """Kills this launcher and whichever of its children are still running."""
        text = self.log.read_text()
        exited = {line.split()[1] for line in text.splitlines() if line.startswith("EXITED ")}
        for line in text.splitlines():
            if line.startswith("STARTED ") and line.split()[1] not in exited:
                try:
                    os.kill(int(line.split()[2]), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted reference and the three killed-and-resumed runs:
    ``{name: (run_dir, the checkpoint on disk at the kill, the resumed run's output)}``."""
    base = tmp_path_factory.mktemp("resume_kill")
    first = Launcher(base, "first", [str(base / "reference")]
                     + [f"{base / name},pause={step}" for name, step in KILL_POINTS.items()])
    launchers = [first]
    try:
        killed = {}
        for name, step in KILL_POINTS.items():
            first.wait_for_line(name, f"PAUSED after checkpoint {step}")
            os.kill(first.pid(name), signal.SIGKILL)
            assert first.exit_status(name) == -signal.SIGKILL
            assert not (base / name / "export").exists() and not (base / name / "final.ckpt").exists()
            killed[name] = torch.load(base / name / "ckpt" / "last.ckpt", weights_only=True)
        second = Launcher(base, "second", [f"{base / name},resume" for name in KILL_POINTS])
        launchers.append(second)
        result = {}
        for name in ["reference", *KILL_POINTS]:
            launcher = first if name == "reference" else second
            output_file = base / (f"{name}.log" if name == "reference" else f"{name}.resume.log")
            assert launcher.exit_status(name) == 0, output_file.read_text()[-4000:]
            result[name] = (base / name, killed.get(name), output_file.read_text())
        return result
    finally:
        for launcher in launchers:
            launcher.stop()


def _compare(reference, resumed, path=""):
    """Every tensor bit for bit, every other value equal; returns the differing paths."""
    if isinstance(reference, torch.Tensor):
        same = (isinstance(resumed, torch.Tensor) and reference.dtype == resumed.dtype
                and reference.shape == resumed.shape and torch.equal(reference, resumed))
        return [] if same else [path]
    if isinstance(reference, dict):
        if not isinstance(resumed, dict) or set(reference) != set(resumed):
            return [f"{path} (keys)"]
        return [d for key in reference for d in _compare(reference[key], resumed[key], f"{path}/{key}")]
    if isinstance(reference, (list, tuple)):
        if not isinstance(resumed, (list, tuple)) or len(reference) != len(resumed):
            return [f"{path} (length)"]
        return [d for i, (a, b) in enumerate(zip(reference, resumed)) for d in _compare(a, b, f"{path}/{i}")]
    return [] if reference == resumed else [f"{path}: {reference!r} != {resumed!r}"]


def _state_at(checkpoint):
    """The pruning and QAT states in a checkpoint."""
    states = {key.split("{")[0]: value for key, value in checkpoint["callbacks"].items()}
    return states["MagnitudePruning"], states["QuantizationAwareTraining"]


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_stacked_run_resumes_bit_for_bit(runs, point):
    reference_dir = runs["reference"][0]
    run_dir, killed_at, output = runs[point]
    step = KILL_POINTS[point]

    # The kill point is what its name says, and the resumed run started from it.
    assert killed_at["global_step"] == step
    assert f"TRAINING from step {step}" in output
    pruning, qat = _state_at(killed_at)
    if point == "before_pruning":
        assert pruning["masks"] == {} and not any(layer["enabled"] for layer in qat["layers"].values())
    elif point == "during_schedule":
        assert pruning["masks"] and 0 < pruning["actual_sparsity"] < 0.6
        assert not any(layer["enabled"] for layer in qat["layers"].values())
    else:
        assert pruning["actual_sparsity"] == pytest.approx(0.6, abs=0.01)
        assert all(layer["enabled"] for layer in qat["layers"].values())
        assert all(layer["observer"]["calibrating"] for layer in qat["layers"].values())  # step 14 < 16

    reference = torch.load(reference_dir / "final.ckpt", weights_only=True)
    resumed = torch.load(run_dir / "final.ckpt", weights_only=True)
    for key in ("global_step", "epoch", "state_dict", "optimizer_states", "lr_schedulers"):
        assert not _compare(reference[key], resumed[key], key), key
    # Masks, quantizer ranges and observers, the range and projection Adam states, the
    # distillation step count: every compression callback's state. ModelCheckpoint's
    # holds this run's own paths.
    callbacks = [k for k in reference["callbacks"] if not k.startswith("ModelCheckpoint")]
    assert len(callbacks) == 3
    for key in callbacks:
        assert not _compare(reference["callbacks"][key], resumed["callbacks"][key], key)
    assert reference["loops"]["fit_loop"]["state_dict"] == resumed["loops"]["fit_loop"]["state_dict"]
    assert not _compare(torch.load(reference_dir / "metrics.pt", weights_only=True),
                        torch.load(run_dir / "metrics.pt", weights_only=True))

    # The export: the same files, byte for byte (no field of compression.json differs).
    files = sorted(p.name for p in (reference_dir / "export").iterdir())
    assert files == sorted(p.name for p in (run_dir / "export").iterdir())
    assert {"model.safetensors", "compression.json"} <= set(files)
    for name in files:
        assert (reference_dir / "export" / name).read_bytes() == (run_dir / "export" / name).read_bytes(), name


class _StopAfter(Callback):
    def __init__(self, step, path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


class _RecordBatches(Callback):
    def __init__(self):
        self.first_values = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.first_values.append(batch[0][0, 0, 0].item())


def test_resumable_loader_keeps_its_position_with_fraction_schedules(tmp_path):
    """Regression: pruning and QAT read `trainer.estimated_stepping_batches` in on_fit_start,
    which built the train dataloader before Lightning restored the loops, so Lightning
    dropped a resumable loader's saved position and a mid-epoch resume replayed data."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, 8, generator=generator), torch.randn(32, 8, generator=generator)

    def run(*extra, ckpt_path=None):
        record = _RecordBatches()
        callbacks = [MagnitudePruning(0.5, start_step=0.25, end_step=0.75),
                     QuantizationAwareTraining("int8", start_step=0.5), record, *extra]
        torch.manual_seed(0)
        make_trainer(max_epochs=2, callbacks=callbacks).fit(TinyRegressor(), ResumableBatches(x, y, 8),
                                                            ckpt_path=ckpt_path)
        return record.first_values

    uninterrupted = run()
    checkpoint = tmp_path / "mid_epoch.ckpt"
    before = run(_StopAfter(6, checkpoint))  # epoch 1, batch 2 of 4
    after = run(ckpt_path=checkpoint)
    assert len(uninterrupted) == 8 and len(before) == 6
    assert before + after == uninterrupted
