"""CompressionCallback: the lifecycle every compression method shares.

Each method (pruning, QAT, distillation, LoRA, export) is a subclass that fills in a few
hooks, the way Lightning's ``BaseFinetuning`` subclasses fill in
``freeze_before_training``/``finetune_function``:

- ``config_class``: the frozen dataclass of the method's arguments, validated once. The
  callback takes the config's fields as keyword arguments (its signature *is* the
  config's) or a built ``config=``; the fields read as the callback's attributes.
- :meth:`install`: select the layers and put the method's stages on them; it calls
  :meth:`finish_install` once they are in place (now, or after ``configure_model``).
- :meth:`method_state` / :meth:`restore`: the method's checkpoint state, stored under
  one versioned layout (``{"version": STATE_VERSION, ...}``) and applied once both the
  state and the installed stages exist, whichever comes first.
- :meth:`target_layers` / :meth:`uses_default_targets`: which layers its targets
  select, which the compatibility rules read through :meth:`selected_layers`;
  :meth:`select` is that selection less the layers left out before training (see
  :meth:`layer_issues` and ``on_incompatible``).

The base owns the rest: the stack check before any callback changes the model, the
owner token that tells this callback's stages from a rival's, logging once per step, the
run length fractional steps resolve against (``RunLength``), and the layer table at the end.
"""

from __future__ import annotations

import difflib
import inspect
import typing
import uuid
import weakref
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from typing_extensions import override

from lightning_compress.callbacks.compatibility import EVERY_LAYER, prepare_stack
from lightning_compress.callbacks.hooks import after_configure_model, overrides_configure_model, refuse_late_layers
from lightning_compress.core.incompatible import LayerIssue
from lightning_compress.core.reporting import expect_layer_table, report_layer_table
from lightning_compress.core.schedule import RunLength
from lightning_compress.core.state import STATE_VERSION, check_state_version, plain_setting
from lightning_compress.core.targeting import select_layers
from lightning_compress.core.transforms import bind_owner, owner_tokens
from lightning_compress.core.validate import ArgumentError, plain_values


class CompressionCallback(Callback):
    """Base class of the lightning-compress callbacks.

    Subclasses set ``section`` (the recipe section and registry name) and
    ``config_class``, and fill in :meth:`install`, :meth:`is_set_up`,
    :meth:`method_state`, :meth:`check_state`, :meth:`restore` and :meth:`select` as
    their method needs.

    Args:
        *args, **kwargs: the fields of ``config_class``.
        config: a built ``config_class`` instance instead of the fields.

    Raises:
        ArgumentError: (a ``ValueError``) for a bad argument, naming it; or for
            ``config`` together with fields.
    """

    section: ClassVar[str] = ""
    config_class: ClassVar[Optional[type]] = None
    resume_settings: ClassVar[Tuple[str, ...]] = ()  # config fields shaping the trained state: a resume must match
    # Of those, added later and changing only how training steps compute: {field: the value of a
    # checkpoint that records the others but not it}; an evaluation does not check them.
    training_settings: ClassVar[Mapping[str, Any]] = {}
    stateful: ClassVar[bool] = True  # False: a method that keeps nothing in checkpoints (the export)

    def __init__(self, *args: Any, config: Any = None, **kwargs: Any) -> None:
        cls = type(self).config_class
        if config is None:
            bound = _bind(type(self), cls, args, kwargs)
            config = cls(*plain_values(bound.args), **plain_values(bound.kwargs))
        elif args or kwargs:
            raise ArgumentError("config", f"pass either `config` or {type(self).__name__}'s arguments, not both")
        elif not isinstance(config, cls):
            raise ArgumentError("config", f"`config` must be a {cls.__name__}, got {type(config).__name__}")
        self.config = config
        self.owner_token = uuid.uuid4().hex
        self._layers: Dict[str, nn.Module] = {}  # the layers this callback has set up, by name
        self._restored: Optional[Dict[str, Any]] = None
        self._last_logged_step = -1
        self._skipped: Dict[str, str] = {}  # layers its targets select but it leaves out, with why
        self._examined: Optional[weakref.ref] = None  # the model those were decided on
        self.run_length = RunLength()  # what fractional steps resolve against, checkpointed

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.config_class is not None:
            own = vars(cls).get("__init__")
            if own is None:  # a wrapper of its own, to carry this class's config signature

                def own(self, *args: Any, **kwargs: Any) -> None:
                    super(cls, self).__init__(*args, **kwargs)

                own.__qualname__ = f"{cls.__qualname__}.__init__"
                cls.__init__ = own
            _take_config_signature(own, cls)

    def __getattr__(self, name: str) -> Any:
        # The config's fields read as the callback's attributes (`qat.start_step`).
        config = self.__dict__.get("config")
        if config is not None and name in getattr(config, "__dataclass_fields__", {}):
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        # The config is the source of truth: an attribute of the same name would shadow it
        # for this callback only, while checks and records read the config.
        config = self.__dict__.get("config")
        if config is not None and name in getattr(config, "__dataclass_fields__", {}):
            raise AttributeError(
                f"{type(self).__name__}.{name} comes from its frozen config; build a new callback, e.g."
                f" {type(self).__name__}(config=dataclasses.replace(callback.config, {name}=...))"
            )
        super().__setattr__(name, value)

    @property
    def state_key(self) -> str:
        # Stable across changed settings, so a resume with other settings finds the state
        # and `restore` can say what changed instead of silently starting over.
        return self._generate_state_key(name=self.config.name)

    # ------------------------------------------------------------------ hooks to fill in
    def install(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Select the layers and put this method's stages on them, then call
        :meth:`finish_install`. Runs in ``setup`` after the stack check."""

    def set_up_layers(self) -> Dict[str, nn.Module]:
        """The layers this callback has put its stages on, by name."""
        return dict(self._layers)

    def is_set_up(self) -> bool:
        """Whether the stages are in place (restored state can be applied)."""
        return bool(self._layers)

    def method_state(self) -> Dict[str, Any]:
        """This method's checkpoint state (without the version)."""
        return {}

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Refuse, when it is loaded, checkpoint ``state`` that cannot fit these settings
        (before any model exists to apply it to).

        Raises:
            ValueError: naming the setting to change.
        """

    def state_differences(self, state: Mapping[str, Any]) -> List[str]:
        """How checkpoint ``state`` differs from the installed stages (per layer), listed
        with the changed settings in one error; :meth:`restore` refuses them too."""
        return []

    def restore(self, state: Mapping[str, Any]) -> None:
        """Apply checkpoint ``state`` to the installed stages.

        Raises:
            ValueError: when the state does not fit this callback's settings.
        """

    def target_layers(self, model: nn.Module) -> Optional[Dict[str, nn.Module]]:
        """``{name: layer}`` of the layers this callback's targets select in ``model``;
        ``None`` for a method that does not compress layers itself (distillation, the
        export).

        Raises:
            ValueError: for targets that match nothing.
        """
        return None

    def layer_issues(self, layers: Mapping[str, nn.Module], model: nn.Module) -> Dict[str, LayerIssue]:
        """``{name: why}`` for the ``layers`` (of :meth:`target_layers` on ``model``) this
        method cannot compress with its settings; asked before training, before any
        callback changes the model. The config answers, layer by layer
        (``config.layer_issue``), then for what depends on the rest of the model
        (``config.model_issues``: where AWQ's scales would fold)."""
        issue_of = getattr(self.config, "layer_issue", None)
        issues = {} if issue_of is None else {name: issue_of(name, layer) for name, layer in layers.items()}
        issues = {name: issue for name, issue in issues.items() if issue is not None}
        across = getattr(self.config, "model_issues", None)
        if across is not None:
            rest = {name: layer for name, layer in layers.items() if name not in issues}
            issues.update(across(model, rest))
        return issues

    @property
    def on_incompatible(self) -> str:
        """``"error"`` or ``"skip"``: what to do with layers the method cannot compress."""
        return getattr(self.config, "on_incompatible", "error")

    @property
    def skipped_layers(self) -> Dict[str, str]:
        """``{name: why}`` of the layers its targets select that this callback leaves out
        (``on_incompatible="skip"``, or a grouped convolution selected by type)."""
        return dict(self._skipped)

    def skip_layers(self, skipped: Mapping[str, str], model: nn.Module) -> None:
        """Leave ``skipped`` (``{name: why}``) of ``model`` out of :meth:`select` from now
        on (the compatibility check decides them before training; it replaces any earlier
        set)."""
        self._skipped = dict(skipped)
        self._examined = weakref.ref(model)

    def examined(self, model: nn.Module) -> bool:
        """Whether the compatibility check has decided this callback's layers of ``model``."""
        return self._examined is not None and self._examined() is model

    def select(self, model: nn.Module) -> Optional[Dict[str, nn.Module]]:
        """``{name: layer}`` of the layers this callback compresses in ``model``: those of
        :meth:`target_layers` less :attr:`skipped_layers`.

        Raises:
            ValueError: for targets that match nothing or layers the method cannot take.
        """
        layers = self.target_layers(model)
        if layers is None or not self._skipped:
            return layers
        return {name: layer for name, layer in layers.items() if name not in self._skipped}

    def uses_default_targets(self) -> bool:
        """Whether the callback compresses every layer of its default types."""
        return False

    def selected_layers(
        self, model: Optional[nn.Module], *, targeted: bool = False
    ) -> Optional[Dict[str, Optional[nn.Module]]]:
        """What :meth:`select` (``targeted``: :meth:`target_layers`) answers, for the
        compatibility rules: ``None`` when unknown (bad targets, which the callback's own
        setup reports). Without a model (a recipe), a callback on its default targets
        answers ``{EVERY_LAYER: None}``."""
        if model is None:
            return {EVERY_LAYER: None} if self.uses_default_targets() else None
        try:
            return self.target_layers(model) if targeted else self.select(model)
        except ValueError:
            return None

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.run_length.begin(stage)  # before a checkpoint's state, restored after setup
        self._evaluating = stage != "fit"
        prepare_stack(trainer, pl_module, stage)
        self.install(trainer, pl_module, stage)
        if overrides_configure_model(pl_module):  # a layer it builds would come after this setup
            after_configure_model(pl_module, lambda: refuse_late_layers(self, pl_module))

    def finish_install(self, pl_module: nn.Module) -> None:
        """Record that this callback set up ``pl_module`` and apply checkpoint state that
        arrived before the stages existed."""
        bind_owner(pl_module, self.owner_token)
        if self._restored is not None:
            state, self._restored = self._restored, None
            self._restore_checked(state)

    def rivals(self, trainer: Trainer) -> set:
        """Owner tokens of the other compression callbacks of ``trainer``: their stages
        are conflicts; stages of anyone else (an earlier Trainer's) may be replaced."""
        return owner_tokens(trainer.callbacks) - {self.owner_token}

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        expect_layer_table(trainer)
        self._last_logged_step = -1

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Before any subclass work (a LoRA merge) changes the model.
        report_layer_table(trainer, pl_module, _skipped_by_layer(trainer.callbacks))

    def log_once(self, pl_module: LightningModule, step: int, metrics: Dict[str, float]) -> None:
        """Log ``metrics`` at the first batch of optimizer step ``step`` only (gradient
        accumulation runs several batches per step), with ``<section>/skipped_layers``
        when layers were left out."""
        if step != self._last_logged_step:
            self._last_logged_step = step
            if self._skipped:
                metrics = {**metrics, f"{self.section}/skipped_layers": float(len(self._skipped))}
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ checkpoint
    @override
    def state_dict(self) -> Dict[str, Any]:
        if not self.stateful:
            return {}
        if self._restored is not None and not self.is_set_up():
            return self._restored  # loaded but not applied yet: passed on unchanged
        state = {"version": STATE_VERSION, **self.method_state(), **self.run_length.state()}
        if self.resume_settings:
            state["settings"] = self._settings()
        return state

    @override
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if not self.stateful:
            return
        name = type(self).__name__
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"the checkpoint's {name} state is a {type(state_dict).__name__}, not a mapping; {_FOREIGN}")
        check_state_version(name, state_dict)
        self._check_settings(state_dict)
        self._guarded(self.check_state, state_dict)
        self.run_length.load(name, state_dict.get("total_steps"))
        self._restored = state_dict
        if self.is_set_up():  # restored after setup (the usual order): apply now
            state, self._restored = self._restored, None
            self._restore_checked(state)

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: Dict[str, Any]) -> None:
        # A run resumed without a method it was trained with would continue without it in
        # silence (dense again, or in float); refuse, naming it.
        if getattr(trainer.state, "fn", None) != "fit":
            return  # evaluating or exporting: a subset of the methods may be rebuilt on purpose
        taken = {getattr(cb, "state_key", None) for cb in trainer.callbacks}
        left = [key for key in (checkpoint.get("callbacks") or {}) if key not in taken and _method_name(key)]
        if left:
            raise ValueError(
                f"the checkpoint holds state of {', '.join(sorted({_method_name(k) for k in left}))} ({left}) but no"
                " callback of this Trainer takes it, so the resumed run would continue without that method;"
                " resume with the callbacks (or the recipe) the run was trained with, with the same `name`"
            )

    def _settings(self) -> Dict[str, Any]:
        return {field: plain_setting(getattr(self.config, field)) for field in self.resume_settings}

    def _check_settings(self, state: Mapping[str, Any]) -> None:
        saved = state.get("settings") or {}  # None: written before settings were recorded
        if not isinstance(saved, Mapping):
            raise ValueError(f"the checkpoint's {type(self).__name__} settings are malformed; {_FOREIGN}")
        now = self._settings()
        saved = {**{k: plain_setting(v) for k, v in self.training_settings.items() if saved}, **saved}
        changed = [f"`{k}`: {saved[k]!r} in the checkpoint, {now[k]!r} now" for k in now if k in saved and saved[k] != now[k]
                   and not (k in self.training_settings and getattr(self, "_evaluating", False))]
        if changed and self.is_set_up():  # every difference in one error, the installed layers' too
            self._guarded(lambda state: changed.extend(self.state_differences(state)), state)
        if changed:
            raise ValueError(
                f"{type(self).__name__} was trained with other settings ({'; '.join(changed)}), so the resumed run"
                " would not continue the run it resumes; resume with the checkpoint's settings (the recipe stored in"
                " it), or start a new run from its weights"
            )

    def _restore_checked(self, state: Mapping[str, Any]) -> None:
        self._guarded(self.restore, state)

    def _guarded(self, step: Any, state: Mapping[str, Any]) -> None:
        # State that is not what this version writes (edited, truncated, from elsewhere)
        # fails with the callback named, not with a KeyError from deep inside.
        try:
            step(state)
        except (KeyError, TypeError, IndexError, AttributeError, RuntimeError) as err:
            raise ValueError(
                f"the checkpoint's {type(self).__name__} state is malformed ({type(err).__name__}: {err}); {_FOREIGN}"
            ) from None


_FOREIGN = "it was edited or written by something else; resume from a checkpoint this run wrote"


def _skipped_by_layer(callbacks: Any) -> Dict[str, List[str]]:
    """``{layer name or weight key (a recurrent layer's ``rnn.weight_ih_l0``): sections of
    the callbacks that left it out}``."""
    found: Dict[str, List[str]] = {}
    for callback in callbacks:
        for key in getattr(callback, "skipped_layers", None) or ():
            if callback.section not in found.setdefault(key, []):
                found[key].append(callback.section)
    return found


def _method_name(state_key: str) -> Optional[str]:
    """The compression method a checkpoint's callback-state key belongs to, if any."""
    for cls in _method_classes(CompressionCallback):
        if cls.stateful and state_key.startswith(cls.__qualname__ + "{"):
            return cls.__qualname__
    return None


def _method_classes(root: type) -> List[type]:
    found = []
    for cls in root.__subclasses__():
        found += ([cls] if cls.config_class is not None else []) + _method_classes(cls)
    return found


class LayerCompressionCallback(CompressionCallback):
    """A method that puts stages on layers its config's ``targets``/``exclude`` choose (layer types and/or
    name globs) among its ``supported_types``; by default every layer of its ``default_types``."""

    @override
    def target_layers(self, model: nn.Module) -> Dict[str, nn.Module]:
        config = self.config
        try:
            return select_layers(model, targets=config.targets, exclude=config.exclude,
                                 supported=config.supported_types, default=config.default_types)
        except ValueError as error:  # naming the callback: two of one class may target apart
            error.args = (f"{type(self).__name__}{f'(name={config.name!r})' if config.name else ''}: {error.args[0]}",)
            raise

    @override
    def uses_default_targets(self) -> bool:
        return self.config.targets is None and self.config.exclude is None


def _bind(callback: type, config_class: type, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    """``args``/``kwargs`` bound to the config's fields, or an ArgumentError that names the
    argument (with a close match for a misspelt keyword)."""
    signature = inspect.signature(config_class)
    unknown = [name for name in kwargs if name not in signature.parameters]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(signature.parameters), n=1)
        hint = f"; did you mean `{close[0]}`?" if close else f"; its arguments are {list(signature.parameters)}"
        raise ArgumentError(unknown[0], f"{callback.__name__} has no argument `{unknown[0]}`{hint}")
    try:
        return signature.bind(*args, **kwargs)
    except TypeError as err:  # too many positional arguments, or a required one missing
        missing = [n for n, p in signature.parameters.items() if p.default is p.empty and n not in kwargs]
        argument = missing[0] if missing and len(args) < len(missing) else "args"
        raise ArgumentError(argument, f"{callback.__name__}: {err}; see help({callback.__name__})") from None


def _take_config_signature(init: Any, cls: type) -> None:
    """Give ``cls.__init__`` the signature of its config's fields where it takes them as
    ``*args, **kwargs`` (``config=`` is accepted too), so ``help()``, IDEs and
    LightningCLI's ``init_args`` see the real arguments. Arguments a subclass adds by name
    (``def __init__(self, *args, extra=3, **kwargs)``) keep their place after them."""
    own = inspect.signature(init).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own):
        return  # a subclass that spells out its own arguments keeps its signature
    hints = typing.get_type_hints(cls.config_class)
    config_parameters = [
        p.replace(annotation=hints.get(p.name, p.annotation)) for p in inspect.signature(cls.config_class).parameters.values()
    ]
    added = [p for p in own if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in {c.name for c in config_parameters}]
    positional = [p for p in config_parameters if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    keyword = [p for p in config_parameters if p.kind is inspect.Parameter.KEYWORD_ONLY] + added
    if not any(p.kind is inspect.Parameter.KEYWORD_ONLY for p in config_parameters) and keyword:
        keyword = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in keyword]
    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *positional, *keyword]
    init.__signature__ = inspect.Signature(parameters)
    init.__annotations__ = {p.name: p.annotation for p in parameters[1:]}


__all__ = ["CompressionCallback", "LayerCompressionCallback"]
