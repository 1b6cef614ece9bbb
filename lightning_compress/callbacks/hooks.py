"""Running callback code around the LightningModule's own ``configure_model``.

Lightning calls the callbacks' ``setup`` first, then the module's ``configure_model``
(where large models are built, and where ``ModelParallelStrategy`` users shard them),
then ``configure_optimizers``. The compression callbacks install in ``setup``; what they
must do after ``configure_model`` is queued here.
"""

from __future__ import annotations

from typing import Any, Callable

from lightning.pytorch import LightningModule

from lightning_compress.core.notes import first_four

_QUEUE = "_lc_after_configure_model"  # instance attribute: actions to run once, in order


def overrides_configure_model(pl_module: LightningModule) -> bool:
    """Whether the module's class has its own ``configure_model`` (not yet wrapped here)."""
    return type(pl_module).configure_model is not LightningModule.configure_model and (
        "configure_model" not in vars(pl_module) or _QUEUE in vars(pl_module)
    )


def after_configure_model(pl_module: LightningModule, action: Callable[[], Any]) -> None:
    """Run ``action()`` right after the module's own ``configure_model``, once; several
    callbacks may queue actions, which run in the order they were queued."""
    queue = pl_module.__dict__.get(_QUEUE)
    if queue is None:
        queue = pl_module.__dict__[_QUEUE] = []
        own = pl_module.configure_model

        def configure_model(*args: Any) -> None:
            own(*args)
            # Back to the class's hook before the actions run (one may raise).
            del pl_module.configure_model
            for queued in pl_module.__dict__.pop(_QUEUE, []):
                queued()

        pl_module.configure_model = configure_model
    queue.append(action)


def run_queued_only(pl_module: LightningModule) -> None:
    """Run the actions queued by :func:`after_configure_model`, for a caller that ran the
    module's own ``configure_model`` itself (or skipped it: it needs a device mesh)."""
    if _QUEUE in vars(pl_module):
        del pl_module.configure_model
        for queued in pl_module.__dict__.pop(_QUEUE):
            queued()


def refuse_late_layers(callback: Any, pl_module: LightningModule) -> None:
    """After ``configure_model``: the layers ``callback`` targets now must be those it set
    up in ``setup``; a targeted layer built later would train uncompressed, unnoticed.

    Raises:
        ValueError: naming the layers built too late, and the fix.
    """
    installed = callback.set_up_layers()
    if not installed:  # nothing set up in `setup` (nothing targeted, or set up after this)
        return
    selected = callback.selected_layers(pl_module) or {}
    # A new module under a set-up name (`self.model.lm_head = nn.Linear(...)`) holds none of its stages.
    replaced = sorted(name for name, layer in selected.items()
                      if name in installed and layer is not None and layer is not installed[name])
    if replaced:
        raise ValueError(
            f"{type(callback).__name__} set up its layers in `setup`, before `configure_model` replaced"
            f" {first_four(replaced)} with"
            " new modules, which hold none of its stages and would train uncompressed; build or replace them in"
            " `__init__` (`configure_model` may shard them, which keeps the modules)"
        )
    late = sorted(set(selected) - set(installed))
    if late:
        exclude = "exclude_modules" if hasattr(callback.config, "exclude_modules") else "exclude"  # LoRA: PEFT's name
        raise ValueError(
            f"{type(callback).__name__} set up its layers in `setup`, before `configure_model` built {first_four(late)}, which"
            " it also targets and would leave uncompressed; build them in `__init__` (`configure_model` may shard"
            f" them) or leave them out with `{exclude}`"
        )
