"""The default ``input_fn``: a dataloader batch -> the inputs of the exported module.

The export's parity check and its ONNX trace call the module with these inputs (a
tuple positionally, a dict as keyword arguments, anything else as the one input, see
:func:`lightning_compress.formats.parity.call_model`). :func:`batch_inputs` reads the
module's ``forward`` signature to decide what of the batch they are:

- a dict (``{"input_ids", "attention_mask", "labels"}`` for a transformers model): the
  entries ``forward`` takes, label keys left out, as keyword arguments; positionally in
  the forward's order when they are positional parameters of it and those between them
  default to None (passed as None: GPT-2's ``(input_ids, None, attention_mask)``), so an
  ONNX export can trace them. A ``forward`` whose one required parameter is named ``batch`` or
  annotated as a dict, and that the dict does not name, gets the dict itself;
- a tuple or list: as many leading elements as ``forward`` requires positional inputs,
  at least one: ``(x, y)`` -> ``x``, ``(x1, x2, y)`` for ``forward(x1, x2)`` ->
  ``(x1, x2)``, and ``((x1, x2), y)`` or ``({...}, y)`` -> the first element: its
  elements as the inputs (``forward(x1, x2)``, ``forward(x, mask=None)``), or the tuple
  whole when ``forward`` takes one argument and not its elements (``forward(pair)``).
  Optional inputs (with defaults) are not passed; a batch of exactly as many elements
  as the forward requires is all inputs;
- a ``PackedSequence`` (a NamedTuple of four tensors, as the batch or its first
  element) is one input, passed whole, never split into its fields;
- anything else (a tensor): the one input.

A batch it cannot read raises an :class:`~lightning_compress.core.validate.ArgumentError`
naming ``input_fn`` and saying what to pass. ``CompressedExport`` also asks
:func:`inputs_mismatch` whether the inputs (the default's, or those of the user's
``input_fn``) bind to ``forward``'s signature before calling it, and for a ``forward``
taking ``*args`` (whose inputs the default can only guess) turns a ``TypeError`` raised
inside it into that ``ArgumentError`` too (:func:`guessed_inputs_error`).
"""

from __future__ import annotations

import inspect
import traceback
from typing import Any, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

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
    if isinstance(batch, PackedSequence):  # a NamedTuple of tensors: one input, never its fields
        return (batch,)
    if isinstance(batch, Mapping):
        return _from_mapping(batch, signature, module)
    if isinstance(batch, (tuple, list)):
        return _from_sequence(batch, signature, module)
    return batch


def inputs_mismatch(module: nn.Module, inputs: Any) -> Optional[str]:
    """Why ``module.forward`` cannot be called with ``inputs`` as the export passes them
    (a tuple or list positionally, a dict as keyword arguments, anything else as the one
    input): the ``TypeError`` of binding them to its signature; ``None`` when they bind
    or the signature cannot be read."""
    signature = _forward_signature(module)
    if signature is None:
        return None
    try:
        if isinstance(inputs, Mapping):
            signature.bind(**inputs)
        elif isinstance(inputs, (tuple, list)):
            signature.bind(*inputs)
        else:
            signature.bind(inputs)
    except TypeError as error:
        return str(error)
    return None


def mismatch_error(module: nn.Module, batch: Any, inputs: Any, problem: str, *, default: bool) -> ArgumentError:
    """The error for ``inputs`` (made from ``batch`` by the default ``input_fn`` or, without
    ``default``, the user's) that ``module.forward`` cannot take (``problem``: see
    :func:`inputs_mismatch`)."""
    who = "the default input_fn" if default else "input_fn"
    return ArgumentError(
        "input_fn",
        f"{who} made {_describe_call(inputs)} from the batch {_structure(batch)}, but {_describe(module)}"
        f"{_forward_signature(module)} cannot take them ({problem}). Pass `input_fn`: a function from a batch to the"
        f" inputs (a tuple is passed positionally, a dict as keyword arguments), e.g."
        f" input_fn={_suggestion(module, batch)}; in a recipe: export.input_fn, a dotted path to such a function",
    )


def missing_forward_error(module: nn.Module, path: Optional[str] = None, *, parity: bool = True,
                          onnx: bool = False) -> Optional[ArgumentError]:
    """The error for an export target (``path``: its attribute path in the LightningModule,
    ``None`` for the module itself) whose class defines no ``forward``, when the export
    runs it (``parity``, ``onnx``). ``None`` when it has one or is not run."""
    if _computes(module) or not (parity or onnx):
        return None
    prefix = f"{path}." if path else ""
    computing = [prefix + name for name, child in module.named_children() if _computes(child)]
    where = f"the submodule {path!r}" if path else type(module).__name__
    why = " (it computes in training_step alone)" if not path else ""
    uses = " and ".join(use for use, on in (("to check the packed copy against it (parity)", parity),
                                           ("to trace the ONNX graph", onnx)) if on)
    fixes = [f"add a forward to {type(module).__name__}"]
    if computing:
        fixes.append(f"export a submodule that computes: CompressedExport(module={computing[0]!r}) (in a recipe:"
                     f" export.module: {computing[0]})")
    if parity and not onnx:
        fixes.append("pass parity=False (export.parity: false) to export without the check")
    return ArgumentError(
        "module",
        f"{where} has no forward{why}, and the export runs the model on a few inputs {uses}: {'; or '.join(fixes)}",
    )


def _computes(module: nn.Module) -> bool:
    """Whether ``module``'s class defines a ``forward`` (``nn.Module``'s and
    ``LightningModule``'s own only raise that there is none)."""
    forward = type(module).forward
    return forward is not nn.Module.forward and getattr(forward, "__qualname__", "") != "LightningModule.forward"


def model_call_note(module: nn.Module, inputs: Any, index: int) -> str:
    """The note added to an error ``module`` raised on the export's ``inputs[index]``: how
    ``forward`` bound them, and that the export runs the model on them."""
    signature = _forward_signature(module)
    bound = None
    if signature is not None:
        try:
            bound = (signature.bind_partial(**inputs) if isinstance(inputs, Mapping) else signature.bind_partial(
                *(inputs if isinstance(inputs, (tuple, list)) else (inputs,)))).arguments
        except TypeError:
            pass
    binding = "" if bound is None else f" as {', '.join(f'{k}={_structure(v)}' for k, v in bound.items())}"
    return (f"{_describe(module)} raised this on the export's inputs[{index}]{binding}. The export checks the packed"
            " model on these inputs (CompressedExport: what `input_fn` returns); if they are not what forward takes,"
            " pass inputs it takes, positionally in its order with None for the parameters between them, or as"
            " keywords")


def guessed_inputs_error(error: TypeError, module: nn.Module, batch: Any, inputs: Any) -> Optional[ArgumentError]:
    """For a ``forward`` taking ``*args``, whose inputs the default ``input_fn`` can only
    guess (any number of them binds): the error to raise for a ``TypeError`` raised
    inside that forward when called with the default's ``inputs``; ``None`` for any other
    forward or error (a forward with a readable signature gets the inputs it takes, so a
    ``TypeError`` inside it is its own)."""
    signature = _forward_signature(module)
    if signature is None or not any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in signature.parameters.values()):
        return None
    code = getattr(getattr(module.forward, "__func__", None), "__code__", None)
    if code is None or not any(frame.f_code is code for frame, _ in traceback.walk_tb(error.__traceback__)):
        return None
    count = len(batch) - 1 if isinstance(batch, (tuple, list)) and len(batch) > 1 else 1
    elements = [f"batch[{i}]" for i in range(count)] if isinstance(batch, (tuple, list)) else ["batch"]
    return ArgumentError(
        "input_fn",
        f"{_describe(module)}{signature} takes *args, so the default input_fn cannot tell which of the batch's"
        f" elements are its inputs: it passed {_describe_call(inputs)} from the batch {_structure(batch)}, and the"
        f" forward raised TypeError: {error}. If it takes other inputs, pass `input_fn`: a function from a batch"
        f" to the inputs (a tuple is passed positionally), e.g. input_fn={_example(elements, count, whole=True)};"
        " in a recipe: export.input_fn, a dotted path to such a function",
    )


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
        if isinstance(first, PackedSequence) or (_is_sequence(first) and _takes_whole(signature, first)):
            return (first,)  # forward(pair) of ((x1, x2), y): the tuple is the one input
        return first  # x of (x, y); (x1, x2) of ((x1, x2), y) for forward(x1, x2=None)
    if isinstance(first, Mapping):
        return _from_mapping(first, signature, module)
    if _is_sequence(first) and len(first) >= len(required):  # ((x1, x2), y)
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
    positional = [name for name, p in parameters.items() if p.kind in _POSITIONAL]
    if kept and set(kept) <= set(positional):
        # Positionally, so an ONNX export can trace them: in forward's order, None for the
        # parameters between them that default to None (GPT-2 takes past_key_values before
        # attention_mask; dropping the mask instead would export a graph without it).
        upto = positional[: 1 + max(positional.index(name) for name in kept)]
        if all(name in kept or parameters[name].default is None for name in upto):
            return tuple(kept.get(name) for name in upto)
    return kept


def _is_sequence(value: Any) -> bool:
    """A tuple or list of inputs: not a ``PackedSequence``, which is one input."""
    return isinstance(value, (tuple, list)) and not isinstance(value, PackedSequence)


def _binds(signature: inspect.Signature, *args: Any) -> bool:
    try:
        signature.bind(*args)
    except TypeError:
        return False
    return True


def _takes_whole(signature: Optional[inspect.Signature], value: Sequence[Any]) -> bool:
    """Whether ``forward`` takes ``value`` as one argument and not its elements."""
    return signature is not None and not _binds(signature, *value) and _binds(signature, value)


def _takes_the_dict(parameter: inspect.Parameter) -> bool:
    """Whether a forward's one parameter is meant for a whole dict batch: named ``batch``
    or annotated as a dict."""
    annotation = parameter.annotation
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    return parameter.name == "batch" or text.split("[")[0] in ("dict", "Dict", "Mapping")


def _example(elements: List[str], count: int, whole: bool = False) -> str:
    """``lambda batch: ...`` returning ``count`` of ``elements`` (``...`` where short);
    ``whole``: one element in a 1-tuple, so that a tuple element is passed as it is."""
    chosen = (elements + ["..."] * count)[:count]
    if count == 1:
        return f"lambda batch: ({chosen[0]},)" if whole else f"lambda batch: {chosen[0]}"
    return f"lambda batch: ({', '.join(chosen)})"


def _suggestion(module: nn.Module, batch: Any) -> str:
    """An ``input_fn`` giving ``forward`` its required arguments from ``batch``'s leading
    elements (or non-label keys): positionally, or by name when some are keyword-only."""
    signature = _forward_signature(module)
    parameters = [] if signature is None else list(signature.parameters.values())
    names = [p.name for p in parameters if p.default is p.empty and p.kind in (*_POSITIONAL, p.KEYWORD_ONLY)]
    if isinstance(batch, Mapping):
        elements = [f"batch[{key!r}]" for key in batch if key not in LABEL_KEYS]
    elif isinstance(batch, (tuple, list)) and not isinstance(batch, PackedSequence):
        elements = [f"batch[{i}]" for i in range(len(batch))]
    else:
        elements = ["batch"]
    count = max(len(names), 1)
    if any(p.kind is p.KEYWORD_ONLY and p.default is p.empty for p in parameters):
        chosen = (elements + ["..."] * count)[:count]
        return "lambda batch: {" + ", ".join(f"{name!r}: {value}" for name, value in zip(names, chosen)) + "}"
    return _example(elements, count, whole=True)


def _structure(value: Any, depth: int = 0) -> str:
    """A short picture of a batch: ``((tensor[4, 8], tensor[4, 4]), tensor[4])``."""
    if isinstance(value, torch.Tensor):
        return f"tensor[{', '.join(str(d) for d in value.shape)}]"
    if isinstance(value, PackedSequence):
        return "PackedSequence"
    if depth >= 3:
        return "..."
    if isinstance(value, Mapping):
        items = [f"{key!r}: {_structure(item, depth + 1)}" for key, item in list(value.items())[:6]]
        return "{" + ", ".join(items + (["..."] if len(value) > 6 else [])) + "}"
    if isinstance(value, (tuple, list)):
        items = [_structure(item, depth + 1) for item in value[:6]] + (["..."] if len(value) > 6 else [])
        text = ", ".join(items)
        return f"[{text}]" if isinstance(value, list) else f"({text}{',' if len(value) == 1 else ''})"
    return type(value).__name__


def _describe_call(inputs: Any) -> str:
    if isinstance(inputs, Mapping):
        return f"keyword arguments {_structure(inputs)}"
    if isinstance(inputs, (tuple, list)):
        count = len(inputs)
        return f"{count} positional input{'' if count == 1 else 's'} {_structure(tuple(inputs))}"
    return f"one input {_structure(inputs)}"


def _describe(module: nn.Module) -> str:
    return f"{type(module).__name__}.forward"


__all__ = ["LABEL_KEYS", "batch_inputs", "guessed_inputs_error", "inputs_mismatch", "mismatch_error", "missing_forward_error",
           "model_call_note"]
