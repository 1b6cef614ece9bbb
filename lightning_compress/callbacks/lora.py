"""LoRA: low-rank adapters (QLoRA with an NF4 base) on an unchanged LightningModule."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress.callbacks.averaging import check_averages_to_load, check_weight_averaging, drop_stale_averages
from lightning_compress.callbacks.base import CompressionCallback
from lightning_compress.callbacks.compatibility import settle_layers
from lightning_compress.callbacks.hooks import after_configure_model, overrides_configure_model
from lightning_compress.core.attention import out_proj_owner
from lightning_compress.core.incompatible import LayerIssue
from lightning_compress.core.sharding import is_shard, saves_distributed_checkpoint
from lightning_compress.core.targeting import match_modules
from lightning_compress.core.transforms import is_bound
from lightning_compress.core.validate import ArgumentError
from lightning_compress.formats.peft import load_adapters, peft_root_of, read_adapter_config, save_adapters
from lightning_compress.formats.peft_attention import peft_unpaired
from lightning_compress.lora.adapter import MERGED_MARK, DropoutRNG, LoRAAdapter, adapter_of, check_on_model
from lightning_compress.lora.checkpoint import (check_checkpoint_adapters, check_merged_reload, check_merged_resume,
                                                weights_fingerprint, wrap_on_load_checkpoint)
from lightning_compress.lora.config import LoRAConfig
from lightning_compress.lora.inject import (check_nf4_shardable, inject_adapters, merge_into, parameter_counts,
                                             select_adapter_layers)
from lightning_compress.quant.nf4 import is_nf4, nf4_sharding_issue


class LoRA(CompressionCallback):
    r"""Fine-tune a pretrained model through low-rank adapters; everything else is frozen.

    Each targeted layer computes with ``W + scaling · B·A`` where ``A`` (``r × in``,
    Kaiming-initialised) and ``B`` (``out × r``, zeros) are new parameters registered on
    the layer as ``lora_A``/``lora_B`` (or those it holds already, from an earlier Trainer
    or ``load_adapters``) and ``scaling = lora_alpha / r``. They are added in
    ``setup`` (or right after your ``configure_model``), before ``configure_optimizers``
    runs, so your optimizer gets them; then every parameter except the adapters and
    ``modules_to_save`` is frozen and dropped from the optimizer. The adapter is the
    first stage of the weight-transform stack: pruning masks the merged weight and QAT
    fake-quantizes the masked merged weight, so the model that trains is the model that
    exports. With ``base="nf4"`` (QLoRA) the frozen weights of the adapted layers are
    stored in 4-bit NormalFloat with double-quantized block scales, and dequantized
    inside each matmul only.

    An ``nn.MultiheadAttention`` is adapted on its packed ``in_proj_weight`` (``A`` is
    ``r × E``, ``B`` is ``3E × r``: query, key and value in one, as PEFT), and its
    ``out_proj`` is a Linear of its own; the default targets adapt both, as PEFT does.
    The attention layer reads both weights itself, so it always computes with the merged
    weight (no branch, and no dropout there: as in PEFT).

    Example::

        lora = LoRA(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
        Trainer(callbacks=[lora]).fit(model, datamodule)
        lora.save_adapters("adapter/")      # PEFT format: PeftModel.from_pretrained(base, "adapter/")

    Args:
        r: adapter rank (> 0).
        lora_alpha: the numerator of the scaling.
        target_modules: layer types and/or name globs to adapt (a glob matches a whole
            name or its last parts, as PEFT's ``target_modules``: ``"query"`` matches
            ``encoder.layer.0.attention.self.query``). Linear, Embedding, Conv1d/2d/3d
            (``groups=1``) and ``nn.MultiheadAttention`` (packed ``in_proj_weight``)
            layers; default every Linear and attention layer outside ``modules_to_save``
            (so an attention layer's ``in_proj_weight`` and ``out_proj`` both). A grouped
            convolution a layer type selects is left out with a warning.
        lora_dropout: dropout probability on the adapter's input (Linear and Conv). It
            needs the adapter as a separate branch, so a layer that pruning or QAT also
            transforms cannot have it, and it does not act on attention layers (their
            ``in_proj_weight`` and ``out_proj``, read as weights; a warning names them).
            Drawn from a generator of its own, checkpointed with this callback, so a
            resumed run draws the same masks.
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)``.
        exclude_modules: layer types and/or name globs not to adapt.
        modules_to_save: names or globs of modules that train fully (a new head). The
            default targets leave them out; naming one in ``target_modules`` too is an error.
        base: ``"float"``, or ``"nf4"`` for QLoRA: the adapted layers' frozen weights are
            kept in NF4 (Linear layers and attention layers' ``in_proj_weight`` only).
        compute_dtype: for ``base="nf4"``: the dtype an adapted layer dequantizes its
            base to and computes in (e.g. ``torch.bfloat16``); its output is returned in
            the input's dtype. Default: the input's dtype. An attention layer dequantizes
            to its weights' own dtype.
        nf4_block_size, nf4_scaler_block_size: NF4 block of weights sharing one scale
            (64), and block of scales quantized together (256), as in the QLoRA paper.
        merge_on_fit_end: at the end of ``fit``, merge the adapters into the weights (in
            float32; an NF4 base is dequantized first; pruning masks are applied again),
            leaving your model's own classes and ``state_dict`` keys.
        adapter_dir: at the end of ``fit`` (before any merge), write the adapters there in
            PEFT's format. PEFT adapts an attention layer's two projections together only,
            so with ``adapter_dir`` an attention layer adapted without its ``out_proj`` (or
            an ``out_proj`` without its attention layer) is a layer LoRA cannot adapt,
            refused before training like the others (see ``on_incompatible``).
        peft_root: name of the submodule PEFT sees as the base model (``"model"`` when your
            LightningModule keeps a transformers model in ``self.model``); the names in
            the adapter files are relative to it. Default: the LightningModule.
        adapter_only_checkpoints: leave the frozen weights out of checkpoints (keeping
            adapters, ``modules_to_save`` and buffers). NF4 bases are always left out. A
            resume or ``ckpt_path=`` evaluation takes them from your module as built, and
            fails with a clear error if they differ from those trained on.
        on_incompatible: ``"error"`` (default): targeted layers LoRA cannot adapt (a
            grouped convolution, a layer smaller than ``r``, a layer an NF4 base cannot
            store, one projection of an attention layer with ``adapter_dir``) stop the run
            before training, all named in one
            ``IncompatibleSettings``; ``"skip"``: they get no adapter, named in one warning
            at setup and counted (``lora/skipped_layers``, the layer table's ``skipped``
            column). A grouped convolution selected by type is left out either way; one a
            name glob selects stays an error.
        name: distinguishes the checkpoint state of several LoRA callbacks in one Trainer;
            each needs its own (Lightning refuses two of one class without: "Found more than one stateful callback").
        config: a built :class:`~lightning_compress.LoRAConfig` instead of the arguments
            above.

    Raises:
        ArgumentError: (a ``ValueError``) at construction, naming a bad argument.
        IncompatibleSettings: (a ``ValueError``) at setup, naming every targeted layer
            LoRA cannot adapt (with ``on_incompatible="error"``).
        ValueError: at setup, for targets that match no adaptable layer, or adapters the
            model holds already that do not fit; when resuming, for a checkpoint of adapters
            with another rank, scaling, base or layers, or other frozen weights.
    """

    section = "lora"
    config_class = LoRAConfig
    # (`r`, the scaling, the base and the adapted layers have their own checks.)
    resume_settings = ("lora_dropout", "modules_to_save")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._module: LightningModule | None = None
        self._adapters: Dict[str, LoRAAdapter] = {}
        self._merged: list = []
        self._dropout = DropoutRNG(self.config.lora_dropout)
        self._dropped_keys: list = []
        self._fingerprint: tuple | None = None
        self._pending_adapter_dir: Path | None = None
        self._merge_after_load = False  # a merged model took adapters back for a checkpoint's values

    @override
    def set_up_layers(self) -> Dict[str, nn.Module]:
        return {name: adapter.layer for name, adapter in self._adapters.items()}

    @property
    def adapters(self) -> Dict[str, LoRAAdapter]:
        """``{layer name: adapter}`` of the model this callback adapts."""
        return dict(self._adapters)

    # ------------------------------------------------------------------ hooks
    @override
    def install(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Under ModelParallelStrategy `configure_model` shards the layers, so the adapters
        # (and NF4 bases) must exist before it: FSDP2 then shards them with the layer.
        # Layers built there too are adapted after it (refused if they are sharded then).
        early = isinstance(trainer.strategy, ModelParallelStrategy) and bool(self.selected_layers(pl_module))
        deferred = overrides_configure_model(pl_module) and not early
        self._note_outside_merge()
        merged = bool(self._merged) and self._module is pl_module and stage != "fit"
        check_weight_averaging(trainer, self, pl_module, stage, in_place=self._in_place(pl_module), deferred=deferred,
                               injects=not merged)
        if stage != "fit":
            drop_stale_averages(trainer, pl_module)
        wrap_on_load_checkpoint(pl_module, self._check_load, self._before_model_load)
        if self._in_place(pl_module):
            return  # a later validate/test/fit of the same model
        if merged:
            return  # merged: evaluate the merged model as it is (a checkpoint it loads puts adapters back)
        if deferred:
            after_configure_model(pl_module, lambda: self._inject(trainer, pl_module))
        else:
            self._inject(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                # Frozen parameters would never move; keeping them only costs every step.
                group["params"] = [p for p in group["params"] if p.requires_grad]

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        counts = parameter_counts(pl_module)
        metrics = {f"lora/{key}": float(counts[key]) for key in ("trainable_params", "trainable_share", "base_weight_bytes")}
        if self.skipped_layers:
            metrics["lora/skipped_layers"] = float(len(self.skipped_layers))
        pl_module.log_dict(metrics, on_step=False, on_epoch=True)
        rank_zero_info(f"LoRA: {len(self._adapters)} adapted layers; {counts['trainable_params']:,} trainable of"
                       f" {counts['total_params']:,} parameters ({counts['trainable_share']:.2%}); frozen weights"
                       f" {counts['base_weight_bytes'] / 2**20:.1f} MiB")

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)  # the layer table, before the merge removes the adapters
        if self.adapter_dir is not None and self._adapters:
            if trainer.is_global_zero:
                self.save_adapters(self.adapter_dir)
            trainer.strategy.barrier("lora_adapter_dir")
        if self.merge_on_fit_end and self._adapters:
            self.merge()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        pl_module.__dict__.pop("on_load_checkpoint", None)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "")  # Lightning skips teardown after an exception: no load hook left behind

    # ------------------------------------------------------------------ checkpoint
    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: Dict[str, Any]) -> None:
        # NF4 bases (which Lightning's loader cannot map to a device) and, with `adapter_only_checkpoints`, every
        # frozen weight stay out: they are rebuilt from the user's module, and a fingerprint proves they are the same
        # on resume. Not from a distributed checkpoint, which torch.distributed.checkpoint loads whole first.
        self._note_outside_merge()
        if self._adapters and not saves_distributed_checkpoint(trainer):
            for key in self._dropped_keys:
                checkpoint["state_dict"].pop(key, None)

    def _check_load(self, checkpoint: Dict[str, Any]) -> None:
        """Before any LoRA callback changes the model for ``checkpoint``: what a merged model cannot load."""
        trainer, state = getattr(self._module, "_trainer", None), checkpoint.get("callbacks", {}).get(self.state_key)
        self._note_outside_merge()
        check_merged_resume(state, getattr(getattr(trainer, "state", None), "fn", None))
        if self._merged and state and state.get("layers"):
            check_merged_reload(state)
            check_checkpoint_adapters(state, self.config, {}, self._module)

    def _before_model_load(self, checkpoint: Dict[str, Any]) -> None:
        """Runs just before Lightning loads the model's weights (from the module's ``on_load_checkpoint``, after
        every LoRA callback's :meth:`_check_load`): refuse a checkpoint of other adapters with a clear message, and
        put back the frozen weights the checkpoint leaves out."""
        trainer, state = getattr(self._module, "_trainer", None), checkpoint.get("callbacks", {}).get(self.state_key)
        reloading = bool(self._merged and trainer is not None and state and state.get("layers"))
        if reloading:  # merged since this checkpoint, which holds adapters: fresh ones take its values, merged after
            self._inject(trainer, self._module)
            self._merge_after_load = True
        elif self._adapters and state and not state.get("layers") and state.get("merged"):  # a merged model's checkpoint:
            self.merge()  # the fresh adapters (B = 0) merge into nothing, and the layers take its merged weights
        try:
            self._check_before_load(trainer, state, checkpoint)
        except BaseException:
            if reloading:  # refused with the fresh adapters on (B = 0): merged back, the model as it was
                self._merge_after_load = False
                self.merge()
            raise

    def _check_before_load(self, trainer: Trainer | None, state: Dict[str, Any] | None, checkpoint: Dict[str, Any]) -> None:
        if trainer is not None:  # a state no callback takes: named before torch's missing-key error
            self.on_load_checkpoint(trainer, self._module, checkpoint)
            check_averages_to_load(trainer, self, self._module, checkpoint)
        if not state or not self._adapters:
            return
        check_checkpoint_adapters(state, self.config, self._adapters, self._module)
        dropped = state.get("dropped_keys") or []
        if not dropped or "state_dict" not in checkpoint:  # a distributed checkpoint: loaded whole by the strategy
            return
        if state.get("base_fingerprint") != self._base_fingerprint(dropped):
            raise ValueError("the frozen base weights of this model differ from those the adapters in this checkpoint were"
                             " trained on; build the model from the same pretrained weights (or, where LoRA merged"
                             " its adapters into them since, use a model built anew)")
        current = self._module.state_dict(keep_vars=True)
        for key in dropped:
            checkpoint["state_dict"][key] = current[key]

    # ------------------------------------------------------------------ base-class hooks
    @override
    def target_layers(self, model: nn.Module) -> Dict[str, nn.Module]:
        # Each layer's fit is a layer issue (`LoRAConfig.layer_issue`), decided before training.
        return select_adapter_layers(model, self.config, check=False)

    @override
    def layer_issues(self, layers: Mapping[str, nn.Module], model: nn.Module) -> Dict[str, LayerIssue]:
        issues = super().layer_issues(layers, model)
        if self.adapter_dir is not None:
            for name, why in peft_unpaired(model, [n for n in layers if n not in issues]).items():
                issues[name] = LayerIssue("adapter_dir", str(self.adapter_dir), f"{why}; or set adapter_dir=None")
        return issues

    @override
    def uses_default_targets(self) -> bool:
        return self.config.target_modules is None and self.config.exclude_modules is None

    @override
    def is_set_up(self) -> bool:
        return bool(self._adapters)

    @override
    def method_state(self) -> Dict[str, Any]:
        self._note_outside_merge()  # Lightning takes the callbacks' states before their on_save_checkpoint
        return {
            "r": self.config.r,
            "scaling": self.config.scaling,
            "base": self.config.base,
            "layers": list(self._adapters),
            "merged": list(self._merged),
            "dropout": self._dropout.state_dict(),
            "dropped_keys": list(self._dropped_keys) if self._adapters else [],
            "base_fingerprint": self._base_fingerprint(self._dropped_keys) if self._adapters and self._dropped_keys else None,
        }

    @override
    def check_state(self, state: Dict[str, Any]) -> None:
        check_checkpoint_adapters(state, self.config, self._adapters, self._module)

    @override
    def restore(self, state: Dict[str, Any]) -> None:
        check_checkpoint_adapters(state, self.config, self._adapters, self._module)
        self._dropout.load_state_dict(state["dropout"])
        if self._merge_after_load:  # the weights are loaded (callback states come after them): merged as before
            self._merge_after_load = False  # an SWA listed later loads its average (with the adapters) into
            self._merge(copy_swa=False)  # its copy after this: that copy is not made again

    # ------------------------------------------------------------------ public helpers
    def merge(self) -> list:
        """Merge the adapters into the model's weights now (see ``merge_on_fit_end``).

        Raises:
            ValueError: nothing to merge: the adapters were merged already, or the
                callback has not set up a model yet.
        """
        return self._merge(copy_swa=True)

    def _merge(self, *, copy_swa: bool, merged_already: bool = False) -> list:
        if not merged_already:  # (`merge_adapters(model)` merged them)
            check_on_model(self._adapters, self._merged, "merge", "merge once")
            merge_into(self._module, self._adapters)
        self._merged, self._adapters = list(self._adapters), {}
        if getattr(self._module, "_trainer", None) is not None:  # a checkpoint saved now holds the merged model
            drop_stale_averages(self._module._trainer, self._module, copy_swa=copy_swa)
        return self._merged

    def _note_outside_merge(self) -> None:
        """Adapters of this callback that ``merge_adapters(model)`` merged: as if by :meth:`merge`."""
        if self._adapters and all(a.layer.__dict__.get(MERGED_MARK) and adapter_of(a.layer) is None
                                  for a in self._adapters.values()):
            self._merge(copy_swa=True, merged_already=True)

    def save_adapters(self, directory: str | Path) -> Path:
        """Write this callback's adapters (and ``modules_to_save``) in PEFT's format to ``directory``.

        Raises:
            ArgumentError: ``peft_root`` or ``modules_to_save`` cannot be written (checked before training too)
            ValueError: the adapters are merged, not set up yet, or taken over by another LoRA callback
        """
        check_on_model(self._adapters, self._merged, "save", "save before merging",
                       "save before merging, or with the LoRA callback that took them over")
        return save_adapters(self._checked_peft_root(), directory, self.config, only=self._adapters.values())

    def load_adapters(self, directory: str | Path) -> None:
        """Start from adapters saved in PEFT's format (ours or PEFT's own): loaded now if
        the adapters exist, else right after they are set up. The file's rank and scaling
        must match this callback's."""
        directory = Path(directory)
        saved = read_adapter_config(directory)
        if (saved.r, saved.scaling) != (self.config.r, self.config.scaling):
            raise ValueError(
                f"{directory} holds adapters with r={saved.r}, scaling={saved.scaling} but this callback has"
                f" r={self.config.r}, scaling={self.config.scaling}; build LoRA with the file's `r` and `lora_alpha`"
            )
        if self._adapters:
            load_adapters(self._peft_root(), directory)
        else:
            self._pending_adapter_dir = directory

    # ------------------------------------------------------------------ internals
    def _in_place(self, pl_module: LightningModule) -> bool:
        return bool(self._adapters) and self._module is pl_module and is_bound(pl_module, self.owner_token) and all(
            adapter_of(a.layer) is a for a in self._adapters.values())  # not a copy of the model (deepcopy)

    def _inject(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.examined(pl_module):  # its layers were built in `configure_model`, after the stack check
            settle_layers(self, pl_module)
        layers = self.select(pl_module)
        sharded = [name for name, layer in layers.items() if any(is_shard(p) for p in layer.parameters(recurse=False))]
        if sharded:
            raise ValueError(
                f"LoRA must add its adapters before `fully_shard`, but {sharded[:4]} are sharded already; build"
                " these layers in `__init__` and shard them in `configure_model` (under ModelParallelStrategy LoRA"
                " injects in `setup`, before `configure_model`)"
            )
        if self.config.base == "nf4" and isinstance(trainer.strategy, ModelParallelStrategy):
            if (issue := nf4_sharding_issue()) is not None:
                raise ValueError(issue)
            check_nf4_shardable(layers, self.config, trainer.strategy.device_mesh["data_parallel"].size())
        # Each rank draws its own dropout masks; seeded from the (seeded) global RNG.
        self._dropout.seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) + trainer.global_rank
        unpaired = peft_unpaired(pl_module, layers) if self.adapter_dir is not None else {}
        if unpaired:  # left unpaired by another layer's skip: the file written at the end would be refused
            raise ValueError(f"`adapter_dir`={str(self.adapter_dir)!r}: " + "; ".join(unpaired.values()))
        read = [n for n, layer in layers.items()
                if isinstance(layer, nn.MultiheadAttention) or out_proj_owner(pl_module, n) is not None]
        if self.lora_dropout > 0 and read:
            shown = f"{read[:6]}{' ...' if len(read) > 6 else ''}"
            rank_zero_warn(f"`lora_dropout`={self.lora_dropout} does not act on the projections of attention layers,"
                           f" which read their merged weights (as in PEFT): {shown}")
        if self.adapter_dir is not None:  # not after training, when the file is written
            self._checked_peft_root(pl_module, layers)
        rivals = self.rivals(trainer)
        # adapters an earlier stage left on the layers of this Trainer's other LoRA callbacks are theirs to take over
        theirs = {n for cb in trainer.callbacks if isinstance(cb, LoRA) and cb is not self for n in cb.select(pl_module)}
        self._adapters = inject_adapters(pl_module, self.config, layers, dropout=self._dropout, owner=self.owner_token,
                                         active_owners=rivals, rival_layers=theirs)
        self._module, self._merged, self._fingerprint = pl_module, [], None
        self._dropped_keys = [
            key
            for key, parameter in pl_module.named_parameters(remove_duplicate=False)
            if not parameter.requires_grad and (self.adapter_only_checkpoints or is_nf4(parameter))
        ]
        if self._pending_adapter_dir is not None:
            directory, self._pending_adapter_dir = self._pending_adapter_dir, None
            load_adapters(self._peft_root(), directory)
        self.finish_install(pl_module)

    def _peft_root(self, module: nn.Module | None = None) -> nn.Module:
        module = module if module is not None else self._module
        if module is None:
            raise ValueError("LoRA has not set up a model yet: call this after fit (or validate/test) starts")
        return peft_root_of(module, self.peft_root)

    def _checked_peft_root(self, module: nn.Module | None = None, layers: Dict[str, nn.Module] | None = None) -> nn.Module:
        """The PEFT root, holding every adapted layer (``layers``, by default those adapted)
        and every ``modules_to_save`` layer, whose names are matched inside it; checked
        before the adapters are added too, as the file is written after training."""
        root = self._peft_root(module)
        layers = {n: a.layer for n, a in self._adapters.items()} if layers is None else layers
        outside = [n for n, layer in layers.items() if not any(layer is m for m in root.modules())]
        if outside:
            raise ArgumentError("peft_root", f"adapters on {outside[:5]} lie outside `peft_root`={self.peft_root!r};"
                                " choose a root that holds every adapted layer")
        if self.config.modules_to_save and self.peft_root is not None:
            try:
                match_modules(root, self.config.modules_to_save, "modules_to_save")
            except ValueError as error:
                raise ArgumentError("modules_to_save", f"{error} (inside `peft_root`={self.peft_root!r}, where PEFT"
                                    " looks for them: a layer outside it cannot be written with the adapters)") from None
        return root

    def _base_fingerprint(self, keys) -> str:
        """SHA-256 of the frozen weights ``keys`` (an NF4 weight's codes and scales)."""
        if self._fingerprint is None or self._fingerprint[0] != tuple(keys):
            self._fingerprint = (tuple(keys), weights_fingerprint(self._module, keys))
        return self._fingerprint[1]
