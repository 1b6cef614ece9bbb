"""Settings of different callbacks that cannot work together are refused before training.

Each refusal: the message names both settings (as arguments, or as recipe keys), the
layer where there is one, and the fix; nothing trained (``global_step == 0``, weights as
built, no export written), whatever the order of the callbacks.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_compress import (
    CompressedExport,
    LoRA,
    MagnitudePruning,
    QuantizationAwareTraining,
    from_recipe,
)
from lightning_compress.callbacks.compatibility import IncompatibleSettings
from lightning_compress.recipes import RecipeError, load_recipe
from tests.cli_models import RecipeData, RecipeMLP
from tests.conftest import TinyRegressor, make_trainer, tiny_loader


def _refused(callbacks, *expected, model=None, error=IncompatibleSettings, tmp_path=None):
    """Fit ``callbacks`` in the given order and in reverse: both must fail before the first
    step with a message containing every ``expected`` piece. Returns the first message."""
    messages = []
    for order in (list(callbacks), list(reversed(callbacks))):
        torch.manual_seed(0)
        net = model() if model is not None else TinyRegressor()
        before = {key: value.clone() for key, value in net.state_dict().items()}
        trainer = make_trainer(callbacks=order, max_steps=4)
        with pytest.raises(error) as info:
            trainer.fit(net, tiny_loader(batches=4))
        message = str(info.value)
        for piece in expected:
            assert piece in message, (piece, message)
        assert trainer.global_step == 0
        assert sorted(net.state_dict()) == sorted(before)
        for key, value in before.items():
            assert torch.equal(net.state_dict()[key], value), key
        if tmp_path is not None:
            assert not (tmp_path / "out").exists()
        messages.append(message)
    assert messages[0] == messages[1]  # the same refusal whatever the order
    return messages[0]


def _recipe_refused(recipe, *expected):
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    message = str(info.value)
    for piece in expected:
        assert piece in message, (piece, message)
    return message


# ---------------------------------------------------------------------- N:M pruning and QAT groups
def test_nm_pruning_with_quantization_groups_that_split_its_blocks_is_refused():
    _refused(
        [MagnitudePruning(pattern="2:4", targets=["fc1", "fc2"]), QuantizationAwareTraining("int4", group_size=2)],
        "MagnitudePruning(pattern='2:4')",
        "QuantizationAwareTraining(group_size=2)",
        "on layers 'fc1' and 'fc2'",  # every layer, in one message
        "split the 4-input blocks",
        "group_size that is a multiple of 4 (e.g. 32, 64, 128) or granularity='channel'",
    )


def test_nm_pruning_with_an_override_group_that_splits_its_blocks_is_refused():
    qat = QuantizationAwareTraining("int4", group_size=4, overrides={"fc2": {"group_size": 2}})
    _refused(
        [MagnitudePruning(pattern="2:4", targets=["fc1", "fc2"]), qat],
        "QuantizationAwareTraining(overrides['fc2']='int4 g2 sym')",
        "on layer 'fc2'",
        "multiple of 4",
    )


def test_nm_pruning_and_quantization_groups_on_different_layers_train():
    # 2:4 on fc1 and g2 on fc2 only: no layer holds both, so nothing to refuse.
    callbacks = [
        MagnitudePruning(pattern="2:4", targets=["fc1"], start_step=0, end_step=2),
        QuantizationAwareTraining("int4", group_size=2, targets=["fc2"]),
    ]
    trainer = make_trainer(callbacks=callbacks, max_steps=3)
    trainer.fit(TinyRegressor(), tiny_loader(batches=3))
    assert trainer.global_step == 3
    recipe = {"pruning": {"pattern": "2:4", "targets": ["fc1"]}, "qat": {"weights": "int4", "group_size": 2, "targets": ["fc2"]}}
    load_recipe(recipe)  # nor in the recipe: its targets do not provably meet


def test_recipe_with_nm_pruning_and_splitting_groups_names_both_keys():
    _recipe_refused(
        {"pruning": {"pattern": "2:4"}, "qat": {"weights": "int4", "group_size": 2}},
        "recipe keys pruning.pattern='2:4' and qat.group_size=2",
        "on every layer both target",
        "multiple of 4",
    )
    load_recipe({"pruning": {"pattern": "2:4"}, "qat": {"weights": "int4", "group_size": 8}})


# ---------------------------------------------------------------------- LoRA dropout under pruning / QAT
def test_lora_dropout_on_a_layer_pruning_also_transforms_is_refused_at_setup():
    _refused(
        [LoRA(r=2, lora_dropout=0.1, target_modules=["fc1"]), MagnitudePruning(0.5, targets=["fc1", "fc2"])],
        "LoRA(lora_dropout=0.1)",
        "MagnitudePruning(targets=['fc1', 'fc2'])",
        "`lora_dropout`=0.1 acts on the adapter's input",
        "the weight of 'fc1'",
        "Set lora_dropout=0, or keep the adapted layers out of the other callback's targets",
    )


def test_recipe_with_lora_dropout_and_qat_on_every_layer_names_both_keys():
    _recipe_refused(
        {"lora": {"r": 4, "lora_dropout": 0.1}, "qat": {"weights": "int8"}},
        "recipe keys lora.lora_dropout=0.1 and qat.targets=None",
        "every Linear weight LoRA adapts",
        "Set lora_dropout=0",
    )
    load_recipe({"lora": {"r": 4, "lora_dropout": 0.1, "target_modules": ["fc1"]}, "qat": {"targets": ["fc2"]}})


# ---------------------------------------------------------------------- two grids for one layer
def test_two_quantizers_with_different_grids_on_one_layer_are_refused():
    # The second would replace the first's grid: trained at int8, exported at int4.
    _refused(
        [QuantizationAwareTraining("int8", targets=["fc1"], name="int8"),
         QuantizationAwareTraining("int4", group_size=8, targets=["fc1", "fc2"], name="int4")],
        "both quantize layer 'fc1' (int8 channel sym and int4 g8 sym)",
        "trained on one and exported on the other",
        "disjoint `targets`/`exclude`, or use one QuantizationAwareTraining with `overrides`",
    )


def test_export_with_other_qat_settings_than_the_checkpoint_was_trained_with_is_refused(tmp_path):
    from lightning_compress.checkpoints import export_checkpoint

    recipe = {"qat": {"weights": "int8"}, "export": {"dirpath": str(tmp_path / "packed")}}
    pl.seed_everything(0)
    trainer = make_trainer(max_steps=2, callbacks=from_recipe(recipe))
    trainer.fit(RecipeMLP(), RecipeData(samples=64))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    with pytest.raises(ValueError) as info:
        export_checkpoint(tmp_path / "run.ckpt", RecipeMLP, overrides=["qat.weights=int4"], output=tmp_path / "int4")
    message = str(info.value)
    assert "was trained with int8 channel sym but this callback quantizes it as int4 channel sym" in message
    assert "resume or export with the QAT settings of the run that trained it" in message
    assert not (tmp_path / "int4").exists()


# ---------------------------------------------------------------------- what the export can write
def test_onnx_export_of_a_grid_onnx_cannot_hold_is_refused(tmp_path):
    _refused(
        [QuantizationAwareTraining("int4", group_size=8, targets=["fc1", "fc2"]),
         CompressedExport(tmp_path / "out", formats=["safetensors", "onnx"])],
        "CompressedExport(formats=['safetensors', 'onnx'])",
        "QuantizationAwareTraining(group_size=8)",
        "on layers 'fc1' and 'fc2', QAT trains int4 g8 sym, which the ONNX export cannot write",
        "group_size=32 for int4",
        "or drop 'onnx' from CompressedExport(formats=...)",
        tmp_path=tmp_path,
    )
    _recipe_refused(
        {"qat": {"weights": "int8", "group_size": 16}, "export": {"dirpath": str(tmp_path / "out"), "formats": ["safetensors", "onnx"]}},
        "recipe keys export.formats=['safetensors', 'onnx'] and qat.group_size=16",
        "int8 g16 sym",
    )


def test_qat_that_starts_after_the_run_ends_is_refused_with_an_export(tmp_path):
    # No step would train on the int4 grid, yet the export would pack int4 codes.
    _refused(
        [QuantizationAwareTraining("int4", group_size=8, start_step=10, targets=["fc1", "fc2"]),
         CompressedExport(tmp_path / "out")],
        "QuantizationAwareTraining(start_step=10)",
        "start_step resolves to step 10 but this run has 4 optimizer steps",
        "before the end of the run",
        tmp_path=tmp_path,
    )
    # Without an export the run is merely float training: allowed.
    qat = QuantizationAwareTraining("int4", group_size=8, start_step=10, targets=["fc1", "fc2"])
    trainer = make_trainer(callbacks=[qat], max_steps=2)
    trainer.fit(TinyRegressor(), tiny_loader(batches=2))
    assert trainer.global_step == 2


def test_an_export_of_layers_that_never_computed_on_their_grid_says_so(tmp_path):
    """A run with no training step (max_steps=0, an empty loader) never reaches QAT's
    start, and an export from a checkpoint saved before it neither: the codes are round
    to nearest of float-trained weights. The export warns and its report says so; it
    packed them silently."""
    import warnings

    from lightning_compress import load_packed
    from lightning_compress.quant import QuantSpec, round_to_nearest

    torch.manual_seed(0)
    model = TinyRegressor()
    float_model = TinyRegressor()
    float_model.load_state_dict(model.state_dict())
    exporter = CompressedExport(tmp_path / "out")
    with pytest.warns(UserWarning, match=r"2 quantized layer\(s\) \(fc1, fc2\) never computed on their grid: .*\(PTQ\)"):
        make_trainer(max_steps=0, callbacks=[QuantizationAwareTraining("int4", group_size=8, targets=["fc1", "fc2"]),
                                             exporter]).fit(model, tiny_loader(batches=2))
    assert any("never computed on their grid" in note for note in exporter.report.notes)
    assert "never computed on their grid" in (tmp_path / "out" / "report.txt").read_text()
    # What was packed is round to nearest of the untrained float weights.
    round_to_nearest(float_model, QuantSpec(4, "group", 8), targets=["fc1", "fc2"])
    x = tiny_loader(batches=1).dataset.tensors[0]
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "out", TinyRegressor())(x), float_model(x))
    # A run whose QAT started exports without the note.
    trained = CompressedExport(tmp_path / "trained")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*never computed on their grid")
        make_trainer(max_steps=2, callbacks=[QuantizationAwareTraining("int4", group_size=8, targets=["fc1", "fc2"]),
                                             trained]).fit(TinyRegressor(), tiny_loader(batches=2))
    assert not any("never computed" in note for note in trained.report.notes)


def test_compressed_tensors_export_of_a_plain_module_is_refused_before_training(tmp_path):
    _refused(
        [QuantizationAwareTraining("int8"), CompressedExport(tmp_path / "out", compressed_tensors=True)],
        "CompressedExport(compressed_tensors=True) and CompressedExport(module=None)",
        "compressed_tensors=True writes a transformers config.json, but TinyRegressor is not a transformers model",
        "(e.g. module='model'), or pass compressed_tensors=False",
        tmp_path=tmp_path,
    )


class _TinyBertRegressor(pl.LightningModule):
    """A transformers BertModel in ``self.model``, trained to regress its pooled output."""

    def __init__(self):
        super().__init__()
        import transformers
        config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=16)
        self.model = transformers.BertModel(config)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=(batch[0].abs() * 10).long().clamp(max=49)[:, 0]).pooler_output.pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    "qat, expected",
    [
        (dict(weights="int3", group_size=16, symmetric=False),
         ["QuantizationAwareTraining(symmetric=False)", "QAT trains int3 g16 asym, which compressed-tensors cannot store",
          "asymmetric 3-bit weights load nowhere", "vLLM reads zero points at 4 and 8 bits only",
          "Quantize it symmetrically (symmetric=True), use 4 or 8 bits"]),
    ],
    ids=["asymmetric_int3"],
)
def test_compressed_tensors_export_of_what_no_reader_loads_is_refused(tmp_path, qat, expected):
    import transformers  # noqa: F401  (a dev dependency: a missing one fails, never skips)
    _refused(
        [QuantizationAwareTraining(**qat), CompressedExport(tmp_path / "out", module="model", compressed_tensors=True)],
        "CompressedExport(compressed_tensors=True)",
        "on layers 'model.",  # every layer it concerns, in one message
        *expected,
        model=_TinyBertRegressor,
        tmp_path=tmp_path,
    )


def test_recipe_with_a_compressed_tensors_export_of_asymmetric_int2_names_both_keys(tmp_path):
    export = {"dirpath": str(tmp_path / "out"), "module": "model", "compressed_tensors": True}
    _recipe_refused(
        {"lora": {"base": "nf4"}, "qat": {"weights": "int2", "group_size": 64, "symmetric": False}, "export": export},
        "recipe keys export.compressed_tensors=True and qat.symmetric=False",
        "asymmetric 2-bit weights load nowhere",
        "compressed_tensors=False",
    )
    # Written as trained (tests/test_compressed_tensors_vllm.py): int8 activations (W8A8), and
    # asymmetric int4/int8 with packed zero points (QLoRA or not), as vLLM reads them.
    load_recipe({"qat": {"weights": "int8", "activations": "int8_static"}, "export": export})
    load_recipe({"lora": {"base": "nf4"}, "qat": {"weights": "int4", "group_size": 64, "symmetric": False},
                 "export": export})
    load_recipe({"lora": {"base": "nf4"}, "qat": {"weights": "int8", "symmetric": False}, "export": export})


def test_every_recipe_in_the_recipes_folder_passes_the_checks():
    from tests.test_recipes import RECIPES

    for path in RECIPES:
        overrides = {"distillation": {"teacher": __file__, "teacher_class": "tests.cli_models.RecipeMLP"}}
        load_recipe(path, overrides if "distill" in path.name else None)
