"""The vocabulary a GGUF file carries (``tokenizer.ggml.*``), from what the user passes as
``tokenizer``:

- ``None``: a byte-level vocabulary, id ``i`` the byte ``i`` for ``i < 256`` (a model
  trained on raw bytes), ids from 256 up ``<|extra_N|>`` control tokens, the first of them
  the BOS/EOS token. Written as llama.cpp's ``"gpt2"`` tokenizer with the ``"default"``
  pre-tokenizer and one merge that never applies (a newline followed by ``a``: no
  pre-tokenizer puts them in one piece), so llama.cpp maps each byte of a text to its id.
  Models with fewer than 256 ids need a ``tokenizer``.
- a list of strings, the token of each id (a character-level model: ``["\\n", " ", "!",
  ...]``): single-byte tokens map text bytes to ids as above; other tokens are control
  tokens (the first is BOS/EOS), which llama.cpp writes out but never reads from text.
- a ``transformers`` fast tokenizer, or the directory its ``save_pretrained`` wrote
  (read with ``AutoTokenizer.from_pretrained(dir, local_files_only=True)``; no remote
  code): a byte-level BPE (GPT-2, Llama 3, Qwen2) as ``"gpt2"`` with its merges and the
  pre-tokenizer llama.cpp names (``"gpt-2"``, ``"llama-bpe"``, ``"qwen2"``, recognised by
  the tokenizer's split pattern; another pattern is refused, since llama.cpp would split
  text differently), or a SentencePiece-style BPE with byte fallback (Llama 2, Mistral)
  as ``"llama"`` with scores from the merge order (earlier merges score higher, as
  llama.cpp's SentencePiece tokenizer ranks them). Special tokens, whether BOS/EOS are
  added (read from what the tokenizer does with ``"a"``) and the chat template come along.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from lightning_compress.formats.errors import ExportError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_NEVER_MERGED = "\u010a a"  # "\n" then "a": every pre-tokenizer splits a newline from a letter
# llama.cpp's name for the pre-tokenizer of a byte-level BPE, by the tokenizer.json split pattern.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {_LLAMA3: "llama-bpe", _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}"): "qwen2"}


@dataclass
class Vocabulary:
    """``tokenizer.ggml.*`` values; ``source`` says where they came from (for the report)."""

    model: str
    tokens: List[str]
    types: List[int]
    source: str
    scores: Optional[List[float]] = None
    merges: List[str] = field(default_factory=list)
    pre: Optional[str] = None
    special: Dict[str, int] = field(default_factory=dict)
    add: Dict[str, bool] = field(default_factory=dict)
    add_space_prefix: Optional[bool] = None
    chat_template: Optional[str] = None


def check_tokenizer(tokenizer: Any) -> None:
    """What :func:`vocabulary` accepts, checked before any work.

    Raises:
        ArgumentError: naming ``tokenizer``.
    """
    from lightning_compress.core.validate import ArgumentError

    if tokenizer is None or hasattr(tokenizer, "backend_tokenizer"):
        return
    if isinstance(tokenizer, (str, os.PathLike)):
        if not (Path(tokenizer) / "tokenizer.json").is_file():
            raise ArgumentError("tokenizer", f"`tokenizer` {str(tokenizer)!r} is not a directory holding a"
                                " tokenizer.json (what a transformers tokenizer's save_pretrained writes)")
        return
    if isinstance(tokenizer, Sequence) and tokenizer and all(isinstance(t, str) and t for t in tokenizer):
        return
    raise ArgumentError(
        "tokenizer", "`tokenizer` must be None (a byte-level vocabulary), a list of token strings (one per id),"
        " a transformers fast tokenizer or the directory it was saved to; got"
        f" {type(tokenizer).__name__}")


def vocabulary(tokenizer: Any, vocab_size: int) -> Vocabulary:
    """The vocabulary to write for a model with ``vocab_size`` ids (see the module docs).

    Raises:
        ExportError: the tokenizer does not fit the model, or llama.cpp has no tokenizer
            that splits text as it does.
    """
    check_tokenizer(tokenizer)
    if tokenizer is None:
        if vocab_size < 256:
            raise ExportError(
                f"the model has {vocab_size} token ids, too few for the byte-level vocabulary GGUF gets without a"
                " tokenizer (256); pass tokenizer=[...] (the token of each id) or a transformers tokenizer")
        return _listed([chr(i) for i in range(256)], vocab_size, "byte-level (id = byte)", raw_bytes=True)
    if isinstance(tokenizer, Sequence) and not isinstance(tokenizer, (str, os.PathLike)):
        if len(tokenizer) > vocab_size:
            raise ExportError(f"`tokenizer` lists {len(tokenizer)} tokens for a model with {vocab_size} ids")
        return _listed(list(tokenizer), vocab_size, f"the {len(tokenizer)} tokens given")
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True, trust_remote_code=False)
    return _from_transformers(tokenizer, vocab_size)


def write_vocabulary(writer, vocab: Vocabulary) -> None:
    """Add ``vocab``'s keys to a ``gguf.GGUFWriter``."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for kind, token_id in vocab.special.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    for kind, value in vocab.add.items():
        getattr(writer, f"add_add_{kind}_token")(value)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def _listed(tokens: List[str], vocab_size: int, source: str, raw_bytes: bool = False) -> Vocabulary:
    table = _byte_to_unicode()
    encoded, types = [], []
    for token in tokens:
        data = bytes([ord(token)]) if raw_bytes else token.encode("utf-8")
        encoded.append("".join(table[b] for b in data) if len(data) == 1 else token)
        types.append(NORMAL if len(data) == 1 else CONTROL)
    for extra in range(len(tokens), vocab_size):
        encoded.append(f"<|extra_{extra - len(tokens)}|>")
        types.append(CONTROL)
    vocab = Vocabulary("gpt2", encoded, types, source, merges=[_NEVER_MERGED], pre="default",
                       add={"bos": False, "eos": False})
    if CONTROL in types:
        first = types.index(CONTROL)
        vocab.special = {"bos": first, "eos": first}
    return vocab


def _from_transformers(tokenizer: Any, vocab_size: int) -> Vocabulary:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    kind = type(tokenizer).__name__
    if model.get("type") != "BPE":
        raise ExportError(f"tokenizer {kind}: a {model.get('type')} model; the GGUF export writes BPE tokenizers"
                          " (byte-level or with byte fallback) only")
    tokens: Dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {entry["id"]: entry for entry in spec.get("added_tokens") or []}
    tokens.update({i: entry["content"] for i, entry in added.items()})
    if max(tokens) >= vocab_size:
        raise ExportError(f"tokenizer {kind} has ids up to {max(tokens)}, the model only {vocab_size}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    special_ids = {i for i, entry in added.items() if entry.get("special")}
    text = [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [UNUSED if i not in tokens else CONTROL if i in special_ids else USER_DEFINED if i in added
             else NORMAL for i in range(vocab_size)]
    if model.get("byte_fallback"):
        made_by: Dict[str, int] = {}  # token -> the first merge that makes it
        for rank, merge in enumerate(merges):
            made_by.setdefault(merge.replace(" ", ""), rank)
        scores = [-1.0 - made_by.get(t, len(merges)) if types[i] == NORMAL else 0.0 for i, t in enumerate(text)]
        for i, token in enumerate(text):  # the byte-fallback pieces, wherever the tokenizer lists them
            if types[i] != UNUSED and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
                types[i] = BYTE
        if tokenizer.unk_token_id is not None:
            types[tokenizer.unk_token_id] = UNKNOWN
        vocab = Vocabulary("llama", text, types, f"{kind} (SentencePiece-style BPE)", scores=scores,
                           add_space_prefix=_prepends_space(spec))
    else:
        pre = _pre_tokenizer(spec)
        vocab = Vocabulary("gpt2", text, types, f"{kind} (byte-level BPE, pre-tokenizer {pre})", merges=merges,
                           pre=pre)
    for name in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            vocab.special[name] = int(token_id)
    ids = tokenizer("a")["input_ids"]
    vocab.add = {"bos": tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id],
                 "eos": tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id]}
    template = getattr(tokenizer, "chat_template", None)
    vocab.chat_template = template if isinstance(template, str) else None
    return vocab


def _pre_tokenizer(spec: Dict[str, Any]) -> str:
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        return "gpt-2"
    patterns = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    if len(patterns) == 1 and patterns[0] in _PRE_TOKENIZERS:
        return _PRE_TOKENIZERS[patterns[0]]
    raise ExportError(
        f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:300]}) is not one llama.cpp implements under a name this"
        " export knows (GPT-2's byte-level split, Llama 3's or Qwen2's pattern), so llama.cpp would split text"
        " differently; write the vocabulary with llama.cpp's convert_hf_to_gguf.py instead")


def _prepends_space(spec: Dict[str, Any]) -> bool:
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return '"Prepend"' in text or ('"Metaspace"' in text and '"never"' not in text)


def _byte_to_unicode() -> Dict[int, str]:
    """GPT-2's printable stand-in for each byte (what byte-level BPE vocabularies hold)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in kept:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


__all__ = ["Vocabulary", "check_tokenizer", "vocabulary", "write_vocabulary"]
