"""Training parameters that live outside the user's model.

Some compression state learns: QAT's learned ranges, distillation's feature projections.
Registering it on the user's LightningModule would change their ``state_dict`` keys (and
strict ``load_from_checkpoint``); adding it to their optimizer would break their LR
schedulers, which know only the parameter groups they were built with. So it trains
with its own Adam, stepped right after the user's optimizer step (right under gradient
accumulation and manual optimization), and checkpointed by the callback that owns it.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch
from torch import nn

from lightning_compress.core.distributed import all_reduce_mean_


class SideOptimizer:
    """An Adam over a callback's own parameters, stepped after the user's optimizer.

    Call :meth:`follow` in ``on_fit_start`` (the user's optimizer exists then) and
    :meth:`track` once the parameters exist; :meth:`state_dict` / :meth:`load_state_dict`
    work in either order with them, as Lightning restores callback state before or after
    ``on_fit_start`` depending on the strategy.
    """

    def __init__(self, lr: float) -> None:
        self.lr = lr
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending_state: Dict[str, Any] | None = None
        self._hook: Any = None

    def follow(self, trainer: Any, feature: str) -> None:
        """Step after every step of ``trainer.optimizers[0]`` until :meth:`stop`.

        Raises:
            ValueError: under fp16 loss scaling (``precision="16-mixed"``), whose scaled
                gradients and skipped steps this optimizer does not see; ``feature`` names
                the argument that needs it.
        """
        if str(trainer.precision).startswith("16"):
            raise ValueError(
                f"{feature} trains parameters outside your optimizer, which fp16 loss scaling"
                f" (precision={trainer.precision!r}) does not cover; use precision='bf16-mixed'"
                " or '32-true', or turn that option off"
            )
        self.stop()
        self._hook = trainer.optimizers[0].register_step_post_hook(self._step)

    def stop(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def track(self, parameters: List[nn.Parameter]) -> None:
        """Create the Adam over ``parameters`` (once) and apply any restored state."""
        if self._optimizer is None and parameters:
            self._optimizer = torch.optim.Adam(parameters, lr=self.lr)
        if self._optimizer is not None and self._pending_state is not None:
            # Optimizer.load_state_dict moves the state to the parameters' device.
            self._optimizer.load_state_dict(self._pending_state)
            self._pending_state = None

    def state_dict(self) -> Dict[str, Any] | None:
        if self._optimizer is None:
            return self._pending_state
        return self._optimizer.state_dict()

    def load_state_dict(self, state: Dict[str, Any] | None) -> None:
        self._pending_state = state
        if self._optimizer is not None:
            self.track([])

    def _step(self, *_: Any) -> None:
        if self._optimizer is None:
            return
        parameters = [p for g in self._optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not parameters:
            return
        # These parameters are outside the DDP-wrapped module, so DDP does not average
        # their gradients: do it here so every rank takes the same step.
        all_reduce_mean_([p.grad for p in parameters])
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
