"""Whether the current command has started training: errors before that are bad input."""

from __future__ import annotations

from lightning.pytorch import Callback

_started = False


def training_started() -> bool:
    return _started


def reset() -> None:
    """A new command: nothing has trained yet."""
    global _started
    _started = False


class MarkTrainingStarted(Callback):
    """Records that the first training step is about to run: after every other callback's
    ``on_train_batch_start`` of the first batch (it is the Trainer's last callback), where
    the export's dry run checks the settings on the model before anything trains."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        global _started
        _started = True
