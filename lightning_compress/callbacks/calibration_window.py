"""When QAT's calibrated start records and when it applies (``init``/``smoothing``).

Lightning glue around :class:`~lightning_compress.quant.calibrated_start.CalibratedStart`:
which optimizer steps' batches are recorded, the step fake quantization starts at, the
one-shot hook that applies the start, and the checkpoint state that makes a run resumed
inside the window continue bit for bit.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_compress.core.recompute import counts_as_training_forward
from lightning_compress.core.sharding import is_sharded_model
from lightning_compress.quant.calibrated_start import CalibratedStart, describe_setting


class CalibrationWindow:
    """Records the batches of the ``calibration_batches`` before the start step and applies
    the calibrated start at the first module forward of the start step.

    Args:
        calibration: what records and applies.
        batches: ``calibration_batches``.
        set_enabled: switches the QAT callback's quantizers on or off.
    """

    def __init__(self, calibration: CalibratedStart, batches: int, set_enabled: Callable[[bool], None]) -> None:
        self.calibration = calibration
        self.batches = batches
        self.setting = describe_setting(calibration.init, calibration.smoothing)
        self._set_enabled = set_enabled
        self.applied = False
        self._first_recorded = 0
        self._start: int | None = None  # decided at the first train start, then checkpointed
        self._recorded_steps = 0
        self._last_recorded = -1
        self._pending = None
        self._postponed = False  # warned that the start moved for want of batches

    def start_step(self, trainer: Trainer, pl_module: LightningModule, requested: int) -> int:
        """The first fake-quantized step: ``requested``, or later when the batches before
        it are not all in this run (``start_step`` 0, or a float checkpoint fine-tuned
        from its last step): then the next batches are recorded in float first.

        Raises:
            ValueError: under FSDP2, which holds no whole weight to rewrite.
        """
        if self._start is not None and (self.applied or self._recorded_steps):
            return self._start  # decided by the run this one resumes
        if self.applied:  # by the run whose quantizers a new callback took over: nothing to record
            return requested
        if is_sharded_model(pl_module):
            raise ValueError(
                f"{self.setting} is not supported under FSDP2 (`fully_shard`) yet: it rewrites whole weights at"
                " `start_step`; train with DDP, or without it"
            )
        steps = math.ceil(self.batches / trainer.accumulate_grad_batches)
        start = max(requested, trainer.global_step + steps)
        total = trainer.estimated_stepping_batches
        if start >= total:
            rank_zero_warn(
                f"QuantizationAwareTraining: {self.setting} would start fake quantization at step {start}, after its"
                f" {steps} calibration step(s), but this run ends at step {int(total)}: no step trains quantized. Lower"
                " `calibration_batches` or `start_step`, or train for more steps"
            )
        elif start > requested:
            rank_zero_warn(
                f"QuantizationAwareTraining: fake quantization starts at step {start}, not {requested}: {self.setting}"
                f" records the layers' inputs over {steps} optimizer step(s) of this run first"
            )
        self._first_recorded, self._start = start - steps, start
        return start

    def on_batch_start(self, step: int, start: int) -> int:
        """Record this step's batches inside the window; arm the start at its step.

        Returns the first fake-quantized step (``start`` where this window decides none):
        later than decided while fewer than ``calibration_batches`` batches are recorded.
        The window counts optimizer steps, and manual optimization that steps several
        optimizers a batch advances ``global_step`` once for each (as an epoch's last
        step holds fewer accumulated batches): its steps hold fewer batches.
        """
        if self.applied or self._start is None:
            return start if self._start is None else self._start
        if step >= self._start and self.calibration.statistics.batches < self.batches:
            self._postpone(step)
        if step >= self._start:
            self._arm()
        elif step >= self._first_recorded:
            self.calibration.start_recording()
            self.calibration.statistics.batches += 1
            if step != self._last_recorded:
                self._recorded_steps, self._last_recorded = self._recorded_steps + 1, step
        return self._start

    def _postpone(self, step: int) -> None:
        if not self._postponed:
            self._postponed = True
            rank_zero_warn(
                f"QuantizationAwareTraining: {self.setting} recorded {self.calibration.statistics.batches} of its"
                f" {self.batches} calibration batch(es) by step {self._start}: the window's optimizer steps held"
                " fewer batches (manual optimization counts a step for each optimizer it steps; with gradient"
                " accumulation, an epoch's last step may hold fewer batches). It records on, and fake quantization"
                " starts at the step after the last of them"
            )
        self._start = step + 1

    def on_batch_end(self) -> None:
        """Stop recording until the next training batch: validation between two batches of
        the window (and anything else outside a training batch) is not recorded."""
        self.calibration.stop_recording()

    def stop(self) -> None:
        self.calibration.stop_recording()
        self._disarm()

    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"calibrated": self.applied, "start": self._start}
        if not self.applied:
            state["calibration"] = self.calibration.statistics.state_dict()
            state["recorded_steps"] = self._recorded_steps
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.applied = bool(state["calibrated"])
        self._start = state["start"]
        if "calibration" in state:
            self.calibration.statistics.load_state_dict(state["calibration"])
            self._recorded_steps = int(state["recorded_steps"])

    def _arm(self) -> None:
        # At the first module forward of the step: after every callback's batch-start hook
        # (a mask pruning updates at this step is in place, whatever the callback order),
        # before anything computes with the weights.
        if self._pending is not None:
            return

        def start(*_: Any) -> None:
            if not counts_as_training_forward():
                # The dry export of a run resumed at the start step checks the model as
                # it is before this step; the start waits for the training forward.
                return
            self._disarm()
            # In float while the start is computed: its checks run the smooth modules,
            # which a quantizer would round, an observer observe, or a range rule fit.
            self._set_enabled(False)
            self.calibration.apply()  # on failure it leaves the model as trained, in float
            self._set_enabled(True)
            self.applied = True

        self._pending = nn.modules.module.register_module_forward_pre_hook(start)

    def _disarm(self) -> None:
        if self._pending is not None:
            self._pending.remove()
            self._pending = None


__all__ = ["CalibrationWindow"]
