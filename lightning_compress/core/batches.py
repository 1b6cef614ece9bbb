"""A batch as Lightning's loops hand it to a step, for the forwards that run outside them
(the export's check at the end of fit, ``lightning-compress export`` and ``sensitivity``)."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden


def as_steps_get_them(
    batches: Iterable[Any],
    model: pl.LightningModule,
    datamodule: Optional[pl.LightningDataModule] = None,
    *,
    device: torch.device = torch.device("cpu"),
    convert: Optional[Callable[[Any], Any]] = None,
) -> Iterator[Any]:
    """Each of ``batches`` as a step receives it: through ``convert`` (the precision
    plugin's ``convert_input``: ``precision="bf16-true"`` casts float inputs), then the
    batch hooks, the datamodule's where it overrides one, else the module's, as Lightning
    picks them: ``on_before_batch_transfer``, ``transfer_batch_to_device`` (to ``device``),
    ``on_after_batch_transfer``."""
    def hook(name: str) -> Callable[..., Any]:
        overridden = datamodule is not None and is_overridden(name, datamodule, pl.LightningDataModule)
        return getattr(datamodule if overridden else model, name)

    for batch in batches:
        batch = hook("on_before_batch_transfer")(batch if convert is None else convert(batch), 0)
        yield hook("on_after_batch_transfer")(hook("transfer_batch_to_device")(batch, device, 0), 0)


__all__ = ["as_steps_get_them"]
