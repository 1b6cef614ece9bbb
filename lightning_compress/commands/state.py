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
    """Records that training is about to start (``on_train_start``): from there on the
    data and the model run, and their errors are failures, with their tracebacks."""

    def on_train_start(self, trainer, pl_module) -> None:
        global _started
        _started = True
