"""Recipes: schema from the registry's configs, every error path, and every recipe in recipes/."""

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_compress import (
    CompressedExport,
    KnowledgeDistillation,
    LoRA,
    MagnitudePruning,
    QuantizationAwareTraining,
    from_recipe,
    load_packed,
)
from lightning_compress.callbacks.recipe_record import RecipeRecord, recipe_in_checkpoint
from lightning_compress.callbacks.registry import METHODS
from lightning_compress.core.validate import check_number
from lightning_compress.quant.config import QATConfig
from lightning_compress.sparsity.config import PruningConfig
from lightning_compress.formats.packed import read_metadata
from lightning_compress.recipes import BUILTIN_RECIPES_DIR, SECTIONS, RecipeError, load_recipe, recipe_schema
from tests.cli_models import RecipeData, RecipeMLP
from tests.conftest import make_trainer

RECIPES = sorted(BUILTIN_RECIPES_DIR.glob("*.yaml"))  # recipes/ in a checkout links here


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------- schema
def test_schema_is_the_callbacks_signatures():
    """The registry's configs are the schema; each callback's signature is its config's."""
    schema = recipe_schema()
    assert list(schema) == ["lora", "distillation", "pruning", "qat", "export"]
    assert list(SECTIONS) == list(METHODS) and all(SECTIONS[s] is METHODS[s].callback for s in SECTIONS)
    for section, cls in SECTIONS.items():
        assert cls.section == section
        parameters = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
        assert parameters == [f.name for f in dataclasses.fields(cls.config_class) if f.init]
        expected = [n for n in parameters if not (section == "export" and n == "recipe")]
        assert list(schema[section]) == expected
        for name in expected:
            default = inspect.signature(cls.__init__).parameters[name].default
            assert schema[section][name].required == (default is inspect.Parameter.empty)
    assert schema["export"]["dirpath"].required


def test_a_new_config_field_is_a_new_recipe_key(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class WiderConfig(PruningConfig):
        warmup_fraction: float = 0.0

        def __post_init__(self):
            super().__post_init__()
            check_number("warmup_fraction", self.warmup_fraction, low=0.0, high=1.0)

    class WiderPruning(MagnitudePruning):
        config_class = WiderConfig

    monkeypatch.setitem(SECTIONS, "pruning", WiderPruning)
    recipe_schema.cache_clear()
    try:
        (pruning, record) = from_recipe({"pruning": {"final_sparsity": 0.5, "warmup_fraction": 0.25}})
        assert isinstance(pruning, WiderPruning) and pruning.warmup_fraction == 0.25
        assert inspect.signature(WiderPruning).parameters["warmup_fraction"].default == 0.0
        with pytest.raises(RecipeError, match="pruning.warmup_fraction expects a float"):
            load_recipe({"pruning": {"warmup_fraction": "soon"}})
        # The config's own check names its field: the recipe key comes from the error's data.
        with pytest.raises(RecipeError, match=r"recipe key pruning.warmup_fraction: `warmup_fraction` must be a number in \[0, 1\]"):
            load_recipe({"pruning": {"warmup_fraction": 2.0}})
    finally:
        recipe_schema.cache_clear()


def test_a_callback_takes_its_fields_or_a_built_config():
    config = PruningConfig(0.7, end_step=0.5)
    assert MagnitudePruning(config=config).config is config
    assert MagnitudePruning(0.7, end_step=0.5).config == config
    with pytest.raises(ValueError, match="either `config` or MagnitudePruning's arguments"):
        MagnitudePruning(0.7, config=config)
    with pytest.raises(ValueError, match="`config` must be a PruningConfig, got QATConfig"):
        MagnitudePruning(config=QATConfig())
    with pytest.raises(AttributeError, match="no attribute 'final_sparsty'"):
        MagnitudePruning(0.7).final_sparsty


# ---------------------------------------------------------------------- loading
def test_interpolation_overrides_and_step_forms(tmp_path):
    path = write(
        tmp_path,
        """
vars:
  switch: 0.6
pruning:
  final_sparsity: 0.8
  start_step: 10          # an int: optimizer step 10
  end_step: ${vars.switch}  # a float: 60% of the run
qat:
  weights: int4
  group_size: 32
  start_step: ${vars.switch}
""",
    )
    recipe = load_recipe(path, ["vars.switch=0.7", "pruning.final_sparsity=0.5"])
    assert recipe.config == {
        "pruning": {"final_sparsity": 0.5, "start_step": 10, "end_step": 0.7},
        "qat": {"weights": "int4", "group_size": 32, "start_step": 0.7},
    }
    pruning, qat, record = recipe.callbacks()
    assert pruning.final_sparsity == 0.5
    assert type(pruning.start_step) is int and pruning.start_step == 10
    assert type(pruning.end_step) is float and pruning.end_step == 0.7
    assert qat.start_step == 0.7 and isinstance(record, RecipeRecord) and record.recipe == recipe.config
    # overrides as a mapping do the same
    assert load_recipe(path, {"pruning": {"final_sparsity": 0.25}}).config["pruning"]["final_sparsity"] == 0.25
    # A misspelt vars key was dropped in silence (a new user's trial); a new one that an
    # override reads is fine.
    with pytest.raises(RecipeError, match=r"override vars\.swtich sets a value nothing in the recipe reads \(no"
                       r" \$\{vars\.swtich\}\); the recipe's vars are \['switch'\]; did you mean vars\.switch\?"):
        load_recipe(path, ["vars.swtich=0.7"])
    with pytest.raises(RecipeError, match=r"override vars\.other sets a value nothing in the recipe reads"):
        load_recipe(path, {"vars": {"other": 1}})
    assert load_recipe(path, ["vars.late=20", "pruning.start_step=${vars.late}"]).config["pruning"]["start_step"] == 20


def test_callbacks_come_in_canonical_order_whatever_the_file_order(tmp_path):
    recipe = {
        "export": {"dirpath": str(tmp_path / "out")},
        "qat": {"weights": "int8"},
        "pruning": {"final_sparsity": 0.5},
        "distillation": {"teacher": "self"},
        "lora": {"r": 4},
    }
    kinds = [type(c) for c in from_recipe(recipe)]
    assert kinds == [LoRA, KnowledgeDistillation, MagnitudePruning, QuantizationAwareTraining, CompressedExport, RecipeRecord]


def test_a_section_with_no_arguments_uses_the_callback_defaults():
    (qat, _record) = from_recipe({"qat": None})
    assert qat.spec.describe() == QuantizationAwareTraining().spec.describe() == "int8 channel sym"


def test_import_paths_and_dtypes_are_converted(tmp_path):
    ckpt = tmp_path / "teacher.ckpt"
    ckpt.write_bytes(b"x")
    (kd, _record) = from_recipe(
        {
            "distillation": {
                "teacher": str(ckpt),
                "teacher_class": "tests.cli_models.RecipeMLP",
                "teacher_dtype": "bfloat16",
            }
        }
    )
    assert kd.teacher_class is RecipeMLP and kd.teacher_dtype is torch.bfloat16
    # Layer types as dotted paths are classes; anything that imports nothing is a name glob.
    (pruning, _record) = from_recipe({"pruning": {"targets": ["torch.nn.Conv2d", "encoder.*", "head"]}})
    assert pruning.targets == (torch.nn.Conv2d, "encoder.*", "head")
    with pytest.raises(RecipeError, match="recipe key pruning.targets: `targets` names the layer type ReLU"):
        load_recipe({"pruning": {"targets": ["torch.nn.ReLU"]}})


MALFORMED = [
    # (recipe or YAML text, overrides, expected message fragment)
    ({"pruning": {"final_sparsty": 0.5}}, None, "unknown recipe key 'pruning.final_sparsty'; did you mean pruning.final_sparsity?"),
    ({"prunning": {"final_sparsity": 0.5}}, None, "unknown recipe top-level section 'prunning'; did you mean pruning?"),
    ({"pruning": {"zzz": 1}}, None, "valid keys of pruning are ['final_sparsity'"),
    ({"quantize": {}}, None, "valid sections are ['lora', 'distillation'"),
    ({"pruning": {"final_sparsity": "abc"}}, None, "recipe key pruning.final_sparsity expects a float or null, got 'abc'"),
    ({"pruning": {"final_sparsity": 1.5}}, None, "recipe key pruning.final_sparsity: `final_sparsity` must be a number in [0, 1)"),
    ({"pruning": {"final_sparsity": 0.5, "start_step": True}}, None, "pruning.start_step expects an int or a float, got True"),
    ({"pruning": {"final_sparsity": 0.5, "start_step": 0.8, "end_step": 0.2}}, None, "recipe key pruning."),
    ({"qat": {"weights": "int9"}}, None, "recipe key qat.weights:"),
    ({"qat": {"weights": "int4", "group_size": 0}}, None, "recipe key qat.group_size:"),
    ({"qat": {"symmetric": "yes"}}, None, "qat.symmetric expects true/false"),
    ({"qat": {"weights": "int4", "group_size": 32, "ewgs_delta": 3}}, None,
     "recipe key qat.ewgs_delta: `ewgs_delta` must be a number in [0, 2)"),
    ({"distillation": {"teacher": "torch.nn.Identity", "alpha": "high"}}, None,
     "distillation.alpha: 'high' is not a dotted import path like 'my_pkg.models.Teacher'; it takes a float or a"
     " function as a dotted import path"),
    ({"qat": [1, 2]}, None, "recipe section qat must be a mapping of QuantizationAwareTraining arguments"),
    ({"lora": {"r": 4, "target_modules": "fc1"}}, None, "lora.target_modules expects a list of"),
    ({"lora": {"r": -1}}, None, "recipe key lora.r:"),
    ({"distillation": {"teacher": "???"}}, None, "recipe key distillation.teacher has no value (???)"),
    ({"distillation": {"teacher": "self", "teacher_class": "no_such_pkg.Model"}}, None, "distillation.teacher_class: cannot import 'no_such_pkg.Model'"),
    ({"distillation": {"teacher": "self", "teacher_class": "torch.nn.Linea"}}, None, "did you mean torch.nn.Linear?"),
    ({"distillation": {"teacher": "self", "teacher_dtype": "float33"}}, None, "distillation.teacher_dtype expects"),
    ({"distillation": {"teacher": "self", "temperature": 0}}, None, "recipe key distillation.temperature:"),
    ({"pruning": {"final_sparsity": "${vars.missing}"}}, None, "recipe key pruning.final_sparsity: Interpolation key 'vars.missing' not found"),
    ({"export": {}}, None, "recipe key export.dirpath is required"),
    ({"export": {"dirpath": "x", "formats": ["safetensors", "tflite"]}}, None, "recipe key export.formats:"),
    ({}, None, "the recipe has no compression section"),
    ({"vars": {"a": 1}}, None, "the recipe has no compression section"),
    ({"pruning": {"final_sparsity": 0.5}}, ["pruning.final_sparsity"], "override 'pruning.final_sparsity' is not 'section.key=value'"),
    ({"pruning": {"final_sparsity": 0.5}}, ["final_sparsity=0.5"], "is not 'section.key=value'"),
    ({"pruning": {"final_sparsity": 0.5}}, ["pruning.final_sparsty=0.5"], "did you mean pruning.final_sparsity?"),
    ({"pruning": {"final_sparsity": 0.5}}, "pruning.final_sparsity=0.5", "a list of 'key=value' strings"),
    ({"pruning": {"final_sparsity": 0.5}}, ["pruning.final_sparsity=high"], "pruning.final_sparsity expects a float"),
    ("pruning: [unclosed", None, "is not valid YAML"),
    # where the problem is, not only where the mapping it broke began ("line 1, column 1: qat:")
    ("qat:\n  weights: int4\n group_size: 32\n", None, "is not valid YAML: expected <block end>, but found"
     " '<block mapping start>' at line 3, column 2 (while parsing a block mapping at line 1, column 1)"),
    ("- pruning\n- qat\n", None, "must hold a mapping of sections"),
    ("just a string\n", None, "must hold a mapping of sections"),  # was "unknown recipe top-level section 'just a string'"
    ("root:x:0:0:root:/root:/bin/bash\n", None, "must hold a mapping of sections"),  # not a file's text echoed back
    ("0\n", None, "must hold a mapping of sections"),  # was "is not valid YAML: Invalid loaded object type: int"
    ("true\n", None, "must hold a mapping of sections"),
    ("", None, "the recipe has no compression section"),
    ("pruning:\n  final_sparsity: 0.5\npruning:\n  final_sparsity: 0.6\n", None, "is not valid YAML"),
]


@pytest.mark.parametrize(("recipe", "overrides", "message"), MALFORMED)
def test_malformed_recipes_fail_before_training_with_the_key_and_the_fix(tmp_path, recipe, overrides, message):
    source = write(tmp_path, recipe) if isinstance(recipe, str) else recipe
    with pytest.raises(RecipeError) as caught:
        load_recipe(source, overrides)
    assert message in str(caught.value)


def test_missing_file_and_wrong_source_type(tmp_path):
    with pytest.raises(RecipeError, match="recipe file '.*nope.yaml' not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="a YAML file path or a mapping, got int"):
        load_recipe(3)
    with pytest.raises(RecipeError, match="exclude names unknown recipe sections"):
        load_recipe({"qat": {}}).callbacks(exclude=["quant"])


def test_recipe_record_validates_its_argument():
    with pytest.raises(ValueError, match="`recipe` must be a mapping"):
        RecipeRecord(["qat"])


# ---------------------------------------------------------------------- the run records its recipe
def test_recipe_is_stored_in_checkpoints_export_metadata_and_logger_config(tmp_path):
    recipe = {
        "vars": {"target": 0.5},
        "pruning": {"final_sparsity": "${vars.target}", "end_step": 0.5},
        "qat": {"weights": "int8", "start_step": 0.5},
        "export": {"dirpath": str(tmp_path / "packed")},
    }
    expected = {
        "pruning": {"final_sparsity": 0.5, "end_step": 0.5},
        "qat": {"weights": "int8", "start_step": 0.5},
        "export": {"dirpath": str(tmp_path / "packed")},
    }
    logger = CSVLogger(tmp_path / "logs", name="run")
    trainer = make_trainer(
        max_epochs=2,
        logger=logger,
        enable_checkpointing=True,
        callbacks=[*from_recipe(recipe), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
    )
    trainer.fit(RecipeMLP(), RecipeData(samples=128))

    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert recipe_in_checkpoint(checkpoint) == expected
    assert read_metadata(tmp_path / "packed")["recipe"] == expected
    hparams = yaml.safe_load(Path(logger.log_dir, "hparams.yaml").read_text())
    assert hparams["compression_recipe"] == expected


# ---------------------------------------------------------------------- every ready recipe
@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.ckpt"
    pl.seed_everything(0)
    trainer = make_trainer(max_epochs=2)
    trainer.fit(RecipeMLP(hidden=256), RecipeData(samples=128))
    trainer.save_checkpoint(path)
    return path


def test_the_recipes_folder_holds_the_documented_recipes():
    names = {path.stem for path in RECIPES}
    assert names == {
        "int8_qat",
        "int4_weight_only",
        "gradual_pruning_90",
        "sparse24_int4",
        "distill_prune_quantize",
        "lora",
        "qlora",
        "gguf_q4_0",
        "gguf_q8_0",
        "qad_int4",
    }
    for path in RECIPES:
        header = path.read_text().splitlines()[:3]
        assert header[0].startswith("# ") and any("For:" in line for line in path.read_text().splitlines()[:12]), path


# The gguf recipes target a LLaMA-architecture transformers model: tests/test_gguf.py trains both.
@pytest.mark.parametrize("path", [p for p in RECIPES if not p.stem.startswith("gguf_")], ids=lambda p: p.stem)
def test_every_recipe_runs_on_a_tiny_model_and_exports_what_it_says(tmp_path, path, teacher_checkpoint):
    overrides = [f"export.dirpath={tmp_path / 'packed'}"]
    if path.stem == "distill_prune_quantize":
        overrides += [f"distillation.teacher={teacher_checkpoint}", "distillation.teacher_class=tests.cli_models.RecipeMLP"]
    if path.stem == "qlora":  # the 8-class head has too few NF4 blocks for a 256-scale block
        overrides += ["lora.exclude_modules=[net.4]"]
    recipe = load_recipe(path, overrides)
    pl.seed_everything(0)
    model = RecipeMLP()
    trainer = make_trainer(max_epochs=2, callbacks=recipe.callbacks())
    trainer.fit(model, RecipeData(samples=128))

    metadata = read_metadata(tmp_path / "packed")
    assert metadata["recipe"] == recipe.config
    layers = metadata["layers"]
    qat, pruning = recipe.config.get("qat"), recipe.config.get("pruning")
    linear_names = ["net.0", "net.2", "net.4"]
    if qat is not None:
        bits = int(qat["weights"].removeprefix("int"))
        targeted = [n for n in linear_names if n in layers]
        assert targeted and all(layers[n]["bits"] == bits for n in targeted)
        if "group_size" in qat:
            assert all(layers[n]["group_size"] == qat["group_size"] for n in targeted)
    reloaded = load_packed(tmp_path / "packed", RecipeMLP, backend="dequantize")
    for name in linear_names:
        weight = reloaded.get_submodule(name).weight.detach()
        if pruning is not None and pruning.get("pattern") == "2:4":
            groups = weight.reshape(weight.shape[0], -1, 4)
            assert int((groups != 0).sum(-1).max()) <= 2
        elif pruning is not None:
            assert float((weight == 0).float().mean()) >= pruning["final_sparsity"] - 1e-6
    # the model the run ends with computes what the reloaded files compute
    x = next(iter(RecipeData(samples=128).val_dataloader()))[0]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=1e-5, atol=1e-5)


def test_nothing_on_disk_is_touched_when_a_run_is_refused(tmp_path):
    """A bad recipe, or an export over an existing directory, stops before the first step."""
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "model.safetensors").write_bytes(b"an earlier export")
    with pytest.raises(RecipeError, match="qat.group_size"):
        from_recipe({"qat": {"weights": "int4", "group_size": -4}, "export": {"dirpath": str(packed)}})
    model = RecipeMLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(max_epochs=1, callbacks=from_recipe({"qat": {"weights": "int8"}, "export": {"dirpath": str(packed)}}))
    with pytest.raises(FileExistsError, match="already exists; choose another `dirpath` or pass overwrite=True"):
        trainer.fit(model, RecipeData(samples=64))
    assert trainer.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed"]
    assert (packed / "model.safetensors").read_bytes() == b"an earlier export"


# ---------------------------------------------------------------------- ready recipes by name
def test_ready_recipes_load_by_name_and_a_real_path_wins(tmp_path, monkeypatch):
    by_path = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "int8_qat.yaml").config
    assert by_path["qat"]["weights"] == "int8"
    assert load_recipe("int8_qat").config == load_recipe("int8_qat.yaml").config == by_path
    # A file of that name in the working directory is what the user means.
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "pruning:\n  final_sparsity: 0.25\n", name="int8_qat.yaml")
    assert load_recipe("int8_qat.yaml").config == load_recipe("int8_qat").config == {"pruning": {"final_sparsity": 0.25}}


@pytest.mark.parametrize(("source", "message"), [
    ("int8_qta", "recipe file 'int8_qta' not found; did you mean 'int8_qat'? pass the path of a YAML recipe or the"
                 " name of a ready recipe: distill_prune_quantize, gguf_q4_0, gguf_q8_0, gradual_pruning_90,"),
    # A path with a folder is never taken for a ready recipe's name.
    ("elsewhere/int8_qat.yaml", "recipe file 'elsewhere/int8_qat.yaml' not found; did you mean 'int8_qat'?"),
    ("int8_qat.yml", "recipe file 'int8_qat.yml' not found; did you mean 'int8_qat'?"),
])
def test_unknown_recipe_names_suggest_the_ready_ones(source, message):
    with pytest.raises(RecipeError) as caught:
        load_recipe(source)
    assert message in str(caught.value)


def test_a_directory_is_not_a_recipe(tmp_path):
    with pytest.raises(RecipeError, match="is a directory; pass the path of a YAML recipe file"):
        load_recipe(tmp_path)


def test_loading_a_recipe_warns_nothing():
    # omegaconf 2.4 deprecates register_new_resolver and warned on every first recipe
    # load; registration happens once per process, so this runs in a fresh one.
    script = "from lightning_compress import load_recipe; load_recipe('qad_int4').callbacks()"
    # Only that warning is an error: the floor versions' torchmetrics warns on import.
    result = subprocess.run([sys.executable, "-W", "error:register_new_resolver:UserWarning", "-c", script],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_an_override_into_a_glob_with_dots_names_the_whole_mapping_form():
    """`qat.overrides.model.decoder.bits=6` reads as overrides['model']['decoder']['bits']: the
    error says so and gives the form that reaches the glob, which then works."""
    recipe = {"qat": {"weights": "int4", "group_size": 32, "overrides": {"model.decoder": {"bits": 8}}}}
    with pytest.raises(RecipeError, match=r"`overrides\['model'\]` has unknown option\(s\) \['decoder'\].*the override"
                       r" qat.overrides.model.decoder.bits splits at every dot.*replace the whole mapping instead:"
                       r" qat.overrides=\{\"model.decoder\": \{bits: VALUE\}\}"):
        load_recipe(recipe, ["qat.overrides.model.decoder.bits=6"])
    fixed = load_recipe(recipe, ['qat.overrides={"model.decoder": {bits: 6}}'])
    assert fixed.config["qat"]["overrides"] == {"model.decoder": {"bits": 6}}


def test_the_glob_hint_only_comes_with_an_error_it_explains():
    recipe = {"qat": {"weights": "int4", "group_size": 32, "overrides": {"fc": {"bits": 8}}}}
    assert load_recipe(recipe, ["qat.overrides.fc.bits=6"]).config["qat"]["overrides"] == {"fc": {"bits": 6}}
    with pytest.raises(RecipeError) as error:  # a glob without dots, and another key's error: no hint
        load_recipe(recipe, ["qat.overrides.fc.bits=6", "qat.start_step=-3"])
    assert "`start_step` must be >= 0" in str(error.value) and "splits at every dot" not in str(error.value)
    mapped = {"qat": {"weights": "int4", "init": "awq", "mappings": {"norm": ["fc"]}}}
    with pytest.raises(RecipeError, match=r"recipe key qat.mappings expects .* the override qat.mappings.model.norm"
                       r" splits at every dot.*qat.mappings=\{\"model.norm\": \[LAYERS\]\}$"):
        load_recipe(mapped, ["qat.mappings.model.norm=[fc]"])


def test_overrides_given_as_one_string_are_named_once():
    """The string's characters were listed as "the overrides ['p', 'r', ...] cannot be applied"
    before the reason, which ended with an unrelated hint about keeping a key's shape."""
    with pytest.raises(RecipeError) as caught:
        load_recipe("int8_qat", "qat.start_step=0.2")
    assert str(caught.value) == ("overrides must be a list of 'key=value' strings, got the single string"
                                 " 'qat.start_step=0.2': pass ['qat.start_step=0.2']")


def test_a_number_from_an_environment_variable_names_oc_decode(monkeypatch):
    monkeypatch.setenv("LC_TEST_SPARSITY", "0.6")
    with pytest.raises(RecipeError, match=r"recipe key pruning.final_sparsity expects a float or null, got '0.6' \(str\);"
                                          r" a value from an environment variable is text: read it as YAML with"
                                          r" \$\{oc.decode:\$\{oc.env:NAME\}\}"):
        load_recipe({"pruning": {"final_sparsity": "${oc.env:LC_TEST_SPARSITY}"}})
    (pruning, _record) = from_recipe({"pruning": {"final_sparsity": "${oc.decode:${oc.env:LC_TEST_SPARSITY}}"}})
    assert pruning.final_sparsity == 0.6
    with pytest.raises(RecipeError, match=r"got '0.6' \(str\); it is quoted, so YAML reads it as text: remove the"
                                          r" quotes$"):
        load_recipe({"pruning": {"final_sparsity": "0.6"}})  # as `final_sparsity: '0.6'` in a file


@pytest.mark.parametrize("spelling", ["bfloat16", "torch.bfloat16", torch.bfloat16])
def test_a_recipe_takes_a_teacher_dtype_as_python_does(spelling):
    """The recipe refused "torch.bfloat16", which KnowledgeDistillation itself takes."""
    (kd, _record) = from_recipe({"distillation": {"teacher": "self", "teacher_dtype": spelling}})
    assert kd.teacher_dtype is torch.bfloat16


def test_a_recipe_mapping_holding_torch_dtypes_reads_them_as_their_names():
    """OmegaConf refused the mapping ("Value 'dtype' is not a supported primitive type"),
    naming no key, while the callbacks take torch dtypes."""
    (qat, _record) = from_recipe({"qat": {"weights": "int4", "group_size": 32, "scale_dtype": torch.float16,
                                          "targets": ["torch.nn.Linear"]}})
    assert qat.config.scale_dtype == "float16" and qat.targets == (torch.nn.Linear,)  # other text kept as written
