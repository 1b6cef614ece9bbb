"""The default ``input_fn``: a dataloader batch -> the inputs of the exported module.

The export's parity check and its ONNX trace call the module with these inputs (a
tuple positionally, a dict as keyword arguments, anything else as the one input, see
:func:`lightning_compress.formats.parity.call_model`). :func:`batch_inputs` reads the
module's ``forward`` signature to decide what of the batch they are:

- a dict (``{"input_ids", "attention_mask", "labels"}`` for a transformers model): the
  entries ``forward`` takes, label keys left out, as keyword arguments; positionally in
  the forward's order when they are exactly its leading parameters, so an ONNX export
  can trace them. A ``forward`` whose one required parameter is named ``batch`` or
  annotated as a dict, and that the dict does not name, gets the dict itself;
- a tuple or list: as many leading elements as ``forward`` requires positional inputs,
  at least one: ``(x, y)`` -> ``x``, ``(x1, x2, y)`` for ``forward(x1, x2)`` ->
  ``(x1, x2)``, and ``((x1, x2), y)`` or ``({...}, y)`` -> the first element. Optional
  inputs (with defaults) are not passed; a batch of exactly as many elements as the
  forward requires is all inputs;
- anything else (a tensor): the one input.

A batch it cannot read raises an :class:`~lightning_compress.core.validate.ArgumentError`
naming ``input_fn`` and saying what to pass.
"""

from __future__ import annotations

import inspect
from typing import Any, List, Mapping, Optional, Sequence

from torch import nn

from lightning_compress.core.validate import ArgumentError

LABEL_KEYS = ("labels", "label", "target", "targets", "y")
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def batch_inputs(batch: Any, module: nn.Module) -> Any:
    """The inputs of ``module`` in ``batch`` (see the module docstring).

    Raises:
        ArgumentError: (naming ``input_fn``) the batch holds fewer inputs than
            ``module.forward`` requires, or a dict batch lacks some of them; the message
            gives an ``input_fn`` to pass instead.
    """
    signature = _forward_signature(module)
    if isinstance(batch, Mapping):
        return _from_mapping(batch, signature, module)
    if isinstance(batch, (tuple, list)):
        return _from_sequence(batch, signature, module)
    return batch


def _forward_signature(module: nn.Module) -> Optional[inspect.Signature]:
    try:
        return inspect.signature(module.forward)
    except (TypeError, ValueError):  # a builtin or C forward: nothing to read
        return None


def _required(signature: Optional[inspect.Signature]) -> List[str]:
    """The forward's positional parameters without a default."""
    if signature is None:
        return []
    return [p.name for p in signature.parameters.values() if p.kind in _POSITIONAL and p.default is p.empty]


def _from_sequence(batch: Sequence[Any], signature: Optional[inspect.Signature], module: nn.Module) -> Any:
    required = _required(signature)
    first = batch[0] if len(batch) else None
    if len(required) <= 1 and len(batch):
        if isinstance(first, Mapping):  # ({...}, y): the dict is the inputs, or the one input
            return _from_mapping(first, signature, module)
        return first  # x of (x, y)
    if isinstance(first, Mapping):
        return _from_mapping(first, signature, module)
    if isinstance(first, (tuple, list)) and len(first) >= len(required):  # ((x1, x2), y)
        return tuple(first[: len(required)])
    if len(batch) < len(required):
        raise ArgumentError(
            "input_fn",
            f"{_describe(module)} requires {len(required)} input{'s' if len(required) > 1 else ''}"
            f" ({', '.join(required)}), but the batch"
            f" is a {type(batch).__name__} of {len(batch)}, so the default input_fn cannot tell which of its"
            f" elements they are. Pass `input_fn`: a function from a batch to the inputs (a tuple is passed"
            f" positionally, a dict as keyword arguments), e.g."
            f" input_fn={_example([f'batch[{i}]' for i in range(len(batch))], len(required))} with the right"
            " elements; in a recipe: export.input_fn, a dotted path to such a function",
        )
    return tuple(batch[: len(required)])


def _from_mapping(batch: Mapping[str, Any], signature: Optional[inspect.Signature], module: nn.Module) -> Any:
    kept = {key: value for key, value in batch.items() if key not in LABEL_KEYS}
    if signature is None:
        return kept
    parameters = signature.parameters
    named = {key: value for key, value in kept.items() if key in parameters}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        kept = named
    required = _required(signature)
    missing = [name for name in required if name not in kept]
    if missing and len(required) == 1 and not named and _takes_the_dict(parameters[required[0]]):
        return (batch,)  # forward(self, batch): the dict is the one input
    if missing:
        keys = [key for key in batch if key not in LABEL_KEYS]
        raise ArgumentError(
            "input_fn",
            f"{_describe(module)} requires {', '.join(required)}, but the batch is a dict with keys"
            f" {list(batch)}, without {', '.join(missing)}. Pass `input_fn`: a function from a batch to the"
            f" inputs (a tuple is passed positionally, a dict as keyword arguments), e.g."
            f" input_fn={_example([f'batch[{key!r}]' for key in keys], len(required))} with the right keys"
            f"{' (or input_fn=lambda batch: (batch,) to pass the whole dict)' if len(required) == 1 else ''};"
            " in a recipe: export.input_fn, a dotted path to such a function",
        )
    leading = [name for name, p in parameters.items() if p.kind in _POSITIONAL][: len(kept)]
    if kept and set(leading) == set(kept):
        return tuple(kept[name] for name in leading)  # positionally: an ONNX export traces a tuple
    return kept


def _takes_the_dict(parameter: inspect.Parameter) -> bool:
    """Whether a forward's one parameter is meant for a whole dict batch: named ``batch``
    or annotated as a dict."""
    annotation = parameter.annotation
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    return parameter.name == "batch" or text.split("[")[0] in ("dict", "Dict", "Mapping")


def _example(elements: List[str], count: int) -> str:
    """``lambda batch: ...`` returning ``count`` of ``elements`` (``...`` where short)."""
    chosen = (elements + ["..."] * count)[:count]
    return f"lambda batch: {chosen[0]}" if count == 1 else f"lambda batch: ({', '.join(chosen)})"


def _describe(module: nn.Module) -> str:
    return f"{type(module).__name__}.forward"


__all__ = ["LABEL_KEYS", "batch_inputs"]
