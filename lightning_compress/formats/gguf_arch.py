"""Which transformers models GGUF can hold, under which llama.cpp names and metadata.

``LlamaForCausalLM`` and ``MistralForCausalLM`` are llama.cpp's ``llama`` architecture,
``Qwen2ForCausalLM`` its ``qwen2``. Tensor names and metadata keys follow llama.cpp's
``convert_hf_to_gguf.py``; for ``llama`` the rows of ``q_proj`` and ``k_proj`` (weights
and biases) are permuted as it permutes them: transformers rotates the two halves of each
head (``x[i]`` with ``x[i + d/2]``), llama.cpp's ``llama`` rope rotates adjacent pairs
(``x[2i]`` with ``x[2i + 1]``), so row ``2i + t`` of a head in the file is its row
``t·d/2 + i`` in transformers (:func:`rotary_rows`). ``qwen2`` runs the halves rope
(llama.cpp's NEOX mode): no permutation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from lightning_compress.core.transforms import raw_weight
from lightning_compress.formats.errors import ExportError
from lightning_compress.lora.inject import ADAPTER_PARAMETERS

# transformers class -> (llama.cpp architecture, q/k rows permuted for its rope)
ARCHITECTURES = {"LlamaForCausalLM": ("llama", True), "MistralForCausalLM": ("llama", True),
                 "Qwen2ForCausalLM": ("qwen2", False)}
_ATTENTION = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
_MLP = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


@dataclass
class Entry:
    """One GGUF tensor: its name, the module and parameter it comes from, whether it is a
    norm (always F32), and the heads its rows are permuted over (q/k of ``llama``)."""

    name: str
    module: str
    param: str = "weight"
    norm: bool = False
    heads: Optional[int] = None


@dataclass
class Architecture:
    name: str
    entries: List[Entry]
    metadata: Dict[str, Tuple[str, Any]]  # key -> (kind, value): kind uint32, float32, string
    vocab_size: int
    tied: bool  # lm_head computes with the embedding's parameter
    notes: List[str] = field(default_factory=list)


def rotary_rows(rows: int, heads: int) -> torch.Tensor:
    """The transformers row of each GGUF row of a q/k projection with ``heads`` heads."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def architecture(model: nn.Module) -> Architecture:
    """Read ``model``'s architecture and config.

    Raises:
        ExportError: a model GGUF cannot hold, naming every reason (another class, a
            config llama.cpp would compute differently, parameters it has no tensor for).
    """
    kind = next((ARCHITECTURES[c.__name__] for c in type(model).__mro__ if c.__name__ in ARCHITECTURES), None)
    if kind is None:
        inner = [name for name, m in model.named_modules()
                 if any(c.__name__ in ARCHITECTURES for c in type(m).__mro__)]
        hint = (f"; export the transformers model itself: CompressedExport(module={inner[0]!r}) or"
                f" export(model.{inner[0]}, ...)") if inner else ""
        raise ExportError(
            f"formats=['gguf'] writes llama.cpp's llama/qwen2 architectures, from {sorted(ARCHITECTURES)};"
            f" got {type(model).__name__}{hint}")
    arch, permute = kind
    config = model.config
    problems = _config_problems(arch, config)
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    kv_heads = kv_heads or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    entries = [Entry("token_embd.weight", "model.embed_tokens"), Entry("output_norm.weight", "model.norm", norm=True)]
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}"
        for hf, gguf_name in _ATTENTION.items():
            rotary = {"q_proj": heads, "k_proj": kv_heads}.get(hf) if permute else None
            module = f"{prefix}.self_attn.{hf}"
            entries.append(Entry(f"blk.{i}.{gguf_name}.weight", module, heads=rotary))
            if getattr(model.get_submodule(module), "bias", None) is not None:
                entries.append(Entry(f"blk.{i}.{gguf_name}.bias", module, "bias", heads=rotary))
        entries += [Entry(f"blk.{i}.{g}.weight", f"{prefix}.mlp.{hf}") for hf, g in _MLP.items()]
        entries += [Entry(f"blk.{i}.{g}.weight", f"{prefix}.{hf}", norm=True) for hf, g in _NORMS.items()]
    tied = raw_weight(model.get_submodule("lm_head")) is raw_weight(model.get_submodule("model.embed_tokens"))
    entries.append(Entry("output.weight", "lm_head"))
    mapped = {f"{e.module}.{e.param}" for e in entries}
    unmapped = [name for name, _ in model.named_parameters(remove_duplicate=False)
                if name not in mapped and name.rpartition(".")[2] not in ADAPTER_PARAMETERS]
    if unmapped:
        problems.append(f"parameters llama.cpp's {arch} architecture has no tensor for: {unmapped[:8]}")
    if problems:
        raise ExportError(f"{type(model).__name__} cannot be written as GGUF ({arch}): " + "; ".join(problems))
    key = arch + "."
    metadata = {
        "general.name": ("string", getattr(config, "_name_or_path", "") or type(model).__name__),
        key + "vocab_size": ("uint32", config.vocab_size),
        key + "context_length": ("uint32", config.max_position_embeddings),
        key + "embedding_length": ("uint32", config.hidden_size),
        key + "block_count": ("uint32", config.num_hidden_layers),
        key + "feed_forward_length": ("uint32", config.intermediate_size),
        key + "attention.head_count": ("uint32", heads),
        key + "attention.head_count_kv": ("uint32", kv_heads),
        key + "rope.freq_base": ("float32", float(_rope(config)[1])),
        key + "rope.dimension_count": ("uint32", head_dim),
        key + "attention.layer_norm_rms_epsilon": ("float32", float(config.rms_norm_eps)),
    }
    if head_dim * heads != config.hidden_size:
        metadata[key + "attention.key_length"] = ("uint32", head_dim)
        metadata[key + "attention.value_length"] = ("uint32", head_dim)
    notes = []
    window = getattr(config, "sliding_window", None) if arch == "llama" else None
    if window is not None and window < config.max_position_embeddings:
        notes.append(f"sliding_window={window} is not written: llama.cpp's llama architecture attends to the whole"
                     f" context, which matches the model up to {window} tokens (llama.cpp's converter does the same)")
    return Architecture(arch, entries, metadata, config.vocab_size, tied, notes)


def _config_problems(arch: str, config: Any) -> List[str]:
    problems = []
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config.hidden_act!r} (llama.cpp's {arch} uses SiLU)")
    rope_type = _rope(config)[0]
    if rope_type != "default":
        problems.append(f"rope type {rope_type!r} (only the default rope is written; scaled ropes are not)")
    if getattr(config, "mlp_bias", False):
        problems.append("mlp_bias=True (llama.cpp's feed-forward has no biases here)")
    if arch == "qwen2" and getattr(config, "use_sliding_window", False):
        problems.append("use_sliding_window=True (not written)")
    return problems


def _rope(config: Any) -> Tuple[str, float]:
    """(rope type, theta): transformers 5 keeps them in ``rope_parameters``, 4 in
    ``rope_scaling`` and ``rope_theta``."""
    parameters = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in parameters:
        parameters = parameters["full_attention"]
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = parameters.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    theta = parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return rope_type, theta


__all__ = ["ARCHITECTURES", "Architecture", "Entry", "architecture", "rotary_rows"]
