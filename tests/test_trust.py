"""Nothing lost, nothing executed: what a checkpoint or an export holds is data.

A checkpoint's stored recipe never chooses where ``export`` writes nor replaces anything,
and none of its dotted paths is imported or called unless the user passes the recipe
again or opts in with ``--trust-checkpoint-recipe``. Recipes cannot expand past their size
limits, and values read from the environment are used but never recorded.

The checkpoints are real ones (a short ``from_recipe`` run), edited the way someone
handing over a file could edit them.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from lightning_compress import from_recipe
from lightning_compress.checkpoints import export_checkpoint
from lightning_compress.cli import main
from lightning_compress.formats.packed import read_metadata
from lightning_compress.recipe_resolve import MAX_VALUE_CHARS
from lightning_compress.recipes import RecipeError, load_recipe
from tests.cli_models import RecipeData, RecipeMLP
from tests.conftest import make_trainer

REPO = Path(__file__).resolve().parents[1]
MODEL = "tests.cli_models.RecipeMLP"
DATA = "tests.cli_models.RecipeData"
SAMPLES = 32  # one training batch, one validation batch
# A module that leaves a marker file when it is imported and when its functions are called.
PLANTED = '''
from pathlib import Path
HERE = Path(__file__).parent
(HERE / "imported.marker").touch()

def input_fn(batch):
    (HERE / "called.marker").touch()
    return batch[0]

def alpha(step):
    (HERE / "called.marker").touch()
    return 0.5

class Layer:
    pass

from tests.cli_models import RecipeMLP

class Model(RecipeMLP):
    def __init__(self, hidden=128, lr=1e-2):
        (HERE / "called.marker").touch()
        super().__init__(hidden, lr)
'''


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short distillation + QAT + export run with ``ckpt/last.ckpt``."""
    root = tmp_path_factory.mktemp("trained")
    recipe = {
        "distillation": {"teacher": "self", "alpha": 0.5},
        "qat": {"weights": "int8"},
        "export": {"dirpath": str(root / "packed")},
    }
    pl.seed_everything(0)
    trainer = make_trainer(
        max_epochs=1,
        enable_checkpointing=True,
        callbacks=[*from_recipe(recipe), ModelCheckpoint(dirpath=root / "ckpt", save_last=True)],
    )
    trainer.fit(RecipeMLP(hidden=32), RecipeData(samples=SAMPLES))
    return root / "ckpt" / "last.ckpt"


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """``planted_code`` importable from tmp_path; returns the folder its markers land in."""
    folder = tmp_path / "planted"
    folder.mkdir()
    (folder / "planted_code.py").write_text(PLANTED)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "planted_code", raising=False)
    yield folder
    sys.modules.pop("planted_code", None)


def markers(folder: Path) -> list:
    return sorted(p.name for p in folder.glob("*.marker"))


def crafted(trained: Path, path: Path, hyperparameters=None, **sections) -> Path:
    """``trained`` with its stored recipe's sections updated by ``sections``. ``fit``
    checkpoints get the model's ``_class_path``, as LightningCLI saves it."""
    checkpoint = torch.load(trained, weights_only=True)
    checkpoint["hyper_parameters"].update({"_class_path": MODEL, **(hyperparameters or {})})
    recipe = checkpoint["lightning_compress"]["recipe"]
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    torch.save(checkpoint, path)
    return path


def victim(tmp_path: Path) -> Path:
    """A directory someone cares about."""
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    return folder


def last_error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("lightning-compress") and ": error: " in lines[-1]
    return lines[-1]


def fit_args(tmp_path: Path, checkpoint: Path, *extra: str) -> list:
    return ["fit", "--model", MODEL, "--model.hidden", "32", "--data", DATA, "--data.samples", str(SAMPLES),
            "--trainer.max_epochs", "2",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(checkpoint), *extra]


# ---------------------------------------------------------------------- 1. export writes where the user says
def test_a_stored_overwrite_does_not_replace_the_output_directory(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    target = victim(tmp_path)
    checkpoint = crafted(trained, tmp_path / "run.ckpt", export={"dirpath": str(target), "overwrite": True})
    assert main(["export", "--checkpoint", str(checkpoint), "--model", MODEL, "-o", str(target)]) == 2
    assert "victim already exists" in last_error(capsys)
    assert sorted(p.name for p in target.iterdir()) == ["thesis.tex"]
    # --overwrite on this command line does not replace it either: it is not an export.
    assert main(["export", "--checkpoint", str(checkpoint), "--model", MODEL, "-o", str(target), "--overwrite"]) == 2
    assert "holds thesis.tex but no compression.json" in last_error(capsys)
    assert sorted(p.name for p in target.iterdir()) == ["thesis.tex"]
    # Only --overwrite on this command line replaces an earlier export.
    earlier = tmp_path / "earlier"
    assert main(["export", "--checkpoint", str(checkpoint), "--model", MODEL, "-o", str(earlier)]) == 0
    assert main(["export", "--checkpoint", str(checkpoint), "--model", MODEL, "-o", str(earlier)]) == 2
    assert main(["export", "--checkpoint", str(checkpoint), "--model", MODEL, "-o", str(earlier), "--overwrite"]) == 0
    assert read_metadata(earlier)["recipe"]["export"]["overwrite"] is True  # what this command was told


@pytest.mark.parametrize("stored", ["absolute", "relative"])
def test_export_without_output_refuses_the_stored_dirpath(trained, tmp_path, monkeypatch, capsys, stored):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    target = victim(tmp_path)
    dirpath = str(target) if stored == "absolute" else "../victim"
    checkpoint = crafted(trained, tmp_path / "run.ckpt", export={"dirpath": dirpath, "overwrite": True})
    assert main(["export", "--checkpoint", str(checkpoint), "--model", MODEL, "--overwrite"]) == 2
    assert "no output directory: pass -o/--output" in last_error(capsys)
    assert sorted(p.name for p in target.iterdir()) == ["thesis.tex"]
    # A path that does not exist yet is not created either.
    fresh = crafted(trained, tmp_path / "fresh.ckpt", export={"dirpath": str(tmp_path / "elsewhere")})
    with pytest.raises(RecipeError, match="does not choose where to write"):
        export_checkpoint(fresh, RecipeMLP)
    assert not (tmp_path / "elsewhere").exists()


def test_the_users_recipe_chooses_the_directory_but_only_overwrite_replaces(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    target = victim(tmp_path)
    (tmp_path / "mine.yaml").write_text(f"qat:\n  weights: int8\nexport:\n  dirpath: {target}\n  overwrite: true\n")
    # the user's own recipe names the directory (no -o needed), but its overwrite: true is not enough
    assert main(["export", "--checkpoint", str(trained), "--model", MODEL, "--recipe", "mine.yaml"]) == 2
    assert "victim already exists" in last_error(capsys)
    assert sorted(p.name for p in target.iterdir()) == ["thesis.tex"]
    (tmp_path / "mine.yaml").write_text(f"qat:\n  weights: int8\nexport:\n  dirpath: {tmp_path / 'mine'}\n")
    assert main(["export", "--checkpoint", str(trained), "--model", MODEL, "--recipe", "mine.yaml"]) == 0
    assert (tmp_path / "mine" / "model.safetensors").is_file()


# ---------------------------------------------------------------------- 2. a stored recipe is never run
def test_export_refuses_a_stored_input_fn_unless_trusted(trained, tmp_path, monkeypatch, capsys, planted):
    monkeypatch.chdir(tmp_path)
    checkpoint = crafted(trained, tmp_path / "run.ckpt", export={"input_fn": "planted_code.input_fn"})
    args = ["export", "--checkpoint", str(checkpoint), "--model", MODEL, "--data", DATA, "-o", "out"]
    assert main(args) == 2
    error = last_error(capsys)
    assert "recipe key export.input_fn: 'planted_code.input_fn' would be imported" in error
    assert "--trust-checkpoint-recipe" in error and "--recipe" in error
    assert markers(planted) == [] and "planted_code" not in sys.modules
    assert not (tmp_path / "out").exists()
    # The Python API refuses the same way.
    with pytest.raises(RecipeError, match="recipe key export.input_fn"):
        export_checkpoint(checkpoint, RecipeMLP, output=tmp_path / "out")
    assert markers(planted) == []
    # Opting in runs it: imported, and called for the parity check's batches.
    assert main([*args, "--trust-checkpoint-recipe"]) == 0
    assert markers(planted) == ["called.marker", "imported.marker"]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_an_override_of_the_key_is_the_users_choice(trained, tmp_path, planted):
    checkpoint = crafted(trained, tmp_path / "run.ckpt", export={"input_fn": "planted_code.nothing_here"})
    export_checkpoint(checkpoint, RecipeMLP, output=tmp_path / "out", overrides=["export.input_fn=planted_code.input_fn"],
                      datamodule=RecipeData(samples=SAMPLES))
    assert markers(planted) == ["called.marker", "imported.marker"]


def test_fit_resume_refuses_a_stored_alpha_unless_trusted(trained, tmp_path, monkeypatch, capsys, planted):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    checkpoint = crafted(trained, tmp_path / "run.ckpt", distillation={"alpha": "planted_code.alpha"},
                         export={"dirpath": str(tmp_path / "resumed")})
    # The distillation state records the schedule it trained with (by module and name): a
    # crafted file consistent with its recipe, so only the trust gate stands in its way.
    state = torch.load(checkpoint, weights_only=True)
    for key, value in state["callbacks"].items():
        if key.startswith("KnowledgeDistillation"):
            value["settings"]["alpha"] = "planted_code.alpha"
    torch.save(state, checkpoint)
    assert main(fit_args(tmp_path, checkpoint)) == 2
    error = last_error(capsys)
    assert "recipe key distillation.alpha: 'planted_code.alpha' would be imported" in error
    assert "--trust-checkpoint-recipe" in error
    assert markers(planted) == [] and "planted_code" not in sys.modules
    assert main(fit_args(tmp_path, checkpoint, "--trust-checkpoint-recipe")) == 0
    assert markers(planted) == ["called.marker", "imported.marker"]
    assert (tmp_path / "resumed" / "model.safetensors").is_file()
    assert not list(tmp_path.glob("config-*.yaml")) or all(
        "trust" not in p.read_text() for p in tmp_path.glob("config-*.yaml"))


def test_fit_resume_ignores_a_stored_overwrite(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    target = victim(tmp_path)
    checkpoint = crafted(trained, tmp_path / "run.ckpt", export={"dirpath": str(target), "overwrite": True})
    assert main(fit_args(tmp_path, checkpoint)) == 2
    captured = capsys.readouterr()
    assert "the stored export.overwrite is ignored" in captured.out
    assert "victim already exists" in captured.err
    assert sorted(p.name for p in target.iterdir()) == ["thesis.tex"]


@pytest.mark.parametrize(
    ("section", "values", "shown"),
    [
        ("export", {"dirpath": "/elsewhere/packed"}, "export.dirpath='/elsewhere/packed'"),
        ("export", {"dirpath": "../../packed"}, "export.dirpath='../../packed'"),
        ("export", {"dirpath": "${oc.env:HOME}/packed"}, "export.dirpath='${oc.env:HOME}/packed'"),
        ("distillation", {"cache_dir": "/elsewhere/cache"}, "distillation.cache_dir='/elsewhere/cache'"),
    ],
)
def test_fit_resume_writes_only_inside_the_current_directory(trained, tmp_path, monkeypatch, capsys, section, values,
                                                             shown):
    """A stored recipe's output paths are honoured only inside the current directory: a
    checkpoint from elsewhere cannot make a resume write anywhere else."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(REPO))
    sections = {"export": {"dirpath": "packed"}, section: values}  # (the fixture's own dirpath is outside `work`)
    checkpoint = crafted(trained, tmp_path / "run.ckpt", **sections)
    assert main(fit_args(tmp_path, checkpoint)) == 2
    error = last_error(capsys)
    assert f"writes outside the current directory ({shown})" in error
    key = next(iter(values))
    assert f"--override {section}.{key}=PATH" in error and "--trust-checkpoint-recipe" in error
    assert sorted(p.name for p in work.iterdir()) == [] and not (tmp_path / "packed").exists()


def test_fit_resume_writes_where_the_override_says(trained, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(REPO))
    checkpoint = crafted(trained, tmp_path / "run.ckpt", export={"dirpath": "/elsewhere/packed"})
    assert main(fit_args(tmp_path, checkpoint, "--override", f"export.dirpath={work / 'mine'}")) == 0
    assert (work / "mine" / "model.safetensors").is_file() and not Path("/elsewhere").exists()


@pytest.mark.parametrize(
    ("hyperparameters", "fragment"),
    [
        ({"_class_path": "planted_code.Model"}, "name the model class 'planted_code.Model', which would be imported"),
        ({"head": {"class_path": "planted_code.Layer"}}, "hold class paths under ['head']"),
    ],
)
def test_fit_resume_builds_only_the_users_model_class(trained, tmp_path, monkeypatch, capsys, planted, hyperparameters, fragment):
    """LightningCLI builds the model from the checkpoint's hyperparameters: their class paths are refused."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    checkpoint = crafted(trained, tmp_path / "run.ckpt", hyperparameters, export={"dirpath": str(tmp_path / "resumed")})
    assert main(fit_args(tmp_path, checkpoint)) == 2
    error = last_error(capsys)
    assert fragment in error and "--trust-checkpoint-recipe" in error
    assert markers(planted) == [] and "planted_code" not in sys.modules


@pytest.mark.parametrize(
    ("section", "values", "key"),
    [
        ("distillation", {"teacher": "t.ckpt", "teacher_class": "planted_code.Layer"}, "distillation.teacher_class"),
        ("distillation", {"teacher": "self", "teacher_inputs": "planted_code.input_fn"}, "distillation.teacher_inputs"),
        ("distillation", {"teacher": "self", "cache": "memory", "index_fn": "planted_code.input_fn"}, "distillation.index_fn"),
        ("distillation", {"teacher": "self", "alpha": "${vars.schedule}"}, "distillation.alpha"),
        ("qat", {"targets": ["planted_code.Layer"]}, "qat.targets"),
        ("pruning", {"exclude": ["planted_code:Layer"]}, "pruning.exclude"),
        ("export", {"dirpath": "x", "input_fn": "os.getcwd"}, "export.input_fn"),  # imported already: still called
    ],
)
def test_an_untrusted_recipe_imports_nothing(planted, section, values, key):
    recipe = {"vars": {"schedule": "planted_code.alpha"}, section: values}
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe, trusted=False)
    assert f"recipe key {key}: " in str(caught.value) and "would be imported" in str(caught.value)
    assert markers(planted) == [] and "planted_code" not in sys.modules


def test_an_untrusted_recipe_keeps_names_and_loaded_classes():
    names = ["torch.nn.Linear", "net.0", "encoder.*", "encoder.layer", "torch.nn.NoSuchLayer", "tests.cli_models.sub.Layer"]
    recipe = load_recipe({"qat": {"targets": names}}, trusted=False)
    # a class of a module already imported; the rest are layer names (nothing found, nothing imported)
    assert recipe._arguments["qat"]["targets"] == [torch.nn.Linear, *names[1:]]


# ---------------------------------------------------------------------- 3. recipes stay small; secrets stay out
def chain(depth: int, reverse: bool = False) -> dict:
    """Each value repeats the one before ten times: ~1 KB that expands to 100 * 10**depth characters."""
    values = {"a0": "x" * 100, **{f"a{i}": "".join(f"${{vars.a{i - 1}}}" for _ in range(10)) for i in range(1, depth + 1)}}
    if reverse:
        values = dict(reversed(list(values.items())))
    return {"pruning": {"final_sparsity": 0.5, "name": f"${{vars.a{depth}}}"}, "vars": values}


@pytest.mark.parametrize("reverse", [False, True], ids=["in-order", "reversed"])
def test_an_exponential_interpolation_is_refused_at_the_first_value_too_large(reverse):
    recipe = chain(9, reverse)  # 10**11 characters if it were built
    assert len(json.dumps(recipe)) < 1200
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe)
    assert str(caught.value).startswith("recipe key vars.a3: the value is 100,000 characters long after interpolation")
    assert f"{MAX_VALUE_CHARS:,} characters (64 KiB)" in str(caught.value)
    load_recipe(chain(2))  # 10,000 characters is fine


def test_size_limits_of_one_value_and_the_whole_recipe():
    with pytest.raises(RecipeError, match=r"recipe key pruning.name: the value is 70,000 characters"):
        load_recipe({"pruning": {"final_sparsity": 0.5, "name": "x" * 70_000}})
    many = {f"v{i}": "y" * 60_000 for i in range(20)}
    with pytest.raises(RecipeError, match=r"recipe key vars.v17: the recipe grows past 1,048,576 characters"):
        load_recipe({"vars": many, "qat": {}})
    # one value that would build a huge string from values each under the limit: refused unbuilt
    wide = {"big": "z" * 60_000, "wide": "${vars.big}" * 100}
    with pytest.raises(RecipeError, match=r"recipe key vars.wide: its 100 interpolations could expand to"):
        load_recipe({"vars": wide, "qat": {}})
    expanded = {"a": "w" * 3_000, "list": ["${vars.a}"] * 20, "copies": ["${vars.list}"] * 20}
    with pytest.raises(RecipeError, match=r"recipe key vars.copies\[\d+\]: the recipe grows past"):
        load_recipe({"vars": expanded, "qat": {}})


@pytest.mark.parametrize(
    ("recipe", "exclude", "message"),
    [
        ({"vars": {"a": "${vars.b}", "b": "${vars.a}"}, "qat": {}}, (), "recipe key vars.a: its interpolations refer back to it (vars.a -> vars.b -> vars.a)"),
        ({"vars": {"a": "x${vars.a}"}, "qat": {}}, (), "recipe key vars.a: Recursive interpolation detected"),
        ({"vars": {"m": {"k": "${vars.x}"}, "x": 1, "s": "in ${vars.m}"}, "qat": {}}, (),
         "recipe key vars.s: a mapping or list that holds interpolations cannot be part of a string"),
        ({"distillation": {"teacher": "${oc.env:LC_TRUST_UNSET}"}, "pruning": {"name": "${distillation.teacher}"}}, ["distillation"],
         "recipe key pruning.name: "),
        ({"vars": {"x": "???"}, "qat": {}}, (), "recipe key vars.x has no value (???)"),
    ],
)
def test_interpolation_errors_name_the_key(monkeypatch, recipe, exclude, message):
    monkeypatch.delenv("LC_TRUST_UNSET", raising=False)
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe, exclude=exclude)
    assert message in str(caught.value)
    if exclude:
        assert "distillation.teacher cannot be resolved" in str(caught.value)


def test_an_excluded_section_keeps_what_does_not_resolve(monkeypatch):
    monkeypatch.delenv("LC_TRUST_UNSET", raising=False)
    recipe = load_recipe({"distillation": {"teacher": "${oc.env:LC_TRUST_UNSET}", "temperature": "???"}, "qat": {}},
                         exclude=["distillation"])
    assert recipe.config["distillation"] == {"teacher": "${oc.env:LC_TRUST_UNSET}", "temperature": "???"}


def test_the_internal_resolver_is_not_for_recipes():
    config = OmegaConf.create({"a": "${lightning_compress.recipe_value:0}"})
    load_recipe({"qat": {}})  # registers it
    with pytest.raises(Exception, match="internal to lightning_compress recipes"):
        _ = config.a


def test_environment_values_are_used_but_not_recorded(tmp_path, monkeypatch):
    secret = "s3cr3t-token-0123"
    monkeypatch.setenv("LC_TRUST_SECRET", secret)
    recipe = {
        "vars": {"token": "${oc.env:LC_TRUST_SECRET}", "until": 0},
        "qat": {"weights": "int8", "start_step": "${vars.until}"},
        "export": {"dirpath": str(tmp_path) + "/packed-${vars.token}"},
    }
    loaded = load_recipe(recipe)
    assert loaded.config == {
        "vars": {"token": "${oc.env:LC_TRUST_SECRET}", "until": 0},
        "qat": {"weights": "int8", "start_step": 0},
        "export": {"dirpath": str(tmp_path) + "/packed-${vars.token}"},
    }
    assert load_recipe(loaded.config).config == loaded.config  # the record loads again, to the same values
    pl.seed_everything(0)
    trainer = make_trainer(
        max_epochs=1,
        enable_checkpointing=True,
        callbacks=[*loaded.callbacks(), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
    )
    trainer.fit(RecipeMLP(hidden=32), RecipeData(samples=SAMPLES))
    packed = tmp_path / f"packed-{secret}"  # the run used the value
    assert (packed / "model.safetensors").is_file()
    stored = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["lightning_compress"]["recipe"]
    assert stored == loaded.config
    assert secret not in json.dumps(stored)
    assert read_metadata(packed)["recipe"] == loaded.config
    assert secret not in (packed / "compression.json").read_text()
    # an export of the checkpoint resolves the variable again, in its own environment
    export_checkpoint(tmp_path / "ckpt" / "last.ckpt", RecipeMLP, output=tmp_path / "again")
    assert read_metadata(tmp_path / "again")["weights_sha256"] == read_metadata(packed)["weights_sha256"]


def test_a_reference_chain_too_deep_to_follow_is_a_recipe_error():
    values = {"a0": 1, **{f"a{i}": f"${{vars.a{i - 1}}}" for i in range(1, 1200)}}  # past Python's recursion limit
    with pytest.raises(RecipeError, match=r"recipe key vars\.a\d+: "):
        load_recipe({"vars": dict(reversed(list(values.items()))), "qat": {}})
