"""``model.gguf``: the trained model for llama.cpp, in GGUF, from the exact QAT codes.

``export(..., formats=["safetensors", "gguf"])`` plans the file right after packing (so a
model or grid GGUF cannot hold is refused before anything is written, and before training
by the dry export), writes it into the export's temporary directory (so it appears
atomically with the other files) and reads it back with the ``gguf`` package: every
tensor, dequantized by ``gguf.quants.dequantize`` and put back in transformers' row order,
must equal the weight the model computes with (the QAT codes' ``s·(c − z)``, or the float
weight), bit for bit.

What is written: the architecture and tensors of :mod:`~lightning_compress.formats.gguf_arch`;
quantized layers as the block type of :mod:`~lightning_compress.formats.gguf_blocks`;
float layers in their own dtype (F32, F16 or BF16: exact), norms in F32; the vocabulary
of :mod:`~lightning_compress.formats.gguf_vocab`. A tied ``lm_head`` whose tensor equals
``token_embd`` is left out (llama.cpp then computes the output with ``token_embd``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch
from torch import nn

from lightning_compress.formats.errors import ExportError
from lightning_compress.formats.gguf_arch import Architecture, Entry, architecture, rotary_rows
from lightning_compress.formats.gguf_blocks import encode, gguf_type, q4_1_fallback_share
from lightning_compress.formats.gguf_vocab import Vocabulary, vocabulary, write_vocabulary
from lightning_compress.quant.fake_quant import dequantize_codes

GGUF_FILE = "model.gguf"
# llama.cpp's file types (general.file_type), by the type most weights are stored in
_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "BF16": 32}
_FLOAT_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@dataclass
class PlannedTensor:
    entry: Entry
    kind: str  # the GGUF type: Q4_0, Q4_1, Q5_0, Q8_0, F32, F16, BF16
    data: np.ndarray
    numel: int
    layer: Optional[str] = None  # the quantized layer (a key of the export's layers)


@dataclass
class GGUFPlan:
    """``model.gguf`` before it is written: the architecture, every tensor encoded, the
    vocabulary, and notes for the report."""

    arch: Architecture
    tensors: List[PlannedTensor]
    vocab: Vocabulary
    notes: List[str] = field(default_factory=list)


def require_gguf():
    """The ``gguf`` package.

    Raises:
        ExportError: it is not installed, with the command that installs it.
    """
    try:
        import gguf
    except ImportError:
        raise ExportError("formats=['gguf'] needs the `gguf` package: pip install 'lightning-compress[gguf]'") from None
    return gguf


def plan_gguf(model: nn.Module, layers: Mapping[str, Any], tokenizer: Any = None) -> GGUFPlan:
    """Encode ``model`` (its quantized ``layers``, as :func:`~lightning_compress.formats.export.collect`
    gives them) as GGUF tensors, in memory.

    Raises:
        ExportError: the model is not a supported architecture, the tokenizer does not
            fit, or some quantized layers have a grid no GGUF type holds exactly; the
            message names every such layer, grouped by reason, with the setting to train.
    """
    require_gguf()
    arch = architecture(model)
    planned: List[PlannedTensor] = []
    refused: Dict[str, List[str]] = {}
    notes = list(arch.notes)
    for entry in arch.entries:
        layer = layers.get(entry.module) if entry.param == "weight" else None
        rows = None
        if entry.heads is not None:
            rows = rotary_rows(model.get_submodule(entry.module).out_features, entry.heads)
        if layer is None:
            tensor = getattr(model.get_submodule(entry.module), entry.param).detach().cpu()
            tensor = tensor if rows is None else tensor[rows]
            kind = "F32" if entry.norm or tensor.dtype not in _FLOAT_TYPES else _FLOAT_TYPES[tensor.dtype]
            planned.append(PlannedTensor(entry, kind, _float_data(tensor, kind), tensor.numel()))
            continue
        kind, why = gguf_type(layer.weight.spec)
        if kind is None:
            refused.setdefault(why, []).append(entry.module)
            continue
        data, written = encode(layer.weight, kind, rows)
        if written != kind:
            notes.append(f"{entry.module}: Q5_0 instead of Q4_1 (float16 cannot hold the Q4_1 minimum of"
                         f" {q4_1_fallback_share(layer.weight):.0%} of its blocks; Q5_0 holds every block exactly)")
        if layer.activations is not None:
            notes.append(f"{entry.module}: trained with {layer.activations} activations, which llama.cpp does not"
                         " run (its quantized dot products round activations to 8 bits in blocks of 32)")
        planned.append(PlannedTensor(entry, written, data, layer.weight.codes.numel(), entry.module))
    if refused:
        count = sum(len(names) for names in refused.values())
        reasons = "; ".join(f"{why}: {names}" for why, names in refused.items())
        raise ExportError(
            f"formats=['gguf']: no GGUF type holds the QAT grid of {count} layer(s) exactly, and the export never"
            f" requantizes: {reasons}. Train those layers on a GGUF grid (the gguf_q4_0 / gguf_q8_0 recipes), exclude"
            " them from QAT (they are written in float), or drop 'gguf' from formats")
    by_name = {t.entry.name: t for t in planned}
    output, embedding = by_name.get("output.weight"), by_name["token_embd.weight"]
    if arch.tied and output.kind == embedding.kind and np.array_equal(output.data, embedding.data):
        planned.remove(output)
        notes.append("output.weight left out: lm_head is tied to the embedding and equals token_embd, which"
                     " llama.cpp then uses for the output")
    if any(layers[t.layer].weight.dtype != torch.float32 for t in planned if t.layer is not None):
        notes.append("the model computes in reduced precision: its fake-quant weights are the codes' values rounded"
                     " to that dtype, llama.cpp computes with the exact values (the GGUF check compares those)")
    return GGUFPlan(arch, planned, vocabulary(tokenizer, arch.vocab_size), notes)


def write_gguf(plan: GGUFPlan, model: nn.Module, layers: Mapping[str, Any], directory: Path) -> Dict[str, Any]:
    """Write ``plan`` to ``directory/model.gguf``, read it back with the ``gguf`` package and
    check every tensor against the model (see the module docs). Returns the summary stored
    in ``compression.json`` under ``"gguf"``.

    Raises:
        ExportError: a tensor read back differs from the weight the model computes with.
    """
    gguf = require_gguf()
    path = Path(directory) / GGUF_FILE
    writer = gguf.GGUFWriter(str(path), plan.arch.name)
    for key, (kind, value) in plan.arch.metadata.items():
        getattr(writer, f"add_{kind}")(key, value)
    weights = Counter()
    for tensor in plan.tensors:
        if not tensor.entry.norm and tensor.entry.param == "weight":
            weights[tensor.kind] += tensor.numel
    writer.add_file_type(_FILE_TYPES[weights.most_common(1)[0][0]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_vocabulary(writer, plan.vocab)
    for tensor in plan.tensors:
        raw = None if tensor.kind in ("F32", "F16") else gguf.GGMLQuantizationType[tensor.kind]
        writer.add_tensor(tensor.entry.name, tensor.data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    mismatched = check_gguf(path, plan, model, layers)
    if mismatched:
        raise ExportError(f"{GGUF_FILE} does not dequantize to the weights the model computes with in {mismatched}")
    return {
        "file": GGUF_FILE,
        "architecture": plan.arch.name,
        "bytes": path.stat().st_size,
        "tensors": {t.entry.name: t.kind for t in plan.tensors},
        "vocabulary": plan.vocab.source,
        "weights_exact": True,
    }


def check_gguf(path: Path, plan: GGUFPlan, model: nn.Module, layers: Mapping[str, Any]) -> List[str]:
    """The tensors of the GGUF file at ``path`` whose values, dequantized by the ``gguf``
    package and put back in transformers' row order, differ from the model's weight."""
    gguf = require_gguf()
    found = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    mismatched = []
    for tensor in plan.tensors:
        entry = tensor.entry
        if entry.name not in found:
            mismatched.append(entry.name)
            continue
        read = found[entry.name]
        values = torch.from_numpy(np.array(gguf.quants.dequantize(read.data, read.tensor_type), dtype=np.float32))
        if tensor.layer is not None:
            q = layers[tensor.layer].weight
            expected = dequantize_codes(q.codes, q.scale, q.zero_point, q.spec).cpu()
        else:
            expected = getattr(model.get_submodule(entry.module), entry.param).detach().cpu().float()
        if entry.heads is not None:
            expected = expected[rotary_rows(expected.shape[0], entry.heads)]
        if values.shape != expected.shape or not torch.equal(values, expected):
            mismatched.append(entry.name)
    return mismatched


def summary_line(summary: Mapping[str, Any], notes: List[str]) -> str:
    """The report's line for a written ``model.gguf``."""
    counts = Counter(summary["tensors"].values())
    kinds = ", ".join(f"{kind} {n}" for kind, n in counts.most_common())
    lines = [f"{GGUF_FILE}: llama.cpp {summary['architecture']}, {len(summary['tensors'])} tensors ({kinds}),"
             f" {summary['bytes']:,} bytes, vocabulary {summary['vocabulary']}; every tensor read back by the gguf"
             " package equals the trained weight exactly"]
    return "\n".join(lines + [f"  {note}" for note in notes])


def _float_data(tensor: torch.Tensor, kind: str) -> np.ndarray:
    if kind == "F32":
        return tensor.float().contiguous().numpy()
    if kind == "F16":
        return tensor.contiguous().numpy()
    return tensor.contiguous().view(torch.int16).numpy().view(np.uint8)  # BF16: raw bytes


__all__ = ["GGUF_FILE", "GGUFPlan", "check_gguf", "plan_gguf", "require_gguf", "summary_line", "write_gguf"]
