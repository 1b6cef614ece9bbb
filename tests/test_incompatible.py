"""Layers a callback cannot compress: every one named in one error before training, or left
out with ``on_incompatible="skip"`` (one warning, counted in the report).

The model is the ConvNet users bring (first Conv2d on 3 input channels, BatchNorm, a
residual block with a depthwise and a grouped convolution, Linear layers), trained with
the ready ``sparse24_int4`` recipe (2:4 pruning, int4 groups of 128) by a real Trainer.
Before this check it took one run per layer to find what to exclude.
"""

from __future__ import annotations

import json
import re
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch import nn

from lightning_compress import (
    ArgumentError,
    CompressedExport,
    IncompatibleLayersSkipped,
    IncompatibleSettings,
    LoRA,
    MagnitudePruning,
    QuantizationAwareTraining,
    RecipeError,
    from_recipe,
    load_recipe,
    quantized_weights,
)
from lightning_compress.core.transforms import Stage, get_weight_transform
from lightning_compress.formats.packed import METADATA_FILE
from tests.conftest import TinyRegressor, make_trainer, tiny_loader

# What `sparse24_int4` (2:4, int4 g128) cannot do on ConvNet(128): the inputs of 'stem'
# (3 channels x 3x3) and 'head' (30) hold neither 2:4 blocks nor groups of 128. The
# depthwise conv (1 input per group, 9 per kernel) and the grouped one (64 x 9 = 576
# inputs) are selected by type (the default targets), so they are left out with a
# warning instead; 2:4 fits the grouped conv (64 inputs per group).
ERRORS = {"pruning": ["stem", "head"], "qat": ["stem", "head"]}
BY_TYPE = {"pruning": ["block.dw"], "qat": ["block.dw", "block.gc"]}


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)  # depthwise
        self.bn1 = nn.BatchNorm2d(channels)
        self.gc = nn.Conv2d(channels, channels, 3, padding=1, groups=2, bias=False)  # grouped
        self.bn2 = nn.BatchNorm2d(channels)
        self.pw = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        h = F.relu(self.bn1(self.dw(x)))
        h = F.relu(self.bn2(self.gc(h)))
        return x + self.pw(h)  # residual


class ConvNet(pl.LightningModule):
    def __init__(self, channels: int = 128, hidden: int = 30) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.block = Block(channels)
        self.neck = nn.Linear(channels, hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        h = self.block(F.relu(self.bn(self.stem(x))))
        return self.head(F.relu(self.neck(h.mean((2, 3)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def image_loader(batches: int = 4, batch_size: int = 4, size: int = 6):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batches * batch_size, 3, size, size, generator=generator)
    y = torch.randint(0, 10, (batches * batch_size,), generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


class RecordingLogger(Logger):
    """Keeps the metrics and tables it is given."""

    def __init__(self):
        super().__init__()
        self.metrics, self.tables = {}, {}

    name = property(lambda self: "recording")
    version = property(lambda self: 0)

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_table(self, key, columns, data):
        self.tables[key] = (columns, data)


def recipe_callbacks(tmp_path, *overrides):
    return from_recipe("sparse24_int4", overrides=[f"export.dirpath={tmp_path / 'out'}", *overrides])


def fit(callbacks, model=None, steps=4, **trainer_options):
    pl.seed_everything(0, verbose=False)
    model = model or ConvNet()
    trainer = make_trainer(callbacks=callbacks, max_steps=steps, **trainer_options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, image_loader())
    skipped = [str(w.message) for w in caught if issubclass(w.category, IncompatibleLayersSkipped)]
    return model, trainer, skipped


def refused(callbacks, model_class=ConvNet) -> str:
    """The one error of a fit, the same in both callback orders; nothing trained."""
    messages = []
    for order in (list(callbacks), list(reversed(callbacks))):
        pl.seed_everything(0, verbose=False)
        model = model_class()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        trainer = make_trainer(callbacks=order, max_steps=2)
        with pytest.raises(IncompatibleSettings) as info:
            trainer.fit(model, image_loader())
        assert trainer.global_step == 0
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    return messages[0]


def suggested_excludes(message: str) -> dict:
    """``{section: [names]}`` from the message's ``Fix: add exclude=[...] to X (recipe key s.exclude)``."""
    found = re.findall(r"(exclude(?:_modules)?)=(\[[^\]]*\]) to [\w(),'= ]+? \(recipe key (\w+)\.\1\)", message)
    return {section: eval(names) for _, names, section in found}  # noqa: S307 (a list of names we wrote)


def listed_layers(message: str, header: str) -> list:
    """The layers listed under the block that starts with ``header``."""
    block = message.split(header, 1)[1].split("\n- ", 1)[0].split("\nFix:", 1)[0]
    return re.findall(r"^\s+- '([^']+)'", block, re.M) or re.findall(r"^ layer '([^']+)'", block)


def on_int_grid(model, name, bits=4):
    """Whether ``name``'s effective weight is exactly its integer codes times the scales."""
    quantized = quantized_weights(model).get(name)
    if quantized is None:
        return False
    layer = model.get_submodule(name)
    return bool(quantized.codes.abs().max() <= 2 ** (bits - 1)) and torch.equal(
        quantized.dequantize(), layer.weight.detach())


def raw(model, name):
    """The stored weight (pruning zeroes it; QAT rounds only the effective one)."""
    return model.get_submodule(name)._parameters["weight"].detach()


def is_two_four(weight) -> bool:
    """Exactly 2 zeros in every 4 consecutive inputs (per group for a grouped conv)."""
    blocks = weight.detach().movedim(1, -1).reshape(-1, 4)
    return bool(((blocks == 0).sum(dim=1) == 2).all())


# ---------------------------------------------------------------------- all problems at once
def test_the_ready_recipe_on_a_convnet_names_every_layer_in_one_error_and_the_fix_runs(tmp_path):
    message = refused(recipe_callbacks(tmp_path))
    assert message.startswith("2 problems stop this run before training")
    assert listed_layers(message, "MagnitudePruning(pattern='2:4') cannot prune") == ERRORS["pruning"]
    assert listed_layers(message, "QuantizationAwareTraining(group_size=128) cannot quantize") == ERRORS["qat"]
    assert "layer 'head' has input size 30, not divisible by M=4 of pattern '2:4'" in message
    assert "`group_size`=128 does not divide the input size 27 of layer 'stem'" in message
    assert not any(name in message for name in ("block.dw", "block.gc", "block.pw", "neck"))
    assert suggested_excludes(message) == ERRORS
    assert "pass on_incompatible='skip' to MagnitudePruning and QuantizationAwareTraining (recipe keys" \
           " pruning.on_incompatible, qat.on_incompatible)" in message
    assert not (tmp_path / "out").exists()
    # One setting behind every layer of a callback comes first (a new user was told to
    # exclude every layer but one of a tiny model, not to change group_size).
    assert "Fix: change `pattern` of MagnitudePruning (recipe key pruning.pattern) and `group_size` of" \
           " QuantizationAwareTraining (recipe key qat.group_size) to values every layer above takes; or add" \
           " exclude=['stem', 'head'] to MagnitudePruning" in message

    # The second run, with what the message said: it trains and exports.
    overrides = [f"{section}.exclude=[{','.join(names)}]" for section, names in ERRORS.items()]
    model, trainer, skipped = fit(recipe_callbacks(tmp_path, *overrides))
    assert trainer.global_step == 4 and (tmp_path / "out" / METADATA_FILE).is_file()
    assert len(skipped) == 1  # the grouped convolutions selected by type, in one warning
    assert "block.dw" in skipped[0] and "block.gc" in skipped[0]


def test_layer_problems_and_conflicts_of_every_callback_come_in_one_message(tmp_path):
    callbacks = [
        MagnitudePruning(pattern="2:4", targets=[nn.Conv2d, "neck", "head"]),
        QuantizationAwareTraining("int4", group_size=2, exclude=["block.dw", "block.gc", "stem"]),
        LoRA(r=2, lora_dropout=0.1, target_modules=["neck"]),
        CompressedExport(tmp_path / "out", formats=["safetensors", "onnx"]),
    ]
    message = refused(callbacks)
    assert message.startswith("5 problems stop this run before training")
    assert listed_layers(message, "MagnitudePruning(pattern='2:4') cannot prune") == ["stem", "head"]
    # The cross-callback rules, on every layer they concern (not the first only):
    assert "MagnitudePruning(pattern='2:4') and QuantizationAwareTraining(group_size=2) cannot be used together:" \
           " on layers 'block.pw' and 'neck', quantization groups of 2 inputs split the 4-input blocks" in message
    assert "LoRA(lora_dropout=0.1) and MagnitudePruning(targets=['Conv2d', 'neck', 'head']) cannot be used together" \
           in message and "the weight of 'neck'" in message
    assert "LoRA(lora_dropout=0.1) and QuantizationAwareTraining(targets=None) cannot be used together" in message
    assert "CompressedExport(formats=['safetensors', 'onnx']) and QuantizationAwareTraining(group_size=2) cannot be" \
           " used together: on layers 'neck' and 'head', QAT trains int4 g2 sym, which the ONNX export cannot write" \
           in message
    # One fix per callback, every name: the layers of the first two conflicts give way in pruning.
    assert suggested_excludes(message) == {"pruning": ["stem", "head", "block.pw", "neck"], "qat": ["neck", "head"]}
    # Changing pruning's pattern would not resolve the conflicts: no such shortcut is offered.
    assert "Fix: change" not in message


def test_recipe_check_names_every_combination_and_skip_resolves_them():
    with pytest.raises(RecipeError) as info:
        load_recipe({"pruning": {"pattern": "2:4"}, "qat": {"weights": "int4", "group_size": 2},
                     "lora": {"r": 4, "lora_dropout": 0.1}})
    message = str(info.value)
    assert message.startswith("3 combinations of this recipe cannot be used together:")
    assert "recipe keys pruning.pattern='2:4' and qat.group_size=2" in message
    assert "recipe keys lora.lora_dropout=0.1 and pruning.targets=None" in message
    assert "recipe keys lora.lora_dropout=0.1 and qat.targets=None" in message
    # A callback that may leave the layers out resolves them on the model instead.
    load_recipe({"pruning": {"pattern": "2:4", "on_incompatible": "skip"}, "qat": {"weights": "int4", "group_size": 2}})


# ---------------------------------------------------------------------- on_incompatible="skip"
def test_skip_trains_and_exports_with_the_layers_left_out_named_and_counted(tmp_path):
    logger = RecordingLogger()
    callbacks = recipe_callbacks(tmp_path, "pruning.on_incompatible=skip", "qat.on_incompatible=skip",
                                 "pruning.start_step=0", "pruning.end_step=2", "qat.start_step=2")
    model, trainer, warned = fit(callbacks, logger=logger, log_every_n_steps=1)
    pruning, qat = (next(cb for cb in callbacks if cb.section == s) for s in ("pruning", "qat"))
    left_out = {s: sorted(ERRORS[s] + BY_TYPE[s]) for s in ERRORS}
    assert sorted(pruning.skipped_layers) == left_out["pruning"] and sorted(qat.skipped_layers) == left_out["qat"]

    # Read the weights: the others are on the int4 grid / 2:4 sparse; those left out are not.
    assert sorted(quantized_weights(model)) == ["block.pw", "neck"]
    for name in ("block.pw", "neck"):
        assert on_int_grid(model, name)
    for name in left_out["qat"]:
        assert get_weight_transform(model.get_submodule(name), Stage.FAKE_QUANT) is None
        assert model.get_submodule(name).weight.detach().flatten().unique().numel() > 16
    for name in ("block.gc", "block.pw", "neck"):
        assert is_two_four(raw(model, name))
    for name in left_out["pruning"]:
        assert int((raw(model, name) == 0).sum()) == 0
    exported = json.loads((tmp_path / "out" / METADATA_FILE).read_text())
    assert sorted(exported["layers"]) == ["block.pw", "neck"]  # the rest is stored as float tensors
    assert {"stem.weight", "head.weight", "block.dw.weight", "block.gc.weight"} <= set(exported["tensors"])

    # One warning at setup, naming every layer left out under its callback, with why.
    assert len(warned) == 1
    text = warned[0]
    assert text.startswith("7 layers left out before training")
    pruning_part, qat_part = text.split("MagnitudePruning leaves 3 layers dense:")[1].split(
        "QuantizationAwareTraining leaves 4 layers in float:")
    assert sorted(re.findall(r"- '([^']+)'", pruning_part)) == left_out["pruning"]
    assert sorted(re.findall(r"- '([^']+)'", qat_part)) == left_out["qat"]
    assert "'head': layer 'head' has input size 30, not divisible by M=4" in pruning_part
    assert "'block.gc': `group_size`=128 does not divide the input size 576" in qat_part
    assert "(a grouped convolution selected by its type)" in qat_part

    # The report counts them: a logged count per callback, and the layer table's `skipped`.
    assert logger.metrics["pruning/skipped_layers"] == 3 and logger.metrics["qat/skipped_layers"] == 4
    columns, rows = logger.tables["compression/layers"]
    table = {row[0]: dict(zip(columns, row)) for row in rows}
    assert {name: row["skipped"] for name, row in table.items()} == {
        "stem": "pruning,qat", "block.dw": "pruning,qat", "block.gc": "qat", "block.pw": "", "neck": "",
        "head": "pruning,qat"}
    assert table["block.gc"]["weight_bits"] == 32 and table["block.gc"]["sparsity"] == 0.5
    assert table["head"]["weight_bits"] == 32 and table["head"]["sparsity"] == 0.0


def test_a_checkpoint_of_a_skip_run_exports_the_same_files(tmp_path):
    from lightning_compress.checkpoints import export_checkpoint

    callbacks = recipe_callbacks(tmp_path, "pruning.on_incompatible=skip", "qat.on_incompatible=skip",
                                 "pruning.end_step=2", "qat.start_step=2")
    _, trainer, _ = fit(callbacks)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IncompatibleLayersSkipped)  # the same layers, left out again
        export_checkpoint(tmp_path / "run.ckpt", ConvNet, output=tmp_path / "again")
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "out" / "model.safetensors").read_bytes()
    layers = [json.loads((tmp_path / d / METADATA_FILE).read_text())["layers"] for d in ("out", "again")]
    assert layers[0] == layers[1] and sorted(layers[0]) == ["block.pw", "neck"]


def test_skip_in_one_callback_leaves_the_layers_a_conflict_names_out_of_that_callback():
    # 2:4 blocks split by groups of 2 on every Linear: QAT (skip) leaves them in float.
    pruning = MagnitudePruning(pattern="2:4", targets=[nn.Linear], end_step=1)
    qat = QuantizationAwareTraining("int4", group_size=2, targets=["neck", "block.pw"], on_incompatible="skip")
    model, _, warned = fit([pruning, qat], model=ConvNet(16, hidden=32))
    assert qat.skipped_layers.keys() == {"neck"} and pruning.skipped_layers == {}
    assert sorted(quantized_weights(model)) == ["block.pw"]
    assert is_two_four(raw(model, "neck")) and is_two_four(raw(model, "head"))
    assert "QuantizationAwareTraining leaves 1 layer in float:\n  - 'neck': MagnitudePruning(pattern='2:4') and" \
           " QuantizationAwareTraining(group_size=2) cannot be used together: on layer 'neck'" in warned[0]

    # With skip on pruning (listed first in the conflict) pruning gives way instead.
    pruning = MagnitudePruning(pattern="2:4", targets=[nn.Linear], end_step=1, on_incompatible="skip")
    qat = QuantizationAwareTraining("int4", group_size=2, targets=["neck", "block.pw"], on_incompatible="skip")
    model, _, _ = fit([qat, pruning], model=ConvNet(16, hidden=32))
    assert pruning.skipped_layers.keys() == {"neck"} and qat.skipped_layers == {}
    assert sorted(quantized_weights(model)) == ["block.pw", "neck"]
    assert int((raw(model, "neck") == 0).sum()) == 0 and is_two_four(raw(model, "head"))


def test_lora_skip_leaves_layers_without_an_adapter():
    lora = LoRA(r=20, target_modules=[nn.Linear], on_incompatible="skip")  # head: 30 -> 10, smaller than r
    model, trainer, warned = fit([lora], model=ConvNet(32))
    assert set(lora.adapters) == {"neck"} and lora.skipped_layers.keys() == {"head"}
    assert not hasattr(model.head, "lora_A")
    assert "LoRA leaves 1 layer without an adapter:\n  - 'head': `r`=20 is larger than layer 'head'" in warned[0]
    assert trainer.callback_metrics["lora/skipped_layers"] == 1


def test_skip_that_leaves_a_callback_no_layer_is_refused():
    qat = QuantizationAwareTraining("int4", group_size=128, targets=["stem", "head"], on_incompatible="skip")
    message = refused([qat])
    assert message.startswith("QuantizationAwareTraining would compress no layer: it leaves out every layer its"
                              " targets select; change its settings or its `targets`:")
    assert re.findall(r"- '([^']+)'", message) == ["stem", "head"]
    assert "Fix:" not in message  # excluding every layer is no fix


def test_the_same_layers_are_left_out_when_the_trained_model_is_validated():
    qat = QuantizationAwareTraining("int4", group_size=16, on_incompatible="skip")
    model, trainer, _ = fit([qat], model=ConvNet(16, hidden=32))
    assert sorted(qat.skipped_layers) == ["block.dw", "block.gc", "stem"]
    before = sorted(quantized_weights(model))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        trainer.validate(model, image_loader(batches=1), verbose=False)
    assert sorted(qat.skipped_layers) == ["block.dw", "block.gc", "stem"]
    assert sorted(quantized_weights(model)) == before == ["block.pw", "head", "neck"]


def test_default_error_still_refuses_at_validate_every_layer_at_once():
    model = ConvNet(16, hidden=30)
    trainer = make_trainer(callbacks=[MagnitudePruning(pattern="2:4")])
    with pytest.raises(IncompatibleSettings) as info:
        trainer.validate(model, image_loader(batches=1), verbose=False)
    assert listed_layers(str(info.value), "MagnitudePruning(pattern='2:4') cannot prune") == ["stem", "head"]


# ---------------------------------------------------------------------- the argument itself
@pytest.mark.parametrize("callback", [QuantizationAwareTraining, MagnitudePruning, LoRA])
@pytest.mark.parametrize("value", ["Skip", "ignore", None, True])
def test_on_incompatible_must_be_error_or_skip(callback, value):
    with pytest.raises(ArgumentError, match=r"`on_incompatible` must be 'error' .* or 'skip' .*, got") as info:
        callback(on_incompatible=value)
    assert info.value.argument == "on_incompatible"
    assert callback().on_incompatible == "error"


def test_recipe_key_on_incompatible_is_validated():
    with pytest.raises(RecipeError, match=r"qat\.on_incompatible") as info:
        load_recipe({"qat": {"on_incompatible": "skipp"}})
    assert "'error'" in str(info.value) and "'skip'" in str(info.value)
    (qat,) = [cb for cb in from_recipe({"qat": {"on_incompatible": "skip"}}) if getattr(cb, "section", "") == "qat"]
    assert qat.on_incompatible == "skip"


def test_a_model_without_problems_gets_no_warning():
    _, _, warned = fit([QuantizationAwareTraining("int8")], model=TinyRegressorImages())
    assert warned == []


class TinyRegressorImages(ConvNet):
    """The ConvNet without its grouped convolutions: nothing to leave out at int8."""

    def __init__(self):
        super().__init__(channels=8)
        self.block = nn.Identity()


def test_tiny_regressor_unchanged_by_the_examination(seeded):
    # A stack without problems trains as before (no skip state, no extra metric).
    qat = QuantizationAwareTraining("int8")
    trainer = make_trainer(callbacks=[qat], max_steps=2)
    trainer.fit(TinyRegressor(), tiny_loader(batches=2))
    assert qat.skipped_layers == {} and "qat/skipped_layers" not in trainer.callback_metrics
