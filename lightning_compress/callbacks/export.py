"""CompressedExport: write the packed model at the end of fit, checked for parity."""

from __future__ import annotations

import itertools
import json
from typing import Any, Iterable, Optional, Sequence

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress.callbacks.base import CompressionCallback
from lightning_compress.core.tracking import log_artifact
from lightning_compress.formats.config import ExportConfig
from lightning_compress.formats.export import ExportReport, export
from lightning_compress.formats.inputs import batch_inputs
from lightning_compress.formats.packed import METADATA_FILE


class CompressedExport(CompressionCallback):
    """At the end of ``fit``, pack the model the other callbacks trained into ``dirpath``.

    Quantized layers are stored as their exact integer codes (int4 truly packed), pruned
    tensors as bitmask + values when that is smaller, LoRA adapters merged. The parity
    check reads the files back and compares them with the fake-quant model on a few
    validation batches; if it fails, nothing is written and fit raises
    :class:`~lightning_compress.formats.errors.ParityError` with the worst layers. Under
    DDP, rank 0 writes and the other ranks wait (and raise the same error).

    Example::

        trainer = Trainer(callbacks=[QuantizationAwareTraining("int4", group_size=32),
                                     CompressedExport("exports/run1")])
        ...
        model = load_packed("exports/run1", MyModule())

    With a ``WandbLogger`` attached, the directory is also logged as a W&B Artifact of
    type ``"model"`` named after it (``run1``), with ``compression.json`` as its metadata.

    Args:
        dirpath: the directory to write (created; see ``overwrite``).
        module: attribute path of the submodule to export (e.g. ``"model"`` for a
            ``transformers`` model held by the LightningModule, which then also gets a
            compressed-tensors ``config.json``); default the whole LightningModule.
        overwrite: replace an existing ``dirpath`` (the old one stays until the new
            one is complete).
        parity: run the parity check.
        parity_batches: validation batches (training batches when there is no
            validation loop) the outputs are compared on.
        input_fn: turns a batch into the module's inputs (a tuple is passed
            positionally, a dict as keyword arguments); default
            :func:`~lightning_compress.formats.inputs.batch_inputs`, which reads the
            module's ``forward``: ``x`` of ``(x, y)``, ``(x1, x2)`` of ``(x1, x2, y)`` for
            ``forward(x1, x2)``, a dict's entries ``forward`` takes (label keys left out),
            or an error that says what to pass.
        max_relative_error: threshold of the exact path's output error (default 1e-5).
        min_sqnr_db: threshold of the int8-GEMM path's output SQNR (default 35 dB).
        backend: the loader backend the parity check measures.
        sparse_threshold: store tensors at least this sparse as bitmask + values (when
            smaller); ``None`` keeps everything dense.
        compressed_tensors: see :func:`lightning_compress.export`.
        recipe: the recipe to store in the metadata.
        formats: ``["safetensors"]``, or ``["safetensors", "onnx"]`` to also write
            ``model.onnx`` (int4 as ``MatMulNBits``, int8 as QDQ), checked in onnxruntime.
        config: a built :class:`~lightning_compress.formats.config.ExportConfig` instead
            of the arguments above.

    Raises:
        ArgumentError: (a ``ValueError``) at construction, naming a bad argument.
        FileExistsError: at setup, before training, when ``dirpath`` exists and
            ``overwrite`` is False.
        ValueError: at setup, when ``module`` is not a submodule of the LightningModule.
        ParityError: at fit end, when the exported model does not match the trained
            one (nothing is written); under DDP a ``RuntimeError`` on every rank.
    """

    section = "export"
    config_class = ExportConfig
    stateful = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.report: Optional[ExportReport] = None

    @property
    def state_key(self) -> str:
        # The export holds no state; its key stays the class name, as before the base class.
        return type(self).__qualname__

    @property
    def options(self):
        """The keyword arguments of :func:`lightning_compress.export` this callback passes."""
        return self.config.export_options()

    @override
    def install(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._target(pl_module)  # a wrong `module` fails before training
            if self.dirpath.exists() and not self.overwrite:
                raise FileExistsError(
                    f"CompressedExport: {self.dirpath} already exists; choose another `dirpath` or pass"
                    " overwrite=True (in a recipe: export.overwrite=true); checked before training so no run is lost"
                )

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        error: Optional[str] = None
        if trainer.is_global_zero:
            try:
                self.write(pl_module, self._parity_loader(trainer))
                rank_zero_info(self.report.table())
            except Exception as err:  # re-raised below, on every rank
                error = f"{type(err).__name__}: {err}"
                if trainer.world_size == 1:
                    raise
        error = trainer.strategy.broadcast(error, src=0)
        if error is not None:
            raise RuntimeError(f"CompressedExport failed on rank 0: {error}")
        if trainer.is_global_zero:
            self._log_artifact(trainer)

    def write(self, pl_module: nn.Module, batches: Iterable[Any] = ()) -> ExportReport:
        """Export ``pl_module`` now: what ``on_fit_end`` does, usable outside a fit
        (``lightning-compress export`` rebuilds a model from a checkpoint and calls this).

        Args:
            pl_module: the module as the compression callbacks left it.
            batches: batches to take the parity check's inputs from (the first
                ``parity_batches``, through ``input_fn``); none checks the weights only.
        """
        inputs = []
        if self.parity:
            target = self._target(pl_module)
            input_fn = self.input_fn or (lambda batch: batch_inputs(batch, target))
            device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
            for batch in itertools.islice(batches, self.parity_batches):
                inputs.append(move_data_to_device(input_fn(batch), device))
        self.report = export(self._target(pl_module), self.dirpath, inputs=inputs, **self.options)
        return self.report

    # ------------------------------------------------------------------ internals
    def _target(self, pl_module: LightningModule) -> nn.Module:
        if self.module is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError:
            children = [name for name, _ in pl_module.named_children()]
            raise ValueError(
                f"`module`={self.module!r} is not a submodule of {type(pl_module).__name__}; its children are"
                f" {children}"
            ) from None

    def _parity_loader(self, trainer: Trainer) -> Iterable[Any]:
        loaders = trainer.val_dataloaders or trainer.train_dataloader
        if loaders is None:
            return ()
        return loaders[0] if isinstance(loaders, Sequence) else loaders

    def _log_artifact(self, trainer: Trainer) -> None:
        # The files are written and verified: a tracking failure must not fail the run.
        try:
            metadata = json.loads((self.dirpath / METADATA_FILE).read_text())
            log_artifact(trainer, self.dirpath, type="model", metadata=metadata)
        except Exception as err:
            rank_zero_warn(f"CompressedExport: the export in {self.dirpath} is complete, but logging it as a W&B artifact failed: {err}")
