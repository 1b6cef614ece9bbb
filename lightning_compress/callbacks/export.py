"""CompressedExport: write the packed model at the end of fit, checked for parity."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from lightning.fabric.utilities.apply_func import move_data_to_device

from lightning_compress.core.compatibility import prepare_stack
from lightning_compress.core.reporting import expect_layer_table, report_layer_table
from lightning_compress.core.tracking import log_artifact
from lightning_compress.formats.export import ExportReport, export
from lightning_compress.formats.packed import METADATA_FILE
from lightning_compress.formats.runtime import BACKENDS

_LABEL_KEYS = ("labels", "label", "target", "targets", "y")


def default_input_fn(batch: Any) -> Any:
    """A dataloader batch → model inputs: ``x`` of ``(x, y, ...)``, a dict without its
    label keys (passed as keyword arguments), or the batch itself."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k not in _LABEL_KEYS}
    return batch


class CompressedExport(Callback):
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
        input_fn: turns a batch into the module's inputs; default
            :func:`default_input_fn` (``x`` of ``(x, y)``; a dict without label keys).
        max_relative_error: threshold of the exact path's output error (default 1e-5).
        min_sqnr_db: threshold of the int8-GEMM path's output SQNR (default 35 dB).
        backend: the loader backend the parity check measures.
        sparse_threshold: store tensors at least this sparse as bitmask + values (when
            smaller); ``None`` keeps everything dense.
        compressed_tensors: see :func:`lightning_compress.export`.
        recipe: the recipe to store in the metadata.
        formats: ``["safetensors"]``, or ``["safetensors", "onnx"]`` to also write
            ``model.onnx`` (int4 as ``MatMulNBits``, int8 as QDQ), checked in onnxruntime.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike,
        *,
        module: Optional[str] = None,
        overwrite: bool = False,
        parity: bool = True,
        parity_batches: int = 2,
        input_fn: Optional[Callable[[Any], Any]] = None,
        max_relative_error: float = 1e-5,
        min_sqnr_db: float = 35.0,
        backend: str = "auto",
        sparse_threshold: Optional[float] = 0.3,
        compressed_tensors: Optional[bool] = None,
        recipe: Optional[Mapping[str, Any]] = None,
        formats: Sequence[str] = ("safetensors",),
    ) -> None:
        if not isinstance(dirpath, (str, os.PathLike)) or not str(dirpath):
            raise ValueError(f"`dirpath` must be a directory path, got {dirpath!r}")
        if module is not None and (not isinstance(module, str) or not module):
            raise ValueError(f"`module` must be an attribute path such as 'model', got {module!r}")
        for argument, value in (("overwrite", overwrite), ("parity", parity)):
            if not isinstance(value, bool):
                raise ValueError(f"`{argument}` must be True or False, got {value!r}")
        if isinstance(parity_batches, bool) or not isinstance(parity_batches, int) or parity_batches < 1:
            raise ValueError(f"`parity_batches` must be a positive int, got {parity_batches!r}")
        if input_fn is not None and not callable(input_fn):
            raise ValueError("`input_fn` must be a callable taking a batch and returning the model's inputs")
        if backend not in BACKENDS:
            raise ValueError(f"unknown `backend` {backend!r}; choose one of {BACKENDS}")
        if recipe is not None and not isinstance(recipe, Mapping):
            raise ValueError(f"`recipe` must be a dict, got {type(recipe).__name__}")
        self.dirpath = Path(dirpath)
        self.module = module
        self.parity_batches = parity_batches
        self.input_fn = input_fn or default_input_fn
        self.options = dict(
            overwrite=overwrite, parity=parity, max_relative_error=max_relative_error, min_sqnr_db=min_sqnr_db,
            backend=backend, sparse_threshold=sparse_threshold, compressed_tensors=compressed_tensors, recipe=recipe,
            formats=tuple(formats),
        )
        self.report: Optional[ExportReport] = None
        # Checked here, not after hours of training (export validates the same way).
        from lightning_compress.formats.export import validate_export_formats, validate_export_options

        validate_export_options(backend, sparse_threshold, max_relative_error, min_sqnr_db, None, compressed_tensors)
        validate_export_formats(formats, [None] if "onnx" in formats else None)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        prepare_stack(trainer, pl_module, stage)
        if stage == "fit":
            self._target(pl_module)  # a wrong `module` fails before training
            if self.dirpath.exists() and not self.options["overwrite"]:
                raise FileExistsError(
                    f"CompressedExport: {self.dirpath} already exists; choose another `dirpath` or pass"
                    " overwrite=True (in a recipe: export.overwrite=true); checked before training so no run is lost"
                )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        expect_layer_table(trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        report_layer_table(trainer, pl_module)
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
        if self.options["parity"]:
            device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
            for batch in itertools.islice(batches, self.parity_batches):
                inputs.append(move_data_to_device(self.input_fn(batch), device))
        self.report = export(self._target(pl_module), self.dirpath, inputs=inputs, **self.options)
        return self.report

    # ------------------------------------------------------------------ internals
    def _target(self, pl_module: LightningModule):
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
