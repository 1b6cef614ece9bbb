"""Recipe interpolation, one value at a time: sizes are checked as values resolve, and
values read from the environment stay expressions in the recorded recipe.

OmegaConf resolves ``${...}`` lazily and remembers nothing, so a short recipe whose values
each repeat the one before ten times expands exponentially (929 bytes to 10**9
characters). Here each interpolated value is resolved once, after the values it refers
to (a reference then reads the finished value), and refused as soon as it, or the recipe
as a whole, grows past the limits, so no large string is ever built.

A value that reads an environment variable (``${oc.env:VAR}``), directly or through
another value, is used resolved but recorded as written: what checkpoints, exports and
the experiment config keep never holds the variable's value (a token, a password).
"""

from __future__ import annotations

import contextvars
import inspect
import os
import re
from dataclasses import dataclass, field
from typing import Any, Collection, Dict, List, Optional, Set, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

MAX_VALUE_CHARS = 64 * 1024  # one value, after interpolation
MAX_RECIPE_CHARS = 1024 * 1024  # the whole recipe, after interpolation
# Before a value resolves: its length plus its interpolations times the largest value one
# of them could stand for; past this, it is refused without building it.
_MAX_BUILD_CHARS = 16 * 1024 * 1024
_RESOLVER = "lightning_compress.recipe_value"
# OmegaConf 2.4 renamed register_new_resolver to register_resolver (deprecating the old
# name); before it, register_resolver is the legacy string-argument API. Told apart by
# the signature, not the version: 2.4 development builds still have the legacy one.
_RESOLVER_API_IS_NEW = "use_cache" in inspect.signature(OmegaConf.register_resolver).parameters
_ENVIRONMENT = re.compile(r"\$\{\s*oc\.env\s*:")
_MISSING = "???"
_ACTIVE: contextvars.ContextVar[Optional["_Resolution"]] = contextvars.ContextVar("lightning_compress_recipe", default=None)


class ResolutionError(ValueError):
    """A recipe whose interpolations cannot be resolved or grow too large; names the key."""


@dataclass
class Resolved:
    """A recipe with its interpolations resolved.

    Attributes:
        values: every value resolved (in ``lenient`` sections, values that cannot be
            resolved are kept as written).
        recorded: the same, except that values read from the environment (and values
            whose text holds ``${``) keep their expression.
        expressions: the keys (``export.dirpath``) that ``recorded`` keeps as expressions.
    """

    values: Dict[Any, Any]
    recorded: Dict[Any, Any]
    expressions: Dict[str, str] = field(default_factory=dict)


def resolve_recipe(raw: DictConfig, *, lenient: Collection[str] = ()) -> Resolved:
    """Resolve ``raw`` value by value.

    Args:
        raw: the merged recipe, interpolations unresolved.
        lenient: top-level keys whose unset (``???``) and unresolvable values are kept as
            written instead of failing (sizes are checked everywhere).

    Raises:
        ResolutionError: for a missing value, a broken or circular reference, or a value
            (or the whole recipe) over the size limits, naming the key.
    """
    _register_resolver()
    resolution = _Resolution(raw, set(lenient))
    token = _ACTIVE.set(resolution)
    try:
        return resolution.run()
    except RecursionError:  # a chain of references thousands of values long
        raise ResolutionError(
            f"recipe key {resolution.following}: its interpolations refer to values that refer to others too deeply"
            " (thousands of levels); a recipe's references should be a few levels deep"
        ) from None
    finally:
        _ACTIVE.reset(token)


def _register_resolver() -> None:
    if not OmegaConf.has_resolver(_RESOLVER):
        # Uncached: the same index means another value in the next recipe resolved.
        if _RESOLVER_API_IS_NEW:
            OmegaConf.register_resolver(_RESOLVER, _value_of, use_cache=False)
        else:
            OmegaConf.register_new_resolver(_RESOLVER, _value_of, use_cache=False)


def _value_of(index):
    """The resolver that stands in for every interpolated value while a recipe resolves."""
    resolution = _ACTIVE.get()
    if resolution is None:
        raise RuntimeError(f"${{{_RESOLVER}:...}} is internal to lightning_compress recipes")
    return resolution.value_of(int(index))


class _Pending(Exception):
    """A value referred to before it is resolved."""


@dataclass
class _Leaf:
    path: Tuple[Any, ...]
    key: str
    text: str  # the value as written, with its interpolations


class _Resolution:
    def __init__(self, raw: DictConfig, lenient: Set[str]) -> None:
        self.plain = OmegaConf.to_container(raw, resolve=False)
        self.lenient = lenient
        self.leaves: List[_Leaf] = []
        self.values: Dict[int, Any] = {}
        self.failed: Dict[int, str] = {}
        self.environment: Dict[int, bool] = {}
        self.pending: Optional[int] = None
        self.read: Set[int] = set()
        self.total = 0
        self.following = ""  # the key whose references are being followed
        self.largest_variable = max((len(v) for v in os.environ.values()), default=0)
        self.work = OmegaConf.create(self._substituted())

    # ------------------------------------------------------------------ plain values
    def _substituted(self) -> Any:
        """The recipe with each interpolated value replaced by ``${resolver:index}``;
        plain values are checked for size and ``???`` here."""

        def visit(node: Any, path: Tuple[Any, ...], key: str) -> Any:
            if isinstance(node, dict):
                self._count(sum(len(str(k)) for k in node), key)
                return {k: visit(v, (*path, k), f"{key}.{k}" if key else str(k)) for k, v in node.items()}
            if isinstance(node, list):
                return [visit(v, (*path, i), f"{key}[{i}]") for i, v in enumerate(node)]
            size = _size(node)
            if size > MAX_VALUE_CHARS:
                raise ResolutionError(_too_large(key, size))
            self._count(size, key)
            if node == _MISSING and not self._lenient(path):
                raise ResolutionError(f"recipe key {key} has no value (???); set it in the recipe or pass an override {key}=VALUE")
            if isinstance(node, str) and "${" in node:
                self.leaves.append(_Leaf(path, key, node))
                return f"${{{_RESOLVER}:{len(self.leaves) - 1}}}"
            return node

        return visit(self.plain, (), "")

    def _lenient(self, path: Tuple[Any, ...]) -> bool:
        return bool(path) and path[0] in self.lenient

    def _count(self, size: int, key: str) -> None:
        self.total += size
        if self.total > MAX_RECIPE_CHARS:
            raise ResolutionError(
                f"recipe key {key}: the recipe grows past {MAX_RECIPE_CHARS:,} characters (1 MiB) with this value;"
                " a recipe describes settings, not data: shorten it or its interpolations"
            )

    # ------------------------------------------------------------------ interpolated values
    def run(self) -> Resolved:
        for index in range(len(self.leaves)):
            self.following = self.leaves[index].key
            self._resolve(index, [])
        values, recorded = _copy(self.plain), _copy(self.plain)
        expressions = {}
        for index, leaf in enumerate(self.leaves):
            if index in self.failed:
                continue  # a lenient value kept as written
            value = self.values[index]
            _put(values, leaf.path, value)
            if self.environment[index] or _holds_interpolation(value):
                expressions[leaf.key] = leaf.text
            else:
                _put(recorded, leaf.path, value)
        return Resolved(values, recorded, expressions)

    def value_of(self, index: int) -> Any:
        """The resolved value ``index`` while another value resolves."""
        if index in self.values:
            self.read.add(index)
            return self.values[index]
        if index in self.failed:
            raise ResolutionError(f"{self.leaves[index].key} cannot be resolved ({self.failed[index]})")
        self.pending = index
        raise _Pending(index)

    def _resolve(self, index: int, stack: List[int]) -> None:
        if index in self.values or index in self.failed:
            return
        leaf = self.leaves[index]
        if index in stack:
            cycle = " -> ".join(self.leaves[i].key for i in [*stack[stack.index(index):], index])
            raise ResolutionError(f"recipe key {leaf.key}: its interpolations refer back to it ({cycle})")
        while True:
            self._check_build_size(leaf)  # with what the values it refers to have added so far
            self.pending, self.read = None, set()
            parent = self._parent(leaf.path)
            parent[leaf.path[-1]] = leaf.text
            try:
                value = parent[leaf.path[-1]]
                if isinstance(value, (DictConfig, ListConfig)):
                    value = OmegaConf.to_container(value, resolve=True, throw_on_missing=True)
                error = None
            except ResolutionError as err:  # a lenient value it refers to did not resolve
                error = str(err)
            except (OmegaConfBaseException, ValueError, TypeError, KeyError, RecursionError) as err:
                error = _first_line(err)
            finally:
                parent[leaf.path[-1]] = f"${{{_RESOLVER}:{index}}}"
            if self.pending is not None:  # resolve what it refers to first, then try again
                self._resolve(self.pending, [*stack, index])
                continue
            break
        if error is None and _holds_text(value, _RESOLVER):  # a mapping or list turned into text
            error = "a mapping or list that holds interpolations cannot be part of a string"
        if error is not None:
            if self._lenient(leaf.path):
                self.failed[index] = error
                return
            raise ResolutionError(f"recipe key {leaf.key}: {error}")
        size = _size(value)
        if size > MAX_VALUE_CHARS:
            raise ResolutionError(_too_large(leaf.key, size))
        self._count(size, leaf.key)
        self.values[index] = value
        self.environment[index] = bool(_ENVIRONMENT.search(leaf.text)) or any(self.environment[i] for i in self.read)

    def _check_build_size(self, leaf: _Leaf) -> None:
        """Refuse a value that could build a huge string before resolving it: each of its
        interpolations stands for at most a printed value of the recipe (the recipe so
        far, printed with escapes) or an environment variable."""
        largest = 4 * self.total + self.largest_variable
        bound = len(leaf.text) + leaf.text.count("${") * largest
        if bound > _MAX_BUILD_CHARS:
            raise ResolutionError(
                f"recipe key {leaf.key}: its {leaf.text.count('${')} interpolations could expand to {bound:,} characters;"
                f" a recipe value is limited to {MAX_VALUE_CHARS:,} characters (64 KiB) after interpolation"
            )

    def _parent(self, path: Tuple[Any, ...]) -> Any:
        node = self.work
        for part in path[:-1]:
            node = node[part]
        return node


def _too_large(key: str, size: int) -> str:
    return (
        f"recipe key {key}: the value is {size:,} characters long after interpolation; a recipe value is limited to"
        f" {MAX_VALUE_CHARS:,} characters (64 KiB): shorten it or its interpolations"
    )


def _size(value: Any) -> int:
    """Characters in a value: strings by length, containers by their items and keys."""
    size, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            size += sum(len(str(k)) + 1 for k in item)
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            size += len(item)
            stack.extend(item)
        elif isinstance(item, (str, bytes)):
            size += len(item)
        else:
            size += len(str(item))
    return size


def _holds_text(value: Any, text: str) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
            stack.extend(k for k in item if isinstance(k, str))
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, str) and text in item:
            return True
    return False


def _holds_interpolation(value: Any) -> bool:
    """A resolved value whose text holds ``${`` (an escaped ``\\${``) would be read as an
    interpolation when the recorded recipe is loaded again: record its expression."""
    return _holds_text(value, "${")


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _put(container: Any, path: Tuple[Any, ...], value: Any) -> None:
    if not path:
        return
    for part in path[:-1]:
        container = container[part]
    container[path[-1]] = value


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0].strip() if text else type(err).__name__


__all__ = ["MAX_RECIPE_CHARS", "MAX_VALUE_CHARS", "Resolved", "ResolutionError", "resolve_recipe"]
