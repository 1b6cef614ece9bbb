"""LoRA adapters in PEFT's on-disk format.

A directory with ``adapter_model.safetensors`` (keys
``base_model.model.<layer>.lora_A.weight`` / ``lora_B.weight``, or ``lora_embedding_A`` /
``lora_embedding_B`` for Embedding layers, plus the full weights of ``modules_to_save``
as ``base_model.model.<module>.<tensor>``) and ``adapter_config.json``
(``peft_type: "LORA"``, ``r``, ``lora_alpha``, ...). ``peft.PeftModel.from_pretrained``
loads what :func:`save_adapters` writes onto the same base model, and
:func:`load_adapters` reads what PEFT saved. Nothing is unpickled.

Attention layers: see :mod:`~lightning_compress.formats.peft_attention`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, Iterable, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from lightning_compress.core.atomic import atomic_write_directory
from lightning_compress.core.attention import compressible_attention
from lightning_compress.core.targeting import close_names_hint, match_modules, name_matches, tied_parameter_names
from lightning_compress.core.validate import ArgumentError
from lightning_compress.formats.peft_attention import from_peft_names, peft_unpaired, to_peft_names, warn_out_proj_delta
from lightning_compress.lora.adapter import LoRAAdapter, adapter_shapes
from lightning_compress.lora.config import ADAPTABLE_TYPES, LoRAConfig
from lightning_compress.lora.inject import adapters_of, inject_adapters

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
# PEFT options whose non-default values change the math; we refuse them rather than ignore them.
_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
                "rank_pattern": {}, "alpha_pattern": {}}


class AdapterFormatError(ValueError):
    """An adapter directory that cannot be read as LoRA for this model; the message names
    the file and the entry."""


def save_adapters(model: nn.Module, directory: str | Path, config: LoRAConfig, *,
                  only: Iterable[LoRAAdapter] | None = None) -> Path:
    """Write ``model``'s adapters (and its ``config.modules_to_save``) in PEFT's format;
    ``only``: just these of them (one LoRA callback's, where several adapt the model).

    Layer names are relative to ``model``: pass the module PEFT will see as its base model
    (for a LightningModule that wraps a transformers model, that inner model). The
    directory is written whole (:func:`~lightning_compress.core.atomic.atomic_write_directory`):
    a crash at any instant leaves the old adapter files or the new ones, never a mix; other
    files already in it are kept. Returns the directory.

    A ``modules_to_save`` module whose weight another module shares (a head tied to the
    input embedding) is saved with that module: both train as the one weight, while
    PEFT gives each module in ``modules_to_save`` a copy of its own, so PEFT reproduces
    the trained model only with both copies in the file.

    Raises:
        ArgumentError: ``config`` is not the adapters' (another ``r`` or scaling: PEFT
            would load them with the file's), naming the layers and both values.
        ValueError: ``model`` holds no adapters (not injected, or merged already), an
            attention layer is adapted on one projection only (every such layer named;
            see :func:`~lightning_compress.formats.peft_attention.peft_unpaired`), or
            ``directory`` is a mount point or the current working directory.
        DirectoryLockedError: another process is writing ``directory`` (an ``OSError``
            naming the lock file and the writer's pid).
    """
    adapters = adapters_of(model)
    if only is not None:
        chosen = {id(adapter) for adapter in only}
        adapters = {name: adapter for name, adapter in adapters.items() if id(adapter) in chosen}
    if not adapters:
        raise ValueError("no LoRA adapters to save under this module: save before merging, or pass the"
                         " module that holds the adapters")
    _check_config_describes(adapters, config)
    unpaired = peft_unpaired(model, adapters)
    if unpaired:
        raise ValueError(f"PEFT's format cannot hold the adapters of this model ({len(unpaired)} layer"
                         f"{'s' if len(unpaired) > 1 else ''}):\n" + "\n".join(f"- {why}" for why in unpaired.values()))
    tensors: Dict[str, torch.Tensor] = {}
    peft_names, targets = to_peft_names(model, adapters)
    for name, adapter in adapters.items():
        for key, parameter in zip(_adapter_keys(adapter.layer), (adapter.layer.lora_A, adapter.layer.lora_B)):
            tensors[f"{_PREFIX}{peft_names[name]}.{key}"] = parameter.detach().cpu().contiguous()
    to_save = _with_tied_partners(model, match_modules(model, config.modules_to_save, "modules_to_save")
                                  if config.modules_to_save else {}, adapters)
    for name, module in to_save.items():
        for key, value in module.state_dict().items():
            # a copy each: safetensors refuses two names for one storage (tied partners)
            tensors[f"{_PREFIX}{name}.{key}"] = value.detach().cpu().contiguous().clone()
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "use_rslora": config.use_rslora,
        "target_modules": _target_modules(model, targets),
        "modules_to_save": list(to_save) or None,
        "init_lora_weights": True,
        "inference_mode": True,
        **_UNSUPPORTED,
    }
    directory = Path(directory)
    files = {ADAPTER_WEIGHTS: save(tensors, metadata={"format": "pt"}),
             ADAPTER_CONFIG: (json.dumps(peft_config, indent=2) + "\n").encode()}
    # One directory swap, never two file renames: a crash between those would pair the new
    # weights with the old config (and its `lora_alpha`).
    atomic_write_directory(directory, files, overwrite=True, keep_others=True)
    warn_out_proj_delta([n for n, a in adapters.items() if isinstance(a.layer, nn.MultiheadAttention)], "Saved the")
    return directory


def read_adapter_config(directory: str | Path, **overrides: Any) -> LoRAConfig:
    """The :class:`LoRAConfig` an adapter directory describes (``overrides`` replace fields)."""
    path, raw = _read_config_json(Path(directory))
    return _config_from(path, raw, overrides)


def load_adapters(model: nn.Module, directory: str | Path, config: LoRAConfig | None = None) -> LoRAConfig:
    """Load PEFT LoRA adapters (and ``modules_to_save`` weights) from ``directory`` into ``model``.

    A model that already holds adapters (put there by the ``LoRA`` callback) must hold
    them on the file's layers, with the same scaling, and gets the saved values; on a plain
    model the adapters are injected first, with the rank and scaling of the file (or of
    ``config``, whose ``r`` must be the file's), and everything else is frozen.

    The two files must belong together: the weights file holds only ``lora_A``/``lora_B``
    tensors of layers that ``adapter_config.json``'s ``target_modules`` selects, with its
    rank ``r``, and the full tensors of its ``modules_to_save``; any other tensor (a base
    weight, say) is refused, never copied into the model. Everything is checked before
    anything changes.

    Raises:
        AdapterFormatError: a missing or corrupted file, an unsupported PEFT option, a
            layer the model lacks or the config does not target, a tensor that is not an
            adapter or ``modules_to_save`` weight, NaN/Inf values, or a tensor whose shape
            or dtype does not fit (file and tensor named).
    """
    directory = Path(directory)
    config_path, raw = _read_config_json(directory)
    saved = _config_from(config_path, raw, {})
    if config is not None and config.r != saved.r:
        raise AdapterFormatError(f"{config_path}: the adapters have r={saved.r}, the `config` passed has r={config.r};"
                                 " pass a config with the file's `r`, or none")
    config = config or saved
    weights_path = directory / ADAPTER_WEIGHTS
    try:
        tensors = load_file(str(weights_path))
    except FileNotFoundError:
        raise AdapterFormatError(f"{weights_path}: no such file") from None
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterFormatError(f"{weights_path}: not a readable safetensors file ({error})") from None

    named = dict(model.named_modules())
    pairs, module_tensors = _split_keys(weights_path, tensors)
    try:
        pairs, targeted_as = from_peft_names(pairs, model, named)
    except ValueError as error:
        raise AdapterFormatError(f"{weights_path}: {error}") from None
    existing = adapters_of(model)
    targets = _peft_matcher(config_path, raw, "target_modules")
    excluded = _peft_matcher(config_path, raw, "exclude_modules")
    for layer_name, (lora_a, lora_b, embedding_keys) in pairs.items():
        layer = _module(weights_path, named, layer_name)
        _check_adapted_layer(weights_path, targeted_as.get(layer_name, layer_name), layer, embedding_keys, targets,
                             excluded, raw)
        expected = adapter_shapes(layer, config.r)
        for key, tensor, shape in zip("AB", (lora_a, lora_b), expected):
            if tuple(tensor.shape) != tuple(shape):
                raise AdapterFormatError(
                    f"{weights_path}: lora_{key} of layer {layer_name!r} has shape {tuple(tensor.shape)}, but a"
                    f" rank-{config.r} adapter on this {type(layer).__name__} needs {tuple(shape)}"
                    f" (r={config.r} in {ADAPTER_CONFIG}); the two files do not belong together"
                )
            _check_values(weights_path, f"lora_{key} of layer {layer_name!r}", tensor, torch.float32)
        if layer_name in existing and existing[layer_name].scaling != config.scaling:
            raise AdapterFormatError(
                f"{weights_path}: layer {layer_name!r} holds an adapter with scaling"
                f" {existing[layer_name].scaling}, the file's is {config.scaling} (r={config.r},"
                f" lora_alpha={config.lora_alpha}); use the same `r`, `lora_alpha` and `use_rslora`"
            )
    owners = _module_tensor_owners(weights_path, named, module_tensors, raw.get("modules_to_save"), set(pairs))
    if existing and set(existing) != set(pairs):
        raise AdapterFormatError(
            f"{weights_path}: the file holds adapters for {sorted(pairs)}, but the model's adapters sit on"
            f" {sorted(existing)}; use the same `target_modules`"
        )
    if not existing:
        inject_adapters(model, config, {name: named[name] for name in pairs}, owner="load_adapters")
        existing = adapters_of(model)
    with torch.no_grad():
        for layer_name, (lora_a, lora_b, _) in pairs.items():
            layer = existing[layer_name].layer
            layer.lora_A.copy_(lora_a)
            layer.lora_B.copy_(lora_b)
        for key, tensor in module_tensors.items():
            module_name, tensor_name = owners[key]
            module_state = named[module_name].state_dict(keep_vars=True)
            module_state[tensor_name].copy_(tensor)
    warn_out_proj_delta(sorted(set(targeted_as.values())), "Loaded the")
    return config


# ---------------------------------------------------------------- internals
def _check_config_describes(adapters: Dict[str, Any], config: LoRAConfig) -> None:
    """Refuse a ``config`` whose ``r`` or scaling is not the adapters': the file would
    pair their tensors with another ``lora_alpha`` (PEFT then computes another model) or
    another rank (PEFT refuses the shapes)."""
    wrong = [f"{name!r} (r={adapter.layer.lora_A.shape[0]}, scaling {adapter.scaling:g})"
             for name, adapter in adapters.items()
             if adapter.layer.lora_A.shape[0] != config.r or adapter.scaling != config.scaling]
    if wrong:
        raise ArgumentError(
            "config",
            f"`config` (r={config.r}, lora_alpha={config.lora_alpha}, use_rslora={config.use_rslora}: scaling"
            f" {config.scaling:g}) does not describe the adapters it would be saved with: {', '.join(wrong[:4])}"
            f"{', ...' if len(wrong) > 4 else ''}; pass the LoRAConfig they were trained with (the LoRA callback's"
            " own `save_adapters(directory)` does)",
        )


def _with_tied_partners(model: nn.Module, to_save: Dict[str, nn.Module], adapted) -> Dict[str, nn.Module]:
    """``to_save`` and every other module that holds one of their parameters (tied
    weights) and no adapter (``adapted``: the adapted layers' names), in the model's
    module order."""
    held = {id(p) for module in to_save.values() for p in module.parameters()}
    partners = {name.rpartition(".")[0] for names in tied_parameter_names(model).values()
                for name in names if id(model.get_parameter(name)) in held}
    named = dict(model.named_modules())
    wanted = set(to_save) | {name for name in partners if name and not any(
        name == kept or name.startswith(kept + ".") for kept in to_save) and name not in adapted}
    return {name: named[name] for name in named if name in wanted}


def _adapter_keys(layer: nn.Module) -> Tuple[str, str]:
    if isinstance(layer, nn.Embedding):
        return "lora_embedding_A", "lora_embedding_B"
    return "lora_A.weight", "lora_B.weight"


_ADAPTER_KEY = re.compile(r"^(?P<layer>.+)\.(?:lora_(?P<ab>[AB])\.weight|lora_embedding_(?P<eab>[AB]))$")


def _read_config_json(directory: Path) -> Tuple[Path, Dict[str, Any]]:
    path = directory / ADAPTER_CONFIG
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterFormatError(f"{path}: no such file; an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise AdapterFormatError(f"{path}: not valid JSON ({error})") from None
    except OSError as error:
        raise AdapterFormatError(f"{path}: cannot be read ({error})") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        found = raw.get("peft_type") if isinstance(raw, dict) else type(raw).__name__
        raise AdapterFormatError(f"{path}: `peft_type` is {found!r}; only LoRA adapters ('LORA') can be loaded")
    for key, default in _UNSUPPORTED.items():
        if raw.get(key, default) not in (default, None):
            raise AdapterFormatError(f"{path}: `{key}`={raw[key]!r} is not supported (only {default!r});"
                                     " save the adapter without it")
    return path, raw


def _config_from(path: Path, raw: Dict[str, Any], overrides: Dict[str, Any]) -> LoRAConfig:
    fields = {key: raw[key] for key in ("r", "lora_alpha", "lora_dropout", "use_rslora") if key in raw}
    modules_to_save = raw.get("modules_to_save")
    if modules_to_save is not None and not (isinstance(modules_to_save, list) and all(isinstance(n, str) for n in modules_to_save)):
        raise AdapterFormatError(f"{path}: `modules_to_save` must be a list of module names or null, got {modules_to_save!r}")
    fields["modules_to_save"] = tuple(modules_to_save) if modules_to_save else None
    fields.update(overrides)
    try:
        return LoRAConfig(**fields)
    except (ValueError, TypeError) as error:
        raise AdapterFormatError(f"{path}: {error}") from None


def _peft_matcher(path: Path, raw: Dict[str, Any], key: str):
    """PEFT's test of a module name against ``target_modules``/``exclude_modules``: a
    string is a regex the whole name must match, a list holds names or name suffixes.
    ``None`` where the file leaves it open (null, or PEFT's ``"all-linear"``)."""
    value = raw.get(key)
    if value is None or value == "all-linear":
        return None
    if isinstance(value, str):
        try:
            pattern = re.compile(value)
        except re.error as error:
            raise AdapterFormatError(f"{path}: `{key}` {value!r} is not a valid regular expression ({error})") from None
        return lambda name: pattern.fullmatch(name) is not None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return lambda name: any(name == v or name.endswith("." + v) for v in value)
    raise AdapterFormatError(f"{path}: `{key}` must be a regex, a list of module names or null, got {value!r}")


def _check_adapted_layer(path: Path, name: str, layer: nn.Module, embedding_keys: bool, targets, excluded, raw) -> None:
    packed = compressible_attention(layer) or not isinstance(layer, nn.MultiheadAttention)
    if not isinstance(layer, ADAPTABLE_TYPES) or getattr(layer, "groups", 1) != 1 or not packed:
        raise AdapterFormatError(f"{path}: the file holds an adapter for {name!r}, a {type(layer).__name__};"
                                 " LoRA adapts Linear, Embedding, (groups=1) Conv and nn.MultiheadAttention layers"
                                 " (with one packed in_proj_weight)")
    if embedding_keys != isinstance(layer, nn.Embedding):
        expected = "lora_embedding_A/B" if isinstance(layer, nn.Embedding) else "lora_A.weight/lora_B.weight"
        raise AdapterFormatError(f"{path}: layer {name!r} is a {type(layer).__name__}, whose adapter tensors are"
                                 f" named {expected}; the file's are not")
    if (targets is not None and not targets(name)) or (excluded is not None and excluded(name)):
        raise AdapterFormatError(
            f"{path}: the file holds an adapter for {name!r}, a layer {ADAPTER_CONFIG} does not target"
            f" (target_modules={raw.get('target_modules')!r}, exclude_modules={raw.get('exclude_modules')!r});"
            " the two files do not belong together"
        )


def _check_values(path: Path, what: str, tensor: torch.Tensor, like: torch.Tensor | torch.dtype) -> None:
    floating = (like if isinstance(like, torch.dtype) else like.dtype).is_floating_point
    if tensor.is_floating_point() != floating:
        raise AdapterFormatError(f"{path}: {what} is {tensor.dtype}, the model's is"
                                 f" {'a float' if floating else 'an integer'} tensor")
    if floating and not torch.isfinite(tensor).all():
        raise AdapterFormatError(f"{path}: {what} holds NaN or Inf values; the file is corrupted")


def _split_keys(path: Path, tensors: Dict[str, torch.Tensor]):
    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    styles: Dict[str, set] = {}
    module_tensors = {}
    for key, tensor in tensors.items():
        if not key.startswith(_PREFIX):
            raise AdapterFormatError(f"{path}: tensor {key!r} does not start with {_PREFIX!r}; not a PEFT adapter file")
        name = key[len(_PREFIX):]
        match = _ADAPTER_KEY.match(name)
        if match:
            pairs.setdefault(match["layer"], {})[match["ab"] or match["eab"]] = tensor
            styles.setdefault(match["layer"], set()).add(match["eab"] is not None)
        else:
            module_tensors[name] = tensor
    for layer, found in pairs.items():
        if set(found) != {"A", "B"}:
            lacking = "B" if "A" in found else "A"
            raise AdapterFormatError(f"{path}: layer {layer!r} has no lora_{lacking} tensor; the file is incomplete")
        if len(styles[layer]) > 1:
            raise AdapterFormatError(f"{path}: layer {layer!r} has both lora_A/B.weight and lora_embedding_A/B tensors")
    return {layer: (found["A"], found["B"], True in styles[layer]) for layer, found in pairs.items()}, module_tensors


def _module(path: Path, named: Dict[str, nn.Module], name: str) -> nn.Module:
    if name not in named:
        names = [n for n in named if n]
        raise AdapterFormatError(f"{path}: the model has no module {name!r}." + close_names_hint(name, names))
    return named[name]


def _module_tensor_owners(path: Path, named: Dict[str, nn.Module], module_tensors: Dict[str, torch.Tensor],
                          modules_to_save, adapted: set):
    """``{key: (module name, tensor name)}`` for ``modules_to_save`` tensors, checked: each
    lies in a module the config's ``modules_to_save`` names (or under one), is not an
    adapted layer, exists in the model and has its shape and kind."""
    owners = {}
    for key, tensor in module_tensors.items():
        module_name, _, tensor_name = key.rpartition(".")
        parts = module_name.split(".")
        owners_of_key = [".".join(parts[:i]) for i in range(1, len(parts) + 1)] if module_name else [""]
        if not any(name_matches(owner, pattern) for owner in owners_of_key for pattern in modules_to_save or ()):
            raise AdapterFormatError(
                f"{path}: tensor {_PREFIX + key!r} is neither a LoRA weight (lora_A/lora_B) nor part of the"
                f" `modules_to_save` of {ADAPTER_CONFIG} ({modules_to_save!r}); refusing to overwrite the model's"
                " weights with it. Save the adapter again with only its adapters, or list the module in"
                " `modules_to_save`"
            )
        if any(owner in adapted for owner in owners_of_key):
            raise AdapterFormatError(f"{path}: {key!r} belongs to a layer that also holds an adapter in the file;"
                                     " a module either trains fully or gets an adapter")
        module = _module(path, named, module_name)
        state = module.state_dict(keep_vars=True)
        if tensor_name not in state:
            raise AdapterFormatError(f"{path}: module {module_name!r} has no tensor {tensor_name!r}")
        if tuple(state[tensor_name].shape) != tuple(tensor.shape):
            raise AdapterFormatError(
                f"{path}: {key!r} has shape {tuple(tensor.shape)}, the model's is {tuple(state[tensor_name].shape)}"
            )
        _check_values(path, repr(key), tensor, state[tensor_name])
        owners[key] = (module_name, tensor_name)
    return owners


def _target_modules(model: nn.Module, names: list):
    """PEFT's ``target_modules`` for exactly ``names``: the list itself unless PEFT's suffix
    matching would also catch another module (then an anchored regex)."""
    chosen = set(names)
    others = [n for n, _ in model.named_modules() if n and n not in chosen]
    if any(other.endswith("." + name) for other in others for name in names):
        return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"
    return sorted(names)


def peft_root_of(module: nn.Module, peft_root: str | None) -> nn.Module:
    """The submodule ``peft_root`` names (the module whose names PEFT's files use), or
    ``module`` itself for ``None``.

    Raises:
        ArgumentError: ``peft_root`` names no submodule, with the close names.
    """
    if peft_root is None:
        return module
    try:
        return module.get_submodule(peft_root)
    except AttributeError:
        names = [name for name, _ in module.named_modules() if name]
        raise ArgumentError("peft_root", f"`peft_root`={peft_root!r} is no submodule of"
                            f" {type(module).__name__}.{close_names_hint(peft_root, names)}") from None
