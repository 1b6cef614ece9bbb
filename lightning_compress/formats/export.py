"""``export``: the model a training run produced → a packed directory, checked for parity."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_compress.core.atomic import atomic_write_directory, remove_directory
from lightning_compress.core.reporting import format_table
from lightning_compress.core.targeting import parameter_key, weight_param
from lightning_compress.core.transforms import Stage, is_transformed, weight_before, weight_slots
from lightning_compress.formats import compressed_tensors as ct
from lightning_compress.formats.config import validate_export_formats, validate_export_options
from lightning_compress.formats.errors import ExportError, ParityError
from lightning_compress.formats.failed_export import failed_path, keep_elsewhere, keep_failed, refuse_stale
from lightning_compress.formats.gguf import plan_gguf, summary_line, write_gguf
from lightning_compress.formats.packed import (
    FORMAT_NAME,
    FORMAT_VERSION,
    METADATA_FILE,
    WEIGHTS_FILE,
    PackedLayer,
    PackedModel,
    encode_layer,
    encode_tensor,
    metadata_bytes,
    read_packed,
)
from lightning_compress.formats.parity import ParityReport, check_parity
from lightning_compress.lora.inject import ADAPTER_PARAMETERS
from lightning_compress.quant.activations import DynamicTokenQuantizer, StaticRangeObserver, input_quantizer_of
from lightning_compress.quant.weights import quantized_weights

REPORT_FILE = "report.txt"
CONFIG_FILE = "config.json"
ONNX_FILE = "model.onnx"


@dataclass
class ExportReport:
    """What an export wrote: per-layer rows, sizes, and the parity figures."""

    directory: Path
    rows: List[List[Any]]
    float32_bytes: int
    file_bytes: int
    parity: Optional[ParityReport]
    compressed_tensors: bool
    notes: List[str] = field(default_factory=list)

    @property
    def compression_ratio(self) -> float:
        """float32 size of the weights over the size of ``model.safetensors``."""
        return self.float32_bytes / max(self.file_bytes, 1)

    def table(self) -> str:
        header = ["layer", "module", "params", "format", "sparsity", "bytes"]
        lines = [format_table(f"export {self.directory}", header, self.rows)]
        lines.append(
            f"model.safetensors: {self.file_bytes:,} bytes; float32: {self.float32_bytes:,} bytes"
            f" ({self.compression_ratio:.2f}x smaller)"
        )
        if self.parity is not None:
            lines.append("parity: " + self.parity.summary())
        lines.extend(self.notes)
        return "\n".join(lines)


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
            layers are all Linear/Embedding that transformers loads (not asymmetric
            group/channel weights: their packed zero points are for vLLM, written with ``True``).
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
        ParityError: the packed model (or ``model.onnx``) misses a threshold;
            ``err.report`` has the figures, ``err.directory`` is ``<out_dir>.failed-parity``
            (a folder of the system's temporary directory if that could not be written,
            ``None`` if nothing could; the message says why).
    """
    validate_export_options(backend, sparse_threshold, max_relative_error, min_sqnr_db, inputs, compressed_tensors)
    validate_export_formats(formats, inputs, tokenizer)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} already exists; pass overwrite=True to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory")
    refuse_stale(out_dir, overwrite)
    packing = pack(model, out_dir, sparse_threshold=sparse_threshold, compressed_tensors=compressed_tensors,
                   recipe=recipe, formats=formats, tokenizer=tokenizer)
    failure: Dict[str, Any] = {}

    def finish(directory: Path) -> Dict[str, bytes]:
        try:
            check_packing(model, packing, read_packed(directory) if parity else None, inputs, directory,
                          parity=parity, backend=backend, max_relative_error=max_relative_error,
                          min_sqnr_db=min_sqnr_db, formats=formats)
        except Exception as error:
            # The check's own files (model.onnx) are kept with the packed ones.
            written = {p.name: p.read_bytes() for p in directory.iterdir()
                       if p.is_file() and p.name not in packing.files}
            failure.update(error=error, files={**packing.files, **written})
            raise
        return {METADATA_FILE: metadata_bytes(packing.body), REPORT_FILE: (packing.report.table() + "\n").encode()}

    def write(directory: Path, replace: bool) -> None:
        try:
            atomic_write_directory(directory, packing.files, overwrite=replace, finish=finish)
        except Exception as error:
            if failure.get("error") is error:  # packed, but the check failed: keep the files beside it
                raise keep_failed(directory, failure["files"], packing.body, packing.report, error,
                                  overwrite=replace) from error
            raise

    try:
        write(out_dir, overwrite)
    except OSError as error:
        # Not written, nothing replaced: a full disk, permissions, another export holding the
        # lock (no waiting: the second of two concurrent exports fails at once), `out_dir`
        # appeared meanwhile. The packed model goes to the system's temporary directory.
        raise keep_elsewhere(out_dir, error, lambda folder: write(folder, False)) from error
    if overwrite:
        _remove_stale_failure(out_dir)
    return packing.report


@dataclass
class Packing:
    """A model packed in memory: the files to write, their metadata, the report, the
    quantized layers (for the ONNX export) and ``model.gguf`` planned (or ``None``)."""

    files: Dict[str, bytes]
    body: Dict[str, Any]
    report: ExportReport
    layers: Dict[str, PackedLayer]
    gguf: Any = None


def pack(model: nn.Module, out_dir: Path, *, sparse_threshold: Optional[float], compressed_tensors: Optional[bool],
         recipe: Optional[Mapping[str, Any]], dry: bool = False, formats: Sequence[str] = ("safetensors",),
         tokenizer: Any = None) -> Packing:
    """Encode ``model`` as the files of an export to ``out_dir``, in memory (``dry``: see
    :func:`collect`), and plan ``model.gguf`` with ``tokenizer`` when ``formats`` has ``"gguf"``.

    Raises:
        ExportError: NaN/Inf, overflowing scales, a dtype or layer the format cannot store
            (or a model, grid or tokenizer ``model.gguf`` cannot hold).
    """
    layers, tensors, aliases = collect(model, dry=dry)
    notes: List[str] = []
    use_ct = ct.decide(model, layers, compressed_tensors, notes)
    if use_ct:
        sparse_threshold = None
    stored: Dict[str, Tensor] = {}
    layer_meta, tensor_meta, rows = {}, {}, []
    for name, layer in layers.items():
        encoded, entry = encode_layer(name, layer, sparse_threshold, pack_8bit=use_ct and ct.packs_codes(layer))
        stored.update(encoded)
        layer_meta[name] = entry
        rows.append([name, layer.module, layer.weight.codes.numel(),
                     f"{layer.weight.spec.describe()} {entry['packing']}", _sparsity_text(entry), entry["bytes"]])
    for key, tensor in tensors.items():
        encoded, entry = encode_tensor(key, tensor, sparse_threshold)
        stored.update(encoded)
        tensor_meta[key] = entry
        if entry["sparsity"] != "dense":
            size = sum(t.numel() * t.element_size() for t in encoded.values())
            rows.append([key, "tensor", tensor.numel(), entry["dtype"], _sparsity_text(entry), size])
    weights = _safetensors_bytes(stored)
    body = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_versions": _versions(),
        "recipe": None if recipe is None else json.loads(json.dumps(recipe, default=str)),
        "layers": layer_meta,
        "tensors": tensor_meta,
        "aliases": aliases,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "compressed_tensors": use_ct,
    }
    float32_bytes = sum(layer.weight.codes.numel() * 4 for layer in layers.values())
    float32_bytes += sum(t.numel() * 4 if t.is_floating_point() else t.numel() * t.element_size()
                         for t in tensors.values())
    report = ExportReport(out_dir, rows, float32_bytes, len(weights), None, use_ct, notes)
    files = {WEIGHTS_FILE: weights, METADATA_FILE: metadata_bytes(body)}
    if use_ct:
        files[CONFIG_FILE] = ct.config_json(model, layers)
    return Packing(files, body, report, layers, plan_gguf(model, layers, tokenizer) if "gguf" in formats else None)


def check_packing(model: nn.Module, packing: Packing, packed: Optional[PackedModel], inputs, directory: Path, *,
                  parity: bool, backend: str, max_relative_error: float, min_sqnr_db: float, formats) -> None:
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

        body["onnx"] = export_and_check(model, packing.layers, list(inputs), directory / ONNX_FILE, max_relative_error,
                                        min_sqnr_db)
        report.notes.append(
            f"model.onnx: {len(body['onnx']['layers'])} integer layers, onnxruntime relative error"
            f" {body['onnx']['relative_error']:.2e}"
        )
    if "gguf" in formats:
        body["gguf"] = write_gguf(packing.gguf, model, packing.layers, directory)
        report.notes.append(summary_line(body["gguf"], packing.gguf.notes))


def _remove_stale_failure(out_dir: Path) -> None:
    failed = failed_path(out_dir)
    try:
        remove_directory(failed)
    except Exception as error:  # the export is written; a leftover must not fail it
        warnings.warn(f"{out_dir} is written, but the files an earlier failed export kept in {failed} could not be"
                      f" removed ({error}); remove them by hand", RuntimeWarning, stacklevel=3)


def collect(model: nn.Module, *, dry: bool = False):
    """The model as it computes now: quantized layers (codes + grid), every other
    state-dict tensor (transformed weights as their effective value, adapters merged),
    and aliases for tensors that share storage (tied weights). ``dry`` (a check before
    training): static int8 activations not calibrated yet are packed weight-only."""
    quantized = quantized_weights(model)
    modules = dict(model.named_modules())
    state = model.state_dict()
    layers: Dict[str, PackedLayer] = {}
    for name, q in quantized.items():  # by weight key: a recurrent layer has several
        module = _holder(modules, name)
        param = weight_param(name, module)
        source = weight_before(module, Stage.FAKE_QUANT, param).detach()
        _check_finite(name, source)
        if torch.isinf(q.scale).any() and not torch.isnan(q.scale).any():
            # Finite weights, infinite scales: the grid's float16/bfloat16 scales overflowed.
            raise ExportError(
                f"layer {name!r}: its weights are finite but their {q.spec.scale_dtype} scales overflow (largest"
                f" |weight| {float(source.abs().max()):.3g}); train with QuantizationAwareTraining(scale_dtype='float32'),"
                " or exclude the layer, and export again"
            )
        _check_finite(name, q.scale)
        layers[name] = PackedLayer(q, type(module).__name__, *_activations(name, module, dry), param)
    with torch.no_grad():
        for name, module in modules.items():
            if not is_transformed(module):
                continue
            prefix = f"{name}." if name else ""
            for extra in ADAPTER_PARAMETERS:
                state.pop(prefix + extra, None)
            for slot in weight_slots(module):
                state[prefix + slot] = getattr(module, slot).detach()
    for name, layer in layers.items():
        state.pop(parameter_key(name, layer.param), None)
    tensors: Dict[str, Tensor] = {}
    aliases: Dict[str, str] = {}
    seen: Dict[tuple, str] = {}
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for key, tensor in state.items():
        tensor = tensor.detach()
        if tensor.is_floating_point():  # a buffer may hold infinities (a causal mask of -inf), never NaN
            _check_finite(key, tensor, allow_infinite=key not in parameters)
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                    tuple(tensor.stride()), tensor.dtype) if tensor.numel() else None
        if identity is not None and identity in seen:
            aliases[key] = seen[identity]
            continue
        if identity is not None:
            seen[identity] = key
        tensors[key] = tensor.cpu()
    return layers, tensors, aliases


def _holder(modules: Dict[str, nn.Module], key: str) -> nn.Module:
    """The module holding the weight ``key`` (a layer's name, or ``<layer>.<param>`` of a
    recurrent layer's weight)."""
    if key in modules:
        return modules[key]
    return modules[key.rpartition(".")[0]]


def _activations(name: str, module: nn.Module, dry: bool = False):
    quantizer = input_quantizer_of(module)
    if isinstance(quantizer, DynamicTokenQuantizer):
        return "int8_dynamic", None
    if isinstance(quantizer, StaticRangeObserver):
        if quantizer.low is None and dry:  # calibrated by training; uncalibrated, it passes inputs through
            return None, None
        if quantizer.low is None:
            raise ExportError(
                f"layer {name!r} has static int8 activations that were never calibrated; train past QAT's"
                " start_step (the observers calibrate during training) before exporting"
            )
        scale, zero_point = quantizer.qparams()
        return "int8_static", (scale.detach().cpu(), zero_point.cpu())
    return None, None


def _check_finite(name: str, tensor: Tensor, allow_infinite: bool = False) -> None:
    bad = tensor.isnan() if allow_infinite else ~torch.isfinite(tensor)
    if tensor.is_floating_point() and bad.any():
        what = "NaN" if allow_infinite else "NaN/Inf"
        raise ExportError(f"{name!r} holds {int(bad.sum())} {what} value(s); nothing was exported. Fix the training run"
                          " (lower the learning rate, check the data) and export again")


def _sparsity_text(entry: Mapping[str, Any]) -> str:
    if entry["sparsity"] == "dense":
        return "dense"
    total = 1
    for dim in entry["shape"]:
        total *= dim
    return f"bitmask {1 - entry['kept'] / max(total, 1):.0%}"


def _safetensors_bytes(tensors: Mapping[str, Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})


def _versions() -> Dict[str, str]:
    versions = {"torch": torch.__version__}
    for package in ("lightning-compress", "lightning", "safetensors", "torchao"):
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            pass
    return versions
