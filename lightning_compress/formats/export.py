"""``export``: the model a training run produced → a packed directory, checked for parity."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_compress.core.atomic import DirectoryLockedError, InterruptedWriteError, atomic_write_directory
from lightning_compress.core.reporting import format_table
from lightning_compress.core.transforms import Stage, is_transformed, weight_before, weight_slots
from lightning_compress.core.validate import ArgumentError, check_choice, check_number
from lightning_compress.formats import compressed_tensors as ct
from lightning_compress.formats.errors import ExportError, ParityError
from lightning_compress.formats.packed import (
    FORMAT_NAME,
    FORMAT_VERSION,
    METADATA_FILE,
    WEIGHTS_FILE,
    PackedLayer,
    encode_layer,
    encode_tensor,
    metadata_bytes,
    read_packed,
)
from lightning_compress.formats.parity import ParityReport, check_parity
from lightning_compress.formats.runtime import BACKENDS
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
) -> ExportReport:
    """Pack ``model`` (as its compression callbacks left it) into ``out_dir``.

    Quantized layers are stored as their exact integer codes (int8, or densely packed
    sub-8-bit), pruned tensors as a bitmask plus the kept values when that is smaller,
    everything else as it is. LoRA adapters are merged on the way (the effective weight
    is what is stored). The parity check then reads the files back and compares them with
    the model; on failure nothing is written.

    Args:
        model: the trained module (a LightningModule or any ``nn.Module``).
        out_dir: the directory to create.
        inputs: batches for the output parity check; each a tensor (``model(x)``), a
            tuple (``model(*x)``) or a dict (``model(**x)``). Without them only the
            weights are checked.
        overwrite: replace an existing ``out_dir`` (only once the new one is complete; a
            crash at any instant leaves the old directory or the new one, see
            :mod:`lightning_compress.core.atomic`).
        parity: run the parity check (default on).
        max_relative_error: threshold of the exact (dequantize) path's output error.
        min_sqnr_db: threshold of the int8-GEMM path's output SQNR, in dB.
        backend: the loader backend the parity check measures (see :func:`load_packed`).
        sparse_threshold: tensors at least this sparse are stored as bitmask + values
            when that is smaller; ``None`` stores everything dense.
        compressed_tensors: write ``config.json`` with a compressed-tensors
            ``quantization_config`` so ``transformers`` can load the directory (bitmask
            storage is then off). ``None``: on when ``model`` is a ``transformers``
            model whose quantized layers are all Linear/Embedding.
        recipe: the recipe that produced the model, stored in the metadata.
        formats: ``("safetensors",)``, or with ``"onnx"`` also ``model.onnx``: int4
            Linear layers as onnxruntime's ``MatMulNBits``, int8 as QDQ (see
            :mod:`lightning_compress.formats.onnx`); other layers stay float
            there. It is traced with ``inputs[0]`` (a tensor or tuple) and checked by
            running it in onnxruntime against the fake-quant model.

    Raises:
        ExportError: NaN/Inf in a weight (naming the layer), ``out_dir`` exists (or
            appeared during the export) without ``overwrite``, another process is
            exporting to ``out_dir`` (the message names its lock file and pid; this one
            does not wait), or an option does not fit the model.
        ParityError: the packed model misses a threshold; ``err.report`` has the figures.
    """
    validate_export_options(backend, sparse_threshold, max_relative_error, min_sqnr_db, inputs, compressed_tensors)
    validate_export_formats(formats, inputs)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} already exists; pass overwrite=True to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory")
    layers, tensors, aliases = collect(model)
    notes: List[str] = []
    use_ct = _decide_compressed_tensors(model, layers, compressed_tensors, notes)
    if use_ct:
        sparse_threshold = None
    stored: Dict[str, Tensor] = {}
    layer_meta, tensor_meta, rows = {}, {}, []
    for name, layer in layers.items():
        encoded, entry = encode_layer(name, layer, sparse_threshold)
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

    def finish(directory: Path) -> Dict[str, bytes]:
        if parity:
            packed = read_packed(directory)
            report.parity = check_parity(
                model, packed, list(inputs or []), backend=backend,
                max_relative_error=max_relative_error, min_sqnr_db=min_sqnr_db,
            )
            if not report.parity.passed:
                raise ParityError(f"parity check failed, nothing was written: {report.parity.summary()}", report.parity)
            body["parity"] = report.parity.as_dict()
        if "onnx" in formats:
            body["onnx"] = _export_onnx(model, layers, list(inputs), directory, max_relative_error)
            report.notes.append(
                f"model.onnx: {len(body['onnx']['layers'])} integer layers, onnxruntime relative error"
                f" {body['onnx']['relative_error']:.2e}"
            )
        return {METADATA_FILE: metadata_bytes(body), REPORT_FILE: (report.table() + "\n").encode()}

    try:
        atomic_write_directory(out_dir, files, overwrite=overwrite, finish=finish)
    except (FileExistsError, NotADirectoryError, DirectoryLockedError, InterruptedWriteError) as error:
        # Refused before anything was replaced: another export holds the lock (no waiting:
        # the second of two concurrent exports fails at once), or `out_dir` appeared meanwhile.
        raise ExportError(str(error)) from error
    return report


def _export_onnx(model, layers, inputs, directory: Path, max_relative_error: float) -> Dict[str, Any]:
    from lightning_compress.formats.onnx import export_onnx, run_onnx
    from lightning_compress.formats.parity import eval_mode, flatten_outputs, quantization_enabled, relative_error

    example = inputs[0] if isinstance(inputs[0], tuple) else (inputs[0],)
    linear = {name: layer.weight for name, layer in layers.items()
              if layer.module == "Linear" and layer.weight.spec.bits in (4, 8)}
    with quantization_enabled(model), eval_mode(model), torch.no_grad():
        onnx_report = export_onnx(model, example, directory / ONNX_FILE, linear)
        reference = flatten_outputs(model(*example))
    got = torch.cat([torch.from_numpy(a).reshape(-1).float() for a in run_onnx(directory / ONNX_FILE, example)])
    error = relative_error(reference, got)
    if error > max_relative_error:
        raise ParityError(f"model.onnx in onnxruntime differs from the fake-quant model: relative error {error:.2e}"
                          f" > {max_relative_error:g}", None)
    return {"layers": onnx_report.layers, "relative_error": error, "bytes": onnx_report.file_bytes}


def validate_export_formats(formats, inputs) -> None:
    """Check :func:`export`'s ``formats`` and that ``inputs`` can trace an ONNX export
    (pass ``[None]`` for inputs that will exist by export time).

    Raises:
        ArgumentError: a ``ValueError`` naming ``formats`` or ``inputs``.
    """
    known = ("safetensors", "onnx")
    if isinstance(formats, str) or not isinstance(formats, Sequence) or not all(f in known for f in formats if isinstance(f, str)) \
            or not all(isinstance(f, str) for f in formats):
        raise ArgumentError("formats", f"`formats` must be a list from ['safetensors', 'onnx'], got {formats!r}")
    if "safetensors" not in formats:
        raise ArgumentError("formats", "`formats` must include 'safetensors' (the loader and the parity check read it)")
    if "onnx" in formats and (not inputs or isinstance(inputs[0], Mapping)):
        raise ArgumentError(
            "inputs", "formats=['onnx'] traces the model with `inputs[0]`: pass `inputs` with a tensor or tuple"
        )


def collect(model: nn.Module):
    """The model as it computes now: quantized layers (codes + grid), every other
    state-dict tensor (transformed weights as their effective value, adapters merged),
    and aliases for tensors that share storage (tied weights)."""
    quantized = quantized_weights(model)
    modules = dict(model.named_modules())
    state = model.state_dict()
    layers: Dict[str, PackedLayer] = {}
    for name, q in quantized.items():
        module = modules[name]
        source = weight_before(module, Stage.FAKE_QUANT).detach()
        _check_finite(name, source)
        if torch.isinf(q.scale).any() and not torch.isnan(q.scale).any():
            # Finite weights, infinite scales: the grid's float16/bfloat16 scales overflowed.
            raise ExportError(
                f"layer {name!r}: its weights are finite but their {q.spec.scale_dtype} scales overflow (largest"
                f" |weight| {float(source.abs().max()):.3g}); train with QuantizationAwareTraining(scale_dtype='float32'),"
                " or exclude the layer, and export again"
            )
        _check_finite(name, q.scale)
        layers[name] = PackedLayer(q, type(module).__name__, *_activations(name, module))
    with torch.no_grad():
        for name, module in modules.items():
            if not is_transformed(module):
                continue
            prefix = f"{name}." if name else ""
            for extra in ADAPTER_PARAMETERS:
                state.pop(prefix + extra, None)
            for slot in weight_slots(module):
                state[prefix + slot] = getattr(module, slot).detach()
    for name in layers:
        state.pop(f"{name}.weight" if name else "weight", None)
    tensors: Dict[str, Tensor] = {}
    aliases: Dict[str, str] = {}
    seen: Dict[tuple, str] = {}
    for key, tensor in state.items():
        tensor = tensor.detach()
        if tensor.is_floating_point():
            _check_finite(key, tensor)
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                    tuple(tensor.stride()), tensor.dtype) if tensor.numel() else None
        if identity is not None and identity in seen:
            aliases[key] = seen[identity]
            continue
        if identity is not None:
            seen[identity] = key
        tensors[key] = tensor.cpu()
    return layers, tensors, aliases


def _activations(name: str, module: nn.Module):
    quantizer = input_quantizer_of(module)
    if isinstance(quantizer, DynamicTokenQuantizer):
        return "int8_dynamic", None
    if isinstance(quantizer, StaticRangeObserver):
        if quantizer.low is None:
            raise ExportError(
                f"layer {name!r} has static int8 activations that were never calibrated; train past QAT's"
                " start_step (the observers calibrate during training) before exporting"
            )
        scale, zero_point = quantizer.qparams()
        return "int8_static", (scale.detach().cpu(), zero_point.cpu())
    return None, None


def _check_finite(name: str, tensor: Tensor) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        count = int((~torch.isfinite(tensor)).sum())
        raise ExportError(f"{name!r} holds {count} NaN/Inf value(s); nothing was exported. Fix the training run"
                          " (lower the learning rate, check the data) and export again")


def _decide_compressed_tensors(model, layers, requested, notes) -> bool:
    is_hf = ct.is_transformers_model(model)
    problems = ct.incompatibilities(layers)
    if requested is None:
        if is_hf and problems:
            notes.append(f"compressed-tensors config not written: {next(iter(problems.values()))}")
        return is_hf and not problems
    if requested and not is_hf:
        raise ExportError(
            f"compressed_tensors=True needs a transformers model (it writes its config.json), got"
            f" {type(model).__name__}; export its transformers submodule, e.g. export(module.model, ...)"
        )
    if requested and problems:
        name, reason = next(iter(problems.items()))
        raise ExportError(f"compressed_tensors=True cannot store layer {name!r}: {reason}; pass compressed_tensors=False")
    return bool(requested)


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


def validate_export_options(
    backend, sparse_threshold, max_relative_error, min_sqnr_db, inputs, compressed_tensors
) -> None:
    """Check the options of :func:`export` (``inputs=None`` skips that one), so a caller
    that exports later (``CompressedExport``) can refuse them before training.

    Raises:
        ArgumentError: a ``ValueError`` naming the bad argument (its ``argument``).
    """
    check_choice("backend", backend, BACKENDS)
    if sparse_threshold is not None:
        check_number("sparse_threshold", sparse_threshold, low=0.0, high=1.0, what="a fraction in [0, 1] or None")
    check_number("max_relative_error", max_relative_error, low=0.0, what="a number >= 0")
    check_number("min_sqnr_db", min_sqnr_db, what="a number (dB)")
    if inputs is not None and (isinstance(inputs, (Tensor, Mapping)) or not isinstance(inputs, Sequence)):
        raise ArgumentError("inputs", "`inputs` must be a list of batches (e.g. [x1, x2]), not a single tensor or dict")
    if compressed_tensors is not None and not isinstance(compressed_tensors, bool):
        raise ArgumentError(
            "compressed_tensors", f"`compressed_tensors` must be True, False or None, got {compressed_tensors!r}"
        )
