"""Recipes: one YAML file describes a whole compression experiment.

A recipe has one section per callback, named after it, holding that callback's
arguments::

    # 90% gradual magnitude pruning, then int4 QAT for the last quarter of the run
    vars:                       # free-form values for ${...} interpolation
      qat_start: 0.75
    pruning:
      final_sparsity: 0.9
      end_step: ${vars.qat_start}
    qat:
      weights: int4
      group_size: 128
      start_step: ${vars.qat_start}

The schema is built from the registry's method configs (the callbacks' arguments), so a
new config field is a new recipe key with no other change. Everything is checked before any
training: unknown keys (with a close-match suggestion), wrong types, missing values
(``???``) and out-of-range values (the callback's own validation), each reported with the
key's full path. Steps are absolute optimizer steps (an int) or fractions of the run
(a float), as in the callbacks.

Values a YAML file cannot hold directly are written as strings: classes and functions as
dotted import paths (``teacher_class: my_pkg.models.Teacher``), dtypes by name
(``teacher_dtype: bfloat16``). A recipe read from a checkpoint is data
(``load_recipe(..., trusted=False)``): its dotted paths are refused, never imported.

``${...}`` resolves one value at a time (:mod:`lightning_compress.recipe_resolve`), each
value at most 64 KiB after interpolation; values read from the environment are used but
recorded as their ``${oc.env:...}`` expression.

The ready recipes ship inside the package (``recipes/`` in a checkout points at them), so
an installed package finds them by name: ``from_recipe("int8_qat")`` or
``lightning-compress fit --recipe int8_qat``. A path that exists always wins over a name.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import yaml
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_compress.callbacks.compatibility import check_recipe
from lightning_compress.callbacks.recipe_record import RecipeRecord
from lightning_compress.callbacks.registry import METHODS, Method
from lightning_compress.core.validate import ArgumentError, plain_values
from lightning_compress.recipe_resolve import Resolved, ResolutionError, resolve_recipe
from lightning_compress.recipe_types import (
    ImportPathError, Mismatch, UntrustedImport, coerce, describe, dtypes_spelled, reads_as_value, text_only,
    unread_vars,
)

RecipeSource = Union[str, os.PathLike, Mapping[str, Any], DictConfig]

# Section -> callback class, in the registry's canonical order (the order `from_recipe`
# returns the callbacks in).
SECTIONS: Dict[str, type] = {section: method.callback for section, method in METHODS.items()}
VARS_SECTION = "vars"
# Arguments the recipe machinery fills in itself.
_SET_BY_RECIPE = {"export": {"recipe"}}
_OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+=")
BUILTIN_RECIPES_DIR = Path(__file__).resolve().parent / "builtin_recipes"


class RecipeError(ValueError):
    """A recipe that cannot be used: the message names the key and the fix."""


@dataclass(frozen=True)
class RecipeField:
    """One recipe key: a callback argument."""

    name: str
    annotation: Any
    default: Any
    required: bool


@functools.lru_cache(maxsize=None)
def recipe_schema() -> Dict[str, Dict[str, RecipeField]]:
    """The recipe schema: section name -> key -> field, read from each callback's config."""
    schema = {}
    for section, cls in SECTIONS.items():
        method = Method(section, cls)  # SECTIONS may hold a user's subclass (tests patch it)
        hints = typing.get_type_hints(method.config)
        fields = {}
        for spec in method.arguments():
            if spec.name in _SET_BY_RECIPE.get(section, ()):
                continue
            required = spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
            fields[spec.name] = RecipeField(spec.name, hints.get(spec.name, Any), None if required else spec.default, required)
        schema[section] = fields
    return schema


@dataclass
class Recipe:
    """A loaded, resolved and validated recipe.

    Attributes:
        config: the resolved recipe as plain values (interpolations and overrides
            applied), in canonical section order; what checkpoints, exports and the
            experiment config record. A value read from the environment
            (``${oc.env:VAR}``) keeps its expression here, never the variable's value
            (with ``vars`` first when such an expression refers to it); the callbacks
            use the resolved value.
        source: the file it came from, if any.
    """

    config: Dict[str, Dict[str, Any]]
    source: Optional[str] = None
    excluded: tuple = ()
    _arguments: Dict[str, Dict[str, Any]] = field(default_factory=dict, repr=False)

    def callbacks(self, *, exclude: Sequence[str] = ()) -> List[Callback]:
        """New callbacks for this recipe in canonical order, then a :class:`RecipeRecord`.

        Args:
            exclude: section names to leave out, besides those excluded when the recipe
                was loaded.
        """
        _check_sections(exclude)
        built = []
        for section, arguments in self._arguments.items():
            if section in exclude or section in self.excluded:
                continue
            extra = {"recipe": self.config} if section == "export" else {}
            built.append(_instantiate(section, {**arguments, **extra}))
        return [*built, RecipeRecord(self.config)]


def load_recipe(
    source: RecipeSource,
    overrides: Union[Sequence[str], Mapping[str, Any], None] = None,
    *,
    exclude: Sequence[str] = (),
    trusted: bool = True,
) -> Recipe:
    """Read, resolve and validate a recipe.

    Args:
        source: a YAML file path, the name of a ready recipe (:func:`builtin_recipes`), or
            the recipe as a mapping.
        overrides: dotlist overrides applied on top of the file before interpolation, as
            ``["pruning.final_sparsity=0.8", "qat.weights=int4"]`` or a (nested) mapping.
        exclude: sections whose callbacks are neither built now nor by
            :meth:`Recipe.callbacks` (their keys and types are still checked, and they
            stay in ``config``): ``["distillation"]`` rebuilds a trained student without
            needing its teacher's checkpoint.
        trusted: False for a recipe read from a checkpoint or an export, which is data:
            a dotted path it holds where a function or class is expected
            (``export.input_fn``, ``distillation.alpha``, ``teacher_class``) is refused
            instead of imported, unless ``overrides`` set that key. Class-or-name fields
            (``targets``) take classes from modules already imported only.

    Raises:
        RecipeError: for a missing or unreadable file, bad YAML, an unknown key, a wrong
            type, a missing value, a broken interpolation, a value longer than 64 KiB after
            interpolation, an out-of-range value, or (untrusted) a dotted path to import.
    """
    _check_sections(exclude)
    raw, origin = _read(source)
    given = _overrides(overrides)  # its own errors name what is wrong with the overrides
    try:
        unread = unread_vars(OmegaConf.to_yaml(OmegaConf.merge(raw, given)), raw.get(VARS_SECTION), given.get(VARS_SECTION))
        raw = OmegaConf.merge(raw, given)
    except (OmegaConfBaseException, TypeError, ValueError) as err:  # e.g. a key under a list
        raise RecipeError(
            f"the overrides {list(overrides) if not isinstance(overrides, Mapping) else dict(overrides)} cannot be"
            f" applied to the recipe: {_first_line(err)}; an override must keep the shape of the key it"
            " replaces (a value for a value, a list for a list)"
        ) from None
    if unread:
        raise RecipeError(unread)
    # Value by value, with size limits; excluded sections keep what does not resolve as
    # written (their `???` and references may be unset).
    try:
        resolved = resolve_recipe(raw, lenient=exclude)
    except ResolutionError as err:
        raise RecipeError(str(err)) from None
    kept = {key: value for key, value in resolved.values.items() if key not in exclude}
    user_keys = None if trusted else _override_keys(overrides)
    try:
        arguments = _validate(kept, user_keys, set(resolved.expressions))
        config = _recorded(resolved)
        recipe = Recipe(config=config, source=origin, excluded=tuple(exclude), _arguments=arguments)
        # Out-of-range values fail now, in the callbacks' own validation; then combinations.
        check_recipe(recipe.callbacks(), error=RecipeError)
    except RecipeError as err:
        hint = _glob_key_hint(overrides, str(err))
        if hint:
            raise RecipeError(f"{err}; {hint}") from None
        raise
    return recipe


def _glob_key_hint(overrides: Union[Sequence[str], Mapping[str, Any], None], error: str) -> str:
    """For a dotlist override that reaches inside a mapping keyed by layer-name globs and
    fails there (``qat.overrides.model.decoder.bits=6`` read as
    ``overrides['model']['decoder']['bits']``): the form that reaches a glob with dots."""
    if overrides is None or isinstance(overrides, Mapping):
        return ""
    for item in overrides:
        key = item.split("=", 1)[0]
        path = key.split(".")
        if path[:2] == ["qat", "overrides"] and len(path) > 4 and f"overrides[{path[2]!r}]" in error:
            glob, value = ".".join(path[2:-1]), f"{{{path[-1]}: VALUE}}"
        elif path[:2] == ["qat", "mappings"] and len(path) > 3 and "mappings" in error:
            glob, value = ".".join(path[2:]), "[LAYERS]"
        else:
            continue
        return (f"the override {key} splits at every dot, layer names included, so it does not reach a glob such"
                f" as '{glob}'; replace the whole mapping instead: {'.'.join(path[:2])}={{\"{glob}\": {value}}}")
    return ""


def from_recipe(source: RecipeSource, overrides: Union[Sequence[str], Mapping[str, Any], None] = None) -> List[Callback]:
    """The callbacks a recipe describes, ready for your ``Trainer``.

    Returned in canonical order (LoRA, distillation, pruning, QAT, export), followed by
    a :class:`RecipeRecord` that stores the resolved recipe in every checkpoint and logs
    it to the experiment config. See :func:`load_recipe` for the arguments and errors.

    Example::

        trainer = Trainer(callbacks=from_recipe("int8_qat", ["qat.start_step=0.5"]))
    """
    return load_recipe(source, overrides).callbacks()


def _recorded(resolved: Resolved) -> Dict[str, Any]:
    """What the run records: its sections in canonical order, values read from the
    environment as their expressions (with ``vars`` when an expression refers to it)."""
    recorded = resolved.recorded
    config = {section: recorded[section] if recorded[section] is not None else {} for section in SECTIONS if section in recorded}
    uses_vars = any(VARS_SECTION in text for key, text in resolved.expressions.items() if key.split(".")[0] in SECTIONS)
    if uses_vars and recorded.get(VARS_SECTION) is not None:
        config = {VARS_SECTION: recorded[VARS_SECTION], **config}
    return config


def _override_keys(overrides: Union[Sequence[str], Mapping[str, Any], None]) -> set:
    """The ``section.key`` names the caller's overrides set: the caller chose those values."""
    if overrides is None:
        return set()
    if isinstance(overrides, Mapping):
        return {f"{section}.{key}" for section, values in overrides.items() if isinstance(values, Mapping) for key in values}
    return {".".join(item.split("=", 1)[0].split(".")[:2]) for item in overrides}


def _check_sections(names: Sequence[str]) -> None:
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        raise RecipeError(f"exclude names unknown recipe sections {unknown}; sections are {list(SECTIONS)}")


# ---------------------------------------------------------------------- reading
def _read(source: RecipeSource) -> tuple[DictConfig, Optional[str]]:
    if isinstance(source, (DictConfig, Mapping)):
        return _as_dictconfig(source, "the recipe mapping"), None
    if not isinstance(source, (str, os.PathLike)):
        raise RecipeError(f"a recipe is a YAML file path or a mapping, got {type(source).__name__}")
    path = _locate(source)
    try:
        # What the file holds first, as YAML reads it: OmegaConf reads a file holding one
        # string as YAML text again ("just a string" became the section {"just a string": None}).
        held = yaml.safe_load(path.read_text(encoding="utf-8"))
        loaded = OmegaConf.load(path) if isinstance(held, dict) or held is None else None
    except Exception as err:  # yaml's errors carry the line and column
        raise RecipeError(f"recipe file {str(path)!r} is not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(loaded, DictConfig):
        raise RecipeError(f"recipe file {str(path)!r} must hold a mapping of sections, not a list or a value")
    return loaded, str(path)


def builtin_recipes() -> Dict[str, Path]:
    """The ready recipes shipped with the package, by name (``"int8_qat"`` → its file)."""
    return {path.stem: path for path in sorted(BUILTIN_RECIPES_DIR.glob("*.yaml"))}


def _locate(source: Union[str, os.PathLike]) -> Path:
    """A recipe file: ``source`` as a path when it exists, else a ready recipe's name."""
    path = Path(source)
    if path.is_file():
        return path
    if path.parent == Path(".") and not path.suffix and path.with_suffix(".yaml").is_file():
        return path.with_suffix(".yaml")  # "int8_qat" with an int8_qat.yaml here: the user's file
    # Only a bare name ("int8_qat" or "int8_qat.yaml") can mean a ready recipe: a path with
    # a folder in it that does not exist is a typo the user must see.
    ready = builtin_recipes()
    if path.parent == Path(".") and path.stem in ready and path.suffix in ("", ".yaml"):
        return ready[path.stem]
    if path.is_dir():
        raise RecipeError(f"recipe {str(path)!r} is a directory; pass the path of a YAML recipe file")
    suggestion = difflib.get_close_matches(path.stem, list(ready), n=1)
    hint = f"did you mean {suggestion[0]!r}? " if suggestion else ""
    raise RecipeError(
        f"recipe file {str(path)!r} not found; {hint}pass the path of a YAML recipe or the name of a ready"
        f" recipe: {', '.join(ready)}"
    )


def _as_dictconfig(source: Any, what: str) -> DictConfig:
    try:
        return source if isinstance(source, DictConfig) else OmegaConf.create(dtypes_spelled(plain_values(dict(source))))
    except (OmegaConfBaseException, yaml.YAMLError, ValueError, TypeError) as err:
        raise RecipeError(f"{what} cannot be read: {_first_line(err)}") from None


def _overrides(overrides: Union[Sequence[str], Mapping[str, Any], None]) -> DictConfig:
    if overrides is None:
        return OmegaConf.create({})
    if isinstance(overrides, Mapping):
        return _as_dictconfig(overrides, "overrides")
    if isinstance(overrides, str):
        raise RecipeError(f"overrides must be a list of 'key=value' strings, got the single string {overrides!r}:"
                          f" pass [{overrides!r}]")
    for item in overrides:
        if not isinstance(item, str) or not _OVERRIDE.match(item):
            raise RecipeError(
                f"override {item!r} is not 'section.key=value' (for example pruning.final_sparsity=0.8)"
            )
    try:
        return OmegaConf.from_dotlist([_quote_if_text(item) for item in overrides])
    except (OmegaConfBaseException, yaml.YAMLError) as err:  # values are parsed as YAML
        raise RecipeError(f"overrides cannot be read: {_first_line(err)}") from None


def _quote_if_text(item: str) -> str:
    """``pruning.pattern=2:4`` keeps "2:4" as text: YAML 1.1 would read it as the number 124.

    Only for keys whose type is a string and never a number; other values are parsed as
    YAML (``0.5``, ``[a, b]``, ``null``)."""
    key, value = item.split("=", 1)
    section, _, name = key.partition(".")
    field_spec = recipe_schema().get(section, {}).get(name)
    if field_spec is None or not text_only(field_spec.annotation) or value.startswith(("'", '"', "$")) or value == "null":
        return item
    return f"{key}={json.dumps(value)}"


# ---------------------------------------------------------------------- validation
def _validate(resolved: Any, user_keys: Optional[set] = None,
              interpolated: set = frozenset()) -> Dict[str, Dict[str, Any]]:
    """Check every key against the schema; return the converted arguments by section.

    ``user_keys`` (an untrusted recipe): nothing is imported except for these keys.
    ``interpolated``: the keys whose values an interpolation (``${oc.env:...}``) gave."""
    schema = recipe_schema()
    unknown = [key for key in resolved if key not in schema and key != VARS_SECTION]
    if unknown:
        raise RecipeError(_unknown_key(str(unknown[0]), list(schema) + [VARS_SECTION], "top-level section"))
    present = [section for section in schema if section in resolved]
    if not present:
        raise RecipeError(f"the recipe has no compression section; add at least one of {list(schema)}")
    arguments = {}
    for section in present:
        values = resolved[section]
        if values is None:  # `qat:` alone turns the method on with its defaults
            values = {}
        if not isinstance(values, dict):
            raise RecipeError(
                f"recipe section {section} must be a mapping of {SECTIONS[section].__name__} arguments,"
                f" got {values!r}"
            )
        fields = schema[section]
        converted = {}
        for key, value in values.items():
            if key not in fields:
                raise RecipeError(_unknown_key(f"{section}.{key}", list(fields), "key"))
            name = f"{section}.{key}"
            converted[key] = _convert(value, fields[key].annotation, name, user_keys is None or name in user_keys,
                                      name in interpolated)
        missing = [name for name, spec in fields.items() if spec.required and name not in values]
        if missing:
            raise RecipeError(f"recipe key {section}.{missing[0]} is required; set it in the recipe")
        arguments[section] = converted
    return arguments


def _unknown_key(key: str, names: List[str], kind: str) -> str:
    """The message for an unknown ``key``: a close match among ``names``, or all of them."""
    section, _, leaf = key.rpartition(".")
    message = f"unknown recipe {kind} {key!r}"
    close = difflib.get_close_matches(leaf, names, n=1, cutoff=0.6)
    if close:
        return f"{message}; did you mean {section + '.' if section else ''}{close[0]}?"
    return f"{message}; {'valid keys of ' + section if section else 'valid sections'} are {names}"


def _convert(value: Any, annotation: Any, key: str, trusted: bool = True, interpolated: bool = False) -> Any:
    try:
        return coerce(value, annotation, trusted=trusted)
    except UntrustedImport as err:
        raise RecipeError(
            f"recipe key {key}: {err.path!r} would be imported and run, and this recipe comes from a checkpoint or"
            " an export, which is data: nothing in it is imported or called. Pass the recipe again (--recipe FILE;"
            " recipe= in Python), or, if you trust the file, --trust-checkpoint-recipe (trust_recipe=True)"
        ) from None
    except ImportPathError as err:  # an import path that does not import
        raise RecipeError(f"recipe key {key}: {err}") from None
    except Mismatch:
        hint = "; quote it in YAML ('2:4'): unquoted, YAML reads 2:4 as the number 124" if isinstance(value, int) and text_only(annotation) else ""
        if isinstance(value, str) and reads_as_value(value):  # ${oc.env:...} is text, "0.6" included
            hint = ("; a value from an environment variable is text: read it as YAML with ${oc.decode:${oc.env:NAME}}"
                    if interpolated else "; it is quoted, so YAML reads it as text: remove the quotes")
        raise RecipeError(
            f"recipe key {key} expects {describe(annotation)}, got {value!r} ({type(value).__name__}){hint}"
        ) from None


def _instantiate(section: str, arguments: Dict[str, Any]) -> Callback:
    try:
        return SECTIONS[section](**arguments)
    except ArgumentError as err:  # the config names the argument: `overrides['x']` is `overrides`
        raise RecipeError(f"recipe key {section}.{err.argument.split('[')[0]}: {err}") from None
    except (ValueError, TypeError) as err:  # not one argument's fault: the section's
        raise RecipeError(f"recipe section {section}: {err}") from None


def _yaml_problem(err: BaseException) -> str:
    """What YAML found wrong and where (1-based, as editors count), then what it was
    parsing: the problem's own line, which a first line of the message leaves out."""
    mark = getattr(err, "problem_mark", None)
    if not isinstance(err, yaml.MarkedYAMLError) or mark is None:
        return _first_line(err, lines=3)
    where = lambda m: f"line {m.line + 1}, column {m.column + 1}"  # noqa: E731
    text = f"{err.problem} at {where(mark)}"
    if err.context and err.context_mark is not None:
        text += f" ({err.context} at {where(err.context_mark)})"
    return text


def _first_line(err: BaseException, lines: int = 1) -> str:
    text = str(err).strip().splitlines()
    return " ".join(line.strip() for line in text[:lines]) if text else type(err).__name__
