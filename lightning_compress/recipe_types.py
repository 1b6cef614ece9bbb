"""Recipe values to typed arguments: what a YAML file holds, converted to what a config
field's annotation asks for (``"bfloat16"`` -> ``torch.bfloat16``, a dotted path -> the
class or function it names, a list -> a tuple), or refused with a description of the type.
"""

from __future__ import annotations

import collections.abc
import difflib
import importlib
import importlib.util
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Union

import torch
import yaml

from lightning_compress.core.validate import dtype_of, dtype_spelled


class ImportPathError(ValueError):
    """A dotted import path that does not import."""


class UntrustedImport(Exception):
    """A value of an untrusted recipe that would import (or call) code: ``path``."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


_DOTTED = re.compile(r"[A-Za-z_]\w*([.:][A-Za-z_]\w*)+")


def text_only(annotation: Any) -> bool:
    members = typing.get_args(annotation) if typing.get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    members = [m for m in members if m is not type(None)]
    return bool(members) and all(m is str or m is os.PathLike or m is Path for m in members)


class Mismatch(Exception):
    """A value that cannot be converted to the annotated type."""


def coerce(value: Any, tp: Any, *, trusted: bool = True) -> Any:
    """``value`` converted to ``tp``; raises Mismatch when it cannot be.

    With ``trusted=False`` (a recipe read from a checkpoint or an export: data, not code)
    nothing is imported: a dotted path where a function or a class is expected raises
    :class:`UntrustedImport`, except a class-or-name field (``targets``), which takes a
    class only from a module already imported and reads anything else as a name.
    """
    return _coerce(value, tp, trusted, False)


def _coerce(value: Any, tp: Any, trusted: bool, or_text: bool) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise Mismatch
    if origin in (Union, types.UnionType):
        members = typing.get_args(tp)
        # A dotted path that imports the class a member asks for is that class, not a name
        # (`targets: [torch.nn.Linear]`); a string that imports nothing stays a string.
        classes = [m for m in members if typing.get_origin(m) is type]
        unimported = None
        for member in [*classes, *(m for m in members if m not in classes)]:
            try:
                return _coerce(value, member, trusted, str in members)
            except Mismatch:
                continue
            except ImportPathError as err:
                if str not in members:
                    unimported = err
        if unimported is not None:  # say what else the setting takes, not only that it imports nothing
            raise ImportPathError(f"{unimported}; it takes {describe(tp)}") from None
        raise Mismatch
    if tp is bool:
        return _exact(value, bool)
    if tp is int:
        if isinstance(value, bool):
            raise Mismatch
        return _exact(value, int)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Mismatch
        return float(value)
    if tp is str or tp is os.PathLike or tp is Path or origin is os.PathLike:
        return _exact(value, str)
    if tp is torch.dtype:
        dtype = dtype_of(value) if isinstance(value, str) else None  # "bfloat16" or "torch.bfloat16"
        if not isinstance(dtype, torch.dtype):
            raise Mismatch
        return dtype
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise Mismatch
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], trusted, False) for v in value)
        if len(args) != len(value):
            raise Mismatch
        return tuple(_coerce(v, a, trusted, False) for v, a in zip(value, args))
    if origin in (list, collections.abc.Sequence):
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise Mismatch
        return [_coerce(v, item, trusted, False) for v in value]
    if origin in (dict, collections.abc.Mapping):
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise Mismatch
        return {_coerce(k, key_tp, trusted, False): _coerce(v, value_tp, trusted, False) for k, v in value.items()}
    if origin in (type, collections.abc.Callable) or tp in (type, collections.abc.Callable):
        if not isinstance(value, str):
            raise Mismatch
        if trusted:
            target = import_object(value)
        elif or_text and origin is type:  # a class to match layers against, or a name glob
            target = loaded_object(value)
        else:  # a function would be called, a class built
            raise UntrustedImport(value)
        if origin is type and typing.get_args(tp) and isinstance(typing.get_args(tp)[0], type):
            if not (isinstance(target, type) and issubclass(target, typing.get_args(tp)[0])):
                raise Mismatch
        return target
    raise Mismatch  # e.g. nn.Module: a YAML file cannot hold a model


def _exact(value: Any, kind: type) -> Any:
    if not isinstance(value, kind):
        raise Mismatch
    return value


def describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        parts = [describe(m) for m in typing.get_args(tp)]
        parts = [p for p in dict.fromkeys(parts) if p is not None]
        return " or ".join(parts)
    if tp is type(None):
        return "null"
    if tp in (bool, int, float, str):
        return {"bool": "true/false", "int": "an int", "float": "a float", "str": "a string"}[tp.__name__]
    if tp is os.PathLike or tp is Path or origin is os.PathLike:
        return "a path"
    if tp is torch.dtype:
        return "a dtype name (float32, bfloat16, float16)"
    if origin in (list, tuple, collections.abc.Sequence):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"a list of ({' and '.join(describe(a) for a in args) or 'anything'})"
    if origin in (dict, collections.abc.Mapping):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is not Any:  # what each value must be is what users get wrong
            return f"a mapping of ({describe(args[0])}) to ({describe(args[1])})"
        return "a mapping"
    if origin is type or tp is type:
        return "a class as a dotted import path"
    if origin is collections.abc.Callable or tp is collections.abc.Callable:
        return "a function as a dotted import path"
    if tp is Any:
        return "anything"
    return f"a {getattr(tp, '__name__', tp)} (not expressible in YAML; pass it in Python)"


def import_object(path: str) -> Any:
    """The object a dotted path (``pkg.mod.Name`` or ``pkg.mod:Name``) names.

    Raises:
        ImportPathError: when the module or the attribute does not exist.
    """
    module_name, _, attribute = path.replace(":", ".").rpartition(".")
    if not module_name:
        raise ImportPathError(f"{path!r} is not a dotted import path like 'my_pkg.models.Teacher'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportPathError(f"cannot import {path!r}: {err}; check the module path and that it is installed") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        names = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(attribute, names, n=1)
        hint = f"; did you mean {module_name}.{close[0]}?" if close else ""
        raise ImportPathError(f"module {module_name!r} has no attribute {attribute!r}{hint}") from None


def loaded_object(path: str) -> Any:
    """What a dotted path names in a module that is already imported, without importing
    anything (nor running a module's ``__getattr__``).

    Raises:
        UntrustedImport: when the path names a module that exists but is not imported yet.
        ImportPathError: when it names nothing (then it is not an import path at all).
    """
    if not _DOTTED.fullmatch(path):
        raise ImportPathError(f"{path!r} is not a dotted import path")
    module_name, _, attribute = path.replace(":", ".").rpartition(".")
    if _would_import(module_name):
        raise UntrustedImport(path)
    module = sys.modules.get(module_name)
    if module is None or attribute not in vars(module):
        raise ImportPathError(f"{path!r} names nothing imported")
    return vars(module)[attribute]


def _would_import(module_name: str) -> bool:
    """Whether importing ``module_name`` would run a module's code: some part of it is not
    imported yet and can be found (finding a module does not run it)."""
    parts = module_name.split(".")
    for n in range(1, len(parts) + 1):
        prefix = ".".join(parts[:n])
        if prefix in sys.modules:
            continue
        try:
            return importlib.util.find_spec(prefix) is not None
        except (ImportError, ValueError, AttributeError):
            return False  # the import would fail right here, before running anything
    return False


def dtypes_spelled(value: Any) -> Any:
    """``value`` (dicts, lists and tuples within) with torch dtypes as their recipe
    spelling, ``torch.bfloat16`` as ``"bfloat16"``: OmegaConf holds no torch dtype."""
    if isinstance(value, dict):
        return {key: dtypes_spelled(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(dtypes_spelled(item) for item in value)
    return dtype_spelled(value) if isinstance(value, torch.dtype) else value


def reads_as_value(text: str) -> bool:
    """Whether YAML reads ``text`` as a number, bool or null rather than as text."""
    try:
        return bool(text.strip()) and not isinstance(yaml.safe_load(text), (str, dict, list))  # "" is text
    except yaml.YAMLError:
        return False


def unread_vars(recipe_yaml: str, recipe_vars: Any, override_vars: Any) -> str | None:
    """Why an override's new ``vars`` key is an error: nothing in the recipe (or the
    overrides; ``recipe_yaml`` is their merge, unresolved) reads it, so it would be
    dropped in silence, as a misspelt ``vars.masks_final`` was in a new user's trial."""
    if not isinstance(override_vars, collections.abc.Mapping):
        return None
    known = list(recipe_vars) if isinstance(recipe_vars, collections.abc.Mapping) else []
    unread = [key for key in override_vars if key not in known and f"vars.{key}" not in recipe_yaml]
    if not unread:
        return None
    close = difflib.get_close_matches(str(unread[0]), [str(k) for k in known], n=1)
    return (f"override vars.{unread[0]} sets a value nothing in the recipe reads (no ${{vars.{unread[0]}}}); the"
            f" recipe's vars are {known}" + (f"; did you mean vars.{close[0]}?" if close else ""))


__all__ = [
    "dtypes_spelled",
    "reads_as_value",
    "ImportPathError", "Mismatch", "UntrustedImport", "coerce", "describe", "import_object", "loaded_object", "text_only",
]
