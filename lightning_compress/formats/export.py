"""``export``: the model a training run produced → a packed directory, checked for parity."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn

from lightning_compress.core.atomic import atomic_write_directory, remove_directory
from lightning_compress.core.filesystem import user_path
from lightning_compress.core.memory import release_freed_memory
from lightning_compress.core.recompute import export_checks
from lightning_compress.core.notes import first_four
from lightning_compress.core.validate import ArgumentError, check_bool, check_module, plain_values
from lightning_compress.formats.companions import ONNX_FILE, RECORD_KEY, REPORT_FILE, companion_checksums
from lightning_compress.formats.config import validate_export_formats, validate_export_options
from lightning_compress.formats.devices import on_the_cpu
from lightning_compress.formats.errors import ExportError, ParityError, UnexportableModel
from lightning_compress.formats.failed_export import failed_path, keep_elsewhere, keep_failed, refuse_stale
from lightning_compress.formats.gguf import summary_line, write_gguf
from lightning_compress.formats.packed import METADATA_FILE, PackedModel, metadata_bytes, open_packed
from lightning_compress.formats.packing import CONFIG_FILE, ExportReport, Packing, collect, pack, pack_into, plan_layers
from lightning_compress.formats.outputs import raised_by_the_model
from lightning_compress.formats.parity import check_parity
from lightning_compress.formats.runtime import PackedWeight
from lightning_compress.formats.target import foreign_contents


@export_checks()  # its forwards are not training forwards, even inside a training batch
def export(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    inputs: Optional[Sequence[Any]] = None,
    overwrite: bool = False,
    parity: bool = True,
    max_relative_error: float = 1e-5,
    min_sqnr_db: float = 35.0,
    backend: str = "auto",
    sparse_threshold: Optional[float] = 0.3,
    compressed_tensors: Optional[bool] = None,
    recipe: Optional[Mapping[str, Any]] = None,
    formats: Sequence[str] = ("safetensors",),
    tokenizer: Any = None,
    onnx_activations: str = "float",
    onnx_dynamic_sequence: bool = False,
    keep_unchecked: bool = False,
) -> ExportReport:
    """Pack ``model`` (as its compression callbacks left it) into ``out_dir``.

    Quantized layers are stored as their exact integer codes (int8, or densely packed
    sub-8-bit), pruned tensors as a bitmask plus the kept values when that is smaller,
    everything else as it is. LoRA adapters are merged on the way (the effective weight
    is what is stored). The parity check then reads the files back and compares them with
    the model. If it (or the ONNX file's check) fails, ``out_dir`` is not written; the
    packed files are kept in ``<out_dir>.failed-parity/`` with the figures in
    ``parity.json`` (see :mod:`lightning_compress.formats.failed_export`), so a run's
    result is never lost, and the error names that directory.

    Memory: the model is packed one layer at a time straight into ``model.safetensors``
    (:mod:`~lightning_compress.formats.packing`), read back one layer at a time, and the
    parity check holds the packed modules (int4: an eighth of the float weights) beside the
    model, never a second float copy; large layers are quantized and compared in row
    blocks, and each packed layer's output is compared while the fake-quant model runs
    (nothing is kept per layer, only the model's outputs). What remains is the largest
    layer's float weight (fake-quantized, or dequantized) and one batch's activations;
    freed blocks are handed back to the system between layers
    (:mod:`lightning_compress.core.memory`), so they do not add to the peak.

    Args:
        model: the trained module (a LightningModule or any ``nn.Module``).
        out_dir: the directory to create.
        inputs: batches for the output parity check; each a tensor (``model(x)``), a
            tuple (``model(*x)``) or a dict (``model(**x)``). Without them only the
            weights are checked.
        overwrite: replace an existing ``out_dir`` (only once the new one is complete; a
            crash at any instant leaves the old directory or the new one, see
            :mod:`lightning_compress.core.atomic`). It also covers the sibling
            ``<out_dir>.failed-parity/`` an earlier failed export kept: without
            ``overwrite`` its presence is refused, with it a failing export replaces it
            and a passing one removes it once ``out_dir`` is in place.
        parity: run the parity check (default on).
        max_relative_error: threshold of the exact (dequantize) path's output error.
        min_sqnr_db: threshold of the int8-GEMM path's output SQNR, in dB.
        backend: the loader backend the parity check measures (see :func:`load_packed`).
        sparse_threshold: tensors at least this sparse are stored as bitmask + values
            when that is smaller; ``None`` stores everything dense.
        compressed_tensors: write ``config.json`` with a compressed-tensors
            ``quantization_config`` (and the tensors as llm-compressor writes them) so
            vLLM and ``transformers`` load the directory, int8 activations included
            (bitmask storage is then off; see :mod:`~lightning_compress.formats.compressed_tensors`).
            ``None``: on when ``model`` is a ``transformers`` model whose quantized
            layers are all Linear layers that transformers loads (not asymmetric
            group/channel weights: their packed zero points are for vLLM, written with
            ``True``; not Embedding layers, which compressed-tensors does not run packed).
        recipe: the recipe that produced the model, stored in the metadata.
        formats: ``("safetensors",)``, or with ``"onnx"`` also ``model.onnx``: int4
            Linear layers as onnxruntime's ``MatMulNBits``, int8 as QDQ (see
            :mod:`lightning_compress.formats.onnx`); other layers stay float
            there. It is traced with ``inputs[0]`` (a tensor or tuple) and checked by
            running it in onnxruntime against the fake-quant model. With ``"gguf"``
            also ``model.gguf`` for llama.cpp (see :mod:`lightning_compress.formats.gguf`).
        tokenizer: the vocabulary ``model.gguf`` carries: ``None`` (byte-level), a list
            of token strings, or a transformers tokenizer or its directory (see
            :mod:`lightning_compress.formats.gguf_vocab`).
        onnx_activations: ``"float"`` (default): ``model.onnx`` computes its integer layers
            from float activations, exactly (held to ``max_relative_error``); ``"int8"``:
            onnxruntime rounds their activations to int8 and multiplies in integers (int4
            ``MatMulNBits`` with ``accuracy_level=4``; int8 ``MatMulInteger`` with each
            token rounded on training's int8 dynamic grid, so a layer trained that way keeps
            its codes): 3x to 6x float32 at batch 1 here, approximate for weight-only
            layers, so the file is held to ``min_sqnr_db`` instead. Layers trained with
            static int8 activations keep them. Only with ``"onnx"`` in ``formats``.
        onnx_dynamic_sequence: ``model.onnx`` takes any length along dimension 1 of each
            input and output with two or more dimensions (token ids, masks, hidden states,
            logits), not only the example's; checked in onnxruntime at a quarter shorter
            and longer too, since a traced model can hold a length as a constant. Only
            with ``"onnx"`` in ``formats``.
        keep_unchecked: when the model's own forward raises on ``inputs`` (or an option
            does not fit it), the packed files cannot be checked: by default only that
            error is raised and nothing is written (the model is in memory, to export
            again); with ``True`` the files are kept as a failed check keeps them, in
            ``<out_dir>.failed-parity/``, and an ``ExportError`` naming it is raised
            (``CompressedExport`` at the end of fit, where the error may end the process).

    Raises:
        ExportError: NaN/Inf in a weight (naming the layer), ``out_dir`` or
            ``<out_dir>.failed-parity`` exists (or ``out_dir`` appeared during the export)
            without ``overwrite``, another process is exporting to ``out_dir`` (the message
            names its lock file and pid; this one does not wait), or an option does not fit
            the model; or the check of the packed files crashed (``err.directory`` is where
            they were kept); or ``out_dir`` could not be written (a full disk, permissions,
            the lock): the export is then written and checked in a new folder of the system's
            temporary directory instead, which ``err.directory`` and the message name
            (``None`` if that failed too; see :mod:`~lightning_compress.formats.failed_export`).
            With ``keep_unchecked``, also when the model raised on ``inputs``.
        ParityError: the packed model (or ``model.onnx``) misses a threshold;
            ``err.report`` has the figures, ``err.directory`` is ``<out_dir>.failed-parity``
            (a folder of the system's temporary directory if that could not be written,
            ``None`` if nothing could; the message says why).
    """
    check_module("model", model)
    for argument, value in (("overwrite", overwrite), ("parity", parity), ("keep_unchecked", keep_unchecked)):
        check_bool(argument, value)
    _refuse_packed(model)
    validate_export_options(backend, sparse_threshold, max_relative_error, min_sqnr_db, inputs, compressed_tensors)
    validate_export_formats(formats, inputs, tokenizer, onnx_activations, onnx_dynamic_sequence, model)
    out_dir = user_path(out_dir, "out_dir")
    if out_dir.exists() and not out_dir.is_dir():  # first: overwrite=True would not replace a file
        raise ExportError(f"{out_dir} exists and is not a directory; export to a directory path")
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} already exists; pass overwrite=True to replace it")
    foreign = foreign_contents(out_dir)
    if foreign is not None:
        raise ExportError(f"{out_dir} cannot be replaced: {foreign}; export to another directory, or empty that one")
    refuse_stale(out_dir, overwrite)
    if "onnx" in formats:
        _refuse_onnx_misfits(model, onnx_activations)
    options = dict(sparse_threshold=sparse_threshold, compressed_tensors=compressed_tensors,
                   recipe=plain_values(recipe),
                   formats=formats, tokenizer=tokenizer)
    done: Dict[str, Any] = {}
    failure: Dict[str, Any] = {}

    def finish(directory: Path) -> Dict[str, bytes]:
        # Packed straight into the directory being built (one layer at a time), read back from
        # it and checked there; nothing is at `out_dir` until that passed. What the run before
        # freed is returned first: its peak is the export's own (see core.memory).
        release_freed_memory()
        with on_the_cpu(model) as moved:  # where the files are checked (see on_the_cpu)
            checked_inputs = move_data_to_device(inputs, "cpu") if moved and inputs else inputs
            packing = done["packing"] = pack_into(directory, model, out_dir, **options)
            for name, data in packing.files.items():  # compression.json: read_packed reads it
                (directory / name).write_bytes(data)
            try:
                # Not `read_packed`: its pass over every entry is the weight check's first step.
                check_packing(model, packing, open_packed(directory) if parity else None, checked_inputs, directory,
                              parity=parity, backend=backend, max_relative_error=max_relative_error,
                              min_sqnr_db=min_sqnr_db, formats=formats, onnx_activations=onnx_activations,
                              onnx_dynamic_sequence=onnx_dynamic_sequence)
            except Exception as error:
                unchecked = raised_by_the_model(error) or isinstance(error, (ArgumentError, UnexportableModel))
                if unchecked and not keep_unchecked:
                    raise  # the model cannot run on `inputs`, or an option does not fit it: the files are not at fault
                # The packed files and the check's own (model.onnx) are kept beside the export; only
                # on this path is model.safetensors read into memory.
                failure.update(error=error, files={p.name: p.read_bytes() for p in directory.iterdir()
                                                   if p.is_file() and not p.name.startswith(".")})
                raise
            # What other engines read (model.onnx, model.gguf, config.json), as checked just now.
            checksums = companion_checksums(directory)
            if checksums:
                packing.body[RECORD_KEY] = checksums
            return {**packing.files, METADATA_FILE: metadata_bytes(packing.body),
                    REPORT_FILE: (packing.report.table() + "\n").encode()}

    def write(directory: Path, replace: bool) -> None:
        try:
            atomic_write_directory(directory, {}, overwrite=replace, finish=finish)
        except Exception as error:
            if failure.get("error") is error:  # packed, but the check failed: keep the files beside it
                packing = done["packing"]
                raise keep_failed(directory, failure["files"], packing.body, packing.report, error,
                                  overwrite=replace) from error
            raise

    try:
        write(out_dir, overwrite)
    except OSError as error:
        # Not written, nothing replaced: a full disk, permissions, another export holding the
        # lock (no waiting: the second of two concurrent exports fails at once), `out_dir`
        # appeared meanwhile. The model is packed again into the system's temporary directory.
        raise keep_elsewhere(out_dir, error, lambda folder: write(folder, False)) from error
    if overwrite:
        _remove_stale_failure(out_dir)
    return done["packing"].report


def check_packing(model: nn.Module, packing: Packing, packed: Optional[PackedModel], inputs, directory: Path, *,
                  parity: bool, backend: str, max_relative_error: float, min_sqnr_db: float, formats,
                  onnx_activations: str = "float", onnx_dynamic_sequence: bool = False) -> None:
    """The export's check of ``packed`` (``packing``'s files, read back): parity, then the
    ONNX file (written to ``directory``) in onnxruntime; the figures go into ``packing``.

    Raises:
        ParityError: a threshold is missed.
    """
    report, body = packing.report, packing.body
    if parity:
        report.parity = check_parity(
            model, packed, list(inputs or []), backend=backend,
            max_relative_error=max_relative_error, min_sqnr_db=min_sqnr_db,
        )
        if not report.parity.passed:
            raise ParityError(f"parity check failed: {report.parity.summary()}", report.parity)
        body["parity"] = report.parity.as_dict()
    if "onnx" in formats:
        from lightning_compress.formats.onnx.check import export_and_check
        from lightning_compress.formats.onnx.layouts import QDQ

        body["onnx"] = export_and_check(model, packing.layers, list(inputs), directory / ONNX_FILE, max_relative_error,
                                        min_sqnr_db, int8_activations=onnx_activations == "int8",
                                        dynamic_sequence=onnx_dynamic_sequence)
        sqnr = body["onnx"]["sqnr_db"]
        qdq = sum(op == QDQ for op in body["onnx"]["layers"].values())
        session = (f" with session.qdq_matmulnbits_accuracy_level=0, as run_onnx sets it (onnxruntime's default session"
                   f" also rounds the inputs of its {qdq} int8 QDQ layers to int8)") if qdq else ""
        report.notes.append(
            f"model.onnx: {len(body['onnx']['layers'])} integer layers"
            f"{', int8 activations' if body['onnx']['int8_activations'] else ''}, onnxruntime relative error"
            f" {body['onnx']['relative_error']:.2e}" + ("" if sqnr is None else f" ({sqnr:.1f} dB)") + session
            + (f"; any sequence length (checked at {body['onnx']['dynamic_sequence']['checked_lengths']} too)"
               if "dynamic_sequence" in body["onnx"] else "")
        )
    if "gguf" in formats:
        body["gguf"] = write_gguf(packing.gguf, model, packing.layers, directory)
        report.notes.append(summary_line(body["gguf"], packing.gguf.notes))


def _refuse_onnx_misfits(model: nn.Module, onnx_activations: str) -> None:
    """model.onnx's refusals (a grid no op holds, int8 activations on a layer that is not
    float32) before anything is packed: an option that does not fit the model, not a
    failed check of packed files."""
    from lightning_compress.formats.onnx.graph import check_onnx_fit

    layers = ((key, layer, quantizer.spec) for key, layer, param, quantizer in plan_layers(model) if param == "weight")
    try:
        check_onnx_fit(layers, int8_activations=onnx_activations == "int8")
    except ValueError as error:
        raise ExportError(f"model.onnx cannot be written: {error}") from error


def _remove_stale_failure(out_dir: Path) -> None:
    failed = failed_path(out_dir)
    try:
        remove_directory(failed)
    except Exception as error:  # the export is written; a leftover must not fail it
        warnings.warn(f"{out_dir} is written, but the files an earlier failed export kept in {failed} could not be"
                      f" removed ({error}); remove them by hand", RuntimeWarning, stacklevel=3)


def _refuse_packed(model: nn.Module) -> None:
    """A model :func:`load_packed` returned holds its layers packed, which the packing
    reads as plain modules: the export passed its check and wrote a folder without them,
    which the loader then refused."""
    packed = [name.rpartition(".")[0] for name, module in model.named_modules() if isinstance(module, PackedWeight)]
    if packed:
        raise ExportError(
            f"`model` holds layers loaded packed by load_packed ({first_four(packed)}): export packs a trained model's"
            " compressed layers, not packed ones. To move or copy an export, copy its folder; to export again,"
            " export the trained model (or load its Lightning checkpoint into the module and export that)"
        )


__all__ = ["CONFIG_FILE", "ExportReport", "ONNX_FILE", "Packing", "REPORT_FILE", "check_packing", "collect",
           "export", "pack"]

