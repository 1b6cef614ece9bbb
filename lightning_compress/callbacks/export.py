"""CompressedExport: write the packed model at the end of fit, checked for parity."""

from __future__ import annotations

import itertools
import json
import os
from typing import Any, Callable, Iterable, List, Optional, Sequence

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress.callbacks.base import CompressionCallback
from lightning_compress.core.batches import as_steps_get_them
from lightning_compress.core.notes import add_note
from lightning_compress.core.sharding import gathered
from lightning_compress.core.tracking import log_artifact
from lightning_compress.core.validate import ArgumentError
from lightning_compress.formats.config import ExportConfig
from lightning_compress.formats.dry_export import dry_export
from lightning_compress.formats.export import ExportReport, export
from lightning_compress.formats.failed_export import failed_path, keep_elsewhere
from lightning_compress.formats.inputs import (
    batch_inputs,
    guessed_inputs_error,
    inputs_mismatch,
    mismatch_error,
    missing_forward_error,
)
from lightning_compress.formats.packed import METADATA_FILE
from lightning_compress.formats.target import check_export_target, check_keeps_apart, foreign_contents, refuse_foreign

DRY_EXPORT_NOTE = (
    "found by CompressedExport's dry export before the first training step: nothing was trained or written; the"
    " export at the end of fit would fail the same way. dry_export=False (in a recipe: export.dry_export=false)"
    " skips this check"
)


class CompressedExport(CompressionCallback):
    """At the end of ``fit``, pack the model the other callbacks trained into ``dirpath``.

    Quantized layers are stored as their exact integer codes (int4 truly packed), pruned
    tensors as bitmask + values when that is smaller, LoRA adapters merged. The parity
    check reads the files back and compares them with the fake-quant model on a few
    validation batches; if it fails, ``dirpath`` is not written, the packed files are
    kept in ``<dirpath>.failed-parity/`` (with ``parity.json``; ``load_packed`` refuses
    them unless ``allow_failed_parity=True``) and fit raises
    :class:`~lightning_compress.formats.errors.ParityError` naming that directory and
    the worst layers (when the model itself raises on the check's inputs, the files are
    kept there too, with an ``ExportError`` carrying its error). Under DDP, rank 0 writes and the other ranks wait (and raise the
    same error).

    Nothing trained is lost at the end: when ``dirpath`` cannot be written then (a full
    disk, permissions changed during training), the export is written and checked in a
    new folder of the system's temporary directory instead, and the ``ExportError`` names
    it (``err.directory``; see :mod:`~lightning_compress.formats.failed_export`).

    Before the first training step (on the first training batch of each fit, which it
    uses as the parity input), a dry export of the model as it is then
    (:func:`~lightning_compress.formats.dry_export.dry_export`: packing, the parity check
    and the ONNX export when asked, in memory) stops the run with the error the export at
    the end would raise for a format, kernel or ONNX problem, instead of after the last
    step. It writes nothing and leaves the weights, quantizer ranges and random number
    generators as they were, so the run trains to the same bits; it costs one packing of
    the model and a few forwards of one batch without gradients (see ``dry_export``).

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
            one is complete), and the ``<dirpath>.failed-parity`` of an earlier failed
            export (replaced if this export fails too, removed once ``dirpath`` is written).
        parity: run the parity check.
        parity_batches: validation batches (training batches when there is no
            validation loop) the outputs are compared on.
        dry_export: run the dry export before the first training step (default
            ``True``); ``False`` skips it.
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
            ``model.onnx`` (int4 as ``MatMulNBits``, int8 as QDQ), checked in onnxruntime;
            with ``"gguf"`` also ``model.gguf`` for llama.cpp (a LLaMA-architecture
            transformers model: pass its ``module``), read back with the ``gguf`` package.
        tokenizer: the vocabulary of ``model.gguf``: ``None`` (byte-level), a list of
            token strings, a transformers tokenizer or the directory it was saved to (a
            path in a recipe); see :mod:`lightning_compress.formats.gguf_vocab`.
        onnx_activations: ``"float"`` (exact) or ``"int8"`` (``model.onnx`` rounds the
            integer layers' activations to int8: 2x to 4x faster at batch 1, held to
            ``min_sqnr_db``); see :func:`lightning_compress.export`.
        onnx_dynamic_sequence: ``model.onnx`` takes any sequence length (dimension 1),
            checked at a shorter and a longer one too; see :func:`lightning_compress.export`.
        config: a built :class:`~lightning_compress.formats.config.ExportConfig` instead
            of the arguments above.

    Raises:
        ArgumentError: (a ``ValueError``) at construction, naming a bad argument; at
            setup, before training, naming ``dirpath`` when the export could not write it
            (a file is there, whatever ``overwrite`` says; a file in its path; a folder
            this process cannot create files in: see
            :func:`~lightning_compress.formats.target.check_export_target`); and naming
            ``input_fn`` when the inputs it (or the default) makes from a batch do not fit
            the module's ``forward``.
        FileExistsError: at setup, before training, when ``dirpath`` or
            ``<dirpath>.failed-parity`` exists and ``overwrite`` is False.
        ValueError: at setup, when ``module`` is not a submodule of the LightningModule.
        ExportError: before the first training step, from the dry export (the error the
            export at the end would raise; ``ParityError`` and ONNX errors too), and at fit
            end; under DDP a ``RuntimeError`` on every rank.
        ParityError: at fit end, when the exported model does not match the trained
            one (``dirpath`` is not written; ``err.directory`` is where the files are).
    """

    section = "export"
    config_class = ExportConfig
    stateful = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.report: Optional[ExportReport] = None
        self.dry_report: Optional[ExportReport] = None  # the dry export's, before training
        self._dry_pending = False

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
            target = self._target(pl_module)  # a wrong `module` fails before training
            missing = missing_forward_error(target, self.module, parity=self.parity, onnx="onnx" in self.formats)
            if missing is not None:
                raise missing
            if "onnx" in self.formats and isinstance(trainer.strategy, ModelParallelStrategy):
                raise ArgumentError(
                    "formats", "CompressedExport: formats=[..., 'onnx'] cannot trace a model sharded by"
                    " ModelParallelStrategy (its copy holds the process group). Export safetensors in the run, and"
                    " the ONNX file afterwards from a one-file checkpoint (ModelParallelStrategy("
                    "save_distributed_checkpoint=False)): `lightning-compress export --checkpoint ... --format onnx"
                    " --data ...`; checked before training so no run is lost"
                )
            check_export_target(self.dirpath, self.overwrite)  # a file, an unwritable folder
            # Before the existence check: a logger writing inside `dirpath` made it exist.
            check_keeps_apart(self.dirpath, _run_folders(trainer), self.overwrite, _wandb_runs(trainer))
            if self.overwrite:
                refuse_foreign(self.dirpath)  # overwrite replaces an earlier export, not a folder of other files
            if self.dirpath.exists() and not self.overwrite:
                raise FileExistsError(
                    f"CompressedExport: {self.dirpath} already exists; choose another `dirpath` or pass"
                    " overwrite=True (in a recipe: export.overwrite=true); checked before training so no run is lost"
                )
            failed = failed_path(self.dirpath)
            if os.path.lexists(failed) and not self.overwrite:
                raise FileExistsError(
                    f"CompressedExport: {failed} exists (an earlier export to {self.dirpath} failed its check and kept"
                    " its files there); move it away, or pass overwrite=True (in a recipe: export.overwrite=true),"
                    " which replaces it if this run's export fails too and removes it once the export is written;"
                    " checked before training so no run is lost"
                )
            self._dry_pending = self.dry_export

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        # Again after every callback's setup, where a ModelCheckpoint without a dirpath decides it.
        check_keeps_apart(self.dirpath, _run_folders(trainer), self.overwrite, _wandb_runs(trainer))

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._dry_pending:
            return
        self._dry_pending = False
        target = self._target(pl_module)

        def dry() -> None:
            inputs = self._inputs(pl_module, [batch], 1, check=True)
            try:
                self.dry_report = dry_export(target, inputs, **self.options)
            except TypeError as error:  # inside a forward(*args) the default input_fn had to guess for
                guessed = guessed_inputs_error(error, target, batch, inputs[0]) if inputs and not self.input_fn else None
                if guessed is None:
                    raise
                raise guessed from error

        self._on_rank_zero(trainer, dry, "dry export (before the first training step)", DRY_EXPORT_NOTE)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        self._dry_pending = False  # a fit without a training batch
        batches = self._parity_loader(trainer, pl_module)
        self._on_rank_zero(trainer, lambda: self._write_at_fit_end(pl_module, batches), "export")
        if trainer.is_global_zero:
            rank_zero_info(self.report.table())
            self._log_artifact(trainer)

    def write(self, pl_module: nn.Module, batches: Iterable[Any] = ()) -> ExportReport:
        """Export ``pl_module`` now: what ``on_fit_end`` does, usable outside a fit
        (``lightning-compress export`` rebuilds a model from a checkpoint and calls this).

        Args:
            pl_module: the module as the compression callbacks left it.
            batches: batches to take the parity check's inputs from (the first
                ``parity_batches``, through ``input_fn``); none checks the weights only.
        """
        inputs = self._inputs(pl_module, batches, self.parity_batches)
        self.report = export(self._target(pl_module), self.dirpath, inputs=inputs, **self.options)
        return self.report

    # ------------------------------------------------------------------ internals
    def _write_at_fit_end(self, pl_module: nn.Module, batches: Iterable[Any]) -> None:
        inputs, target = self._inputs(pl_module, batches, self.parity_batches), self._target(pl_module)

        def write(folder) -> ExportReport:
            # A model that cannot run on the check's inputs keeps the packed files too
            # (<dirpath>.failed-parity): the error may end the process, and the run with it.
            return export(target, folder, inputs=inputs, **self.options, keep_unchecked=True)

        foreign = foreign_contents(self.dirpath) if self.overwrite else None
        if (self.dirpath.exists() and not self.overwrite) or foreign is not None:
            # Absent at setup (checked there), or then empty or an export, so made (or filled
            # with other files) during training: by another process, or a ModelCheckpoint saving
            # there. The trained model is exported to the system's temporary directory, which the
            # error names, instead of being lost with the process.
            appeared = FileExistsError(f"{self.dirpath} was made during training" if foreign is None else
                                       f"{self.dirpath} cannot be replaced: {foreign} (since setup)")
            raise keep_elsewhere(self.dirpath, appeared, write)
        self.report = write(self.dirpath)

    def _inputs(self, pl_module: nn.Module, batches: Iterable[Any], count: int, check: bool = False) -> List[Any]:
        """The model inputs of the first ``count`` batches: for the parity check, and for
        tracing the ONNX export (which needs one even with ``parity=False``).

        ``check`` (before training): inputs that do not bind to the module's ``forward``
        raise an ``ArgumentError`` naming ``input_fn``. At the end they are left to the
        export's check, whose failure keeps the packed files (``<dirpath>.failed-parity``).
        """
        if not self.parity and "onnx" not in self.formats:
            return []
        target = self._target(pl_module)
        input_fn = self.input_fn or (lambda batch: batch_inputs(batch, target))
        device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
        inputs = []
        for batch in itertools.islice(batches, count):
            made = input_fn(batch)
            problem = inputs_mismatch(target, made) if check else None
            if problem is not None:
                raise mismatch_error(target, batch, made, problem, default=self.input_fn is None)
            inputs.append(move_data_to_device(made, device))
        return inputs

    @staticmethod
    def _on_rank_zero(trainer: Trainer, work: Callable[[], Any], what: str, note: str = "") -> None:
        """Run ``work`` on rank 0; its error is raised on every rank (as it is in one process).

        Under FSDP2 rank 0 gathers the full weights first (the others only take part in
        each gather) and exports them."""
        error: Optional[str] = None
        with gathered(trainer.lightning_module, here=trainer.is_global_zero):
            if trainer.is_global_zero:
                try:
                    work()
                except Exception as err:  # re-raised below, on every rank
                    if note:
                        add_note(err, note)
                    error = f"{type(err).__name__}: {err}{' (' + note + ')' if note else ''}"
                    if trainer.world_size == 1:
                        raise
            error = trainer.strategy.broadcast(error, src=0)  # the other ranks wait here
        if error is not None:
            raise RuntimeError(f"CompressedExport's {what} failed on rank 0: {error}")

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

    def _parity_loader(self, trainer: Trainer, pl_module: LightningModule) -> Iterable[Any]:
        """The batches of the check at the end of fit: the first validation loader's (else
        the training loader's), each as a step receives it (and as the dry export received
        its batch): in the precision plugin's input dtype (``precision="bf16-true"`` casts
        float inputs) and through the module's batch hooks (``on_before_batch_transfer``,
        ``transfer_batch_to_device``, ``on_after_batch_transfer``)."""
        loaders = trainer.val_dataloaders or trainer.train_dataloader
        if loaders is None:
            return ()
        return as_steps_get_them(loaders[0] if isinstance(loaders, Sequence) else loaders, pl_module,
                                 trainer.datamodule, device=trainer.strategy.root_device,
                                 convert=trainer.precision_plugin.convert_input)

    def _log_artifact(self, trainer: Trainer) -> None:
        # The files are written and verified: a tracking failure must not fail the run.
        try:
            metadata = json.loads((self.dirpath / METADATA_FILE).read_text())
            log_artifact(trainer, self.dirpath, type="model", metadata=metadata)
        except Exception as err:
            rank_zero_warn(f"CompressedExport: the export in {self.dirpath} is complete, but logging it as a W&B artifact failed: {err}")


def _run_folders(trainer: Trainer) -> dict:
    """The folders the run writes besides the export: its ModelCheckpoint folders (those
    decided yet), its loggers' folders and a teacher-output cache on disk, by what each is."""
    kept = {f"{type(callback).__name__}'s dirpath": callback.dirpath
            for callback in trainer.checkpoint_callbacks if getattr(callback, "dirpath", None)}
    for logger in trainer.loggers:
        folder = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        if folder:
            kept[f"{type(logger).__name__}'s folder"] = folder
    for callback in trainer.callbacks:  # a distillation teacher cache on disk
        config = getattr(callback, "config", None)
        if getattr(config, "cache", None) == "disk" and getattr(config, "cache_dir", None):
            kept[f"{type(callback).__name__}'s cache_dir"] = config.cache_dir
    return kept


def _wandb_runs(trainer: Trainer) -> dict:
    """The folders its ``WandbLogger`` writes every run to (offline ones waiting for
    ``wandb sync`` too): ``<save_dir>/wandb``, or ``.wandb`` where wandb would use that."""
    runs = {}
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            root = logger.save_dir or os.environ.get("WANDB_DIR") or "."
            hidden = os.path.join(root, ".wandb")
            runs["WandbLogger's runs"] = hidden if os.path.isdir(hidden) else os.path.join(root, "wandb")
    return runs
