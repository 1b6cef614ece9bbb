"""What a non-editable install holds: the ready recipes ship in the wheel, and an installed
copy finds them by name (the demo's default recipe included). And what `make test-min`
installs: every declared floor, pinned."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lightning_compress.recipes import BUILTIN_RECIPES_DIR, builtin_recipes

ROOT = Path(__file__).resolve().parents[1]
READY = {"distill_prune_quantize", "gradual_pruning_90", "int4_weight_only", "int8_qat", "lora", "qlora",
         "sparse24_int4", "gguf_q4_0", "gguf_q8_0", "qad_int4"}


def test_the_checkouts_recipes_folder_is_the_packaged_one():
    assert set(builtin_recipes()) == READY
    assert (ROOT / "recipes").resolve() == BUILTIN_RECIPES_DIR
    assert BUILTIN_RECIPES_DIR.parent == ROOT / "lightning_compress"


def test_an_installed_wheel_finds_the_ready_recipes_by_name(tmp_path):
    # Build from a copy: setuptools writes build/ and *.egg-info next to pyproject.toml.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "lightning_compress", source / "lightning_compress",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("lightning_compress-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    assert {f"lightning_compress/builtin_recipes/{name}.yaml" for name in READY} <= names

    # The installed copy, not the checkout, answers: run from elsewhere with it first on the path.
    probe = (
        "import lightning_compress, lightning_compress.demo as demo\n"
        "from lightning_compress import load_recipe\n"
        "print(lightning_compress.__file__)\n"
        "print(load_recipe('int8_qat').config['qat']['weights'])\n"
        "print(demo.DEFAULT_RECIPE.is_file())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    location, weights, demo_recipe = result.stdout.split()[-3:]
    assert Path(location).is_relative_to(tmp_path / "site")
    assert weights == "int8" and demo_recipe == "True"


# ---------------------------------------------------------------------- make test-min
def _min_constraints():
    import importlib.util

    spec = importlib.util.spec_from_file_location("min_constraints", ROOT / "ci" / "min_constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_min_constraints_pin_every_declared_floor(tmp_path):
    module = _min_constraints()
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\ndependencies = ["torch>=2.4", "jsonargparse[signatures]>=4.39,<5", "Foo_Bar >= 1.2"]\n'
        '[project.optional-dependencies]\ndev = ["foo-bar>=1.10", "pytest>=8"]\n'
    )
    # the higher floor of a package named twice binds (1.10 > 1.2 numerically, not as text)
    assert module.floors(pyproject, ["dev"]) == {"torch": "2.4", "jsonargparse": "4.39", "foo-bar": "1.10", "pytest": "8"}
    assert module.floors(pyproject, []) == {"torch": "2.4", "jsonargparse": "4.39", "foo-bar": "1.2"}


def test_min_constraints_refuse_a_requirement_without_a_floor_or_an_unknown_extra(tmp_path):
    module = _min_constraints()
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["rich"]\n[project.optional-dependencies]\ndev = []\n')
    with pytest.raises(SystemExit, match="'rich' has no '>=' floor"):
        module.floors(pyproject, [])
    with pytest.raises(SystemExit, match="unknown extra 'gpu'"):
        module.floors(pyproject, ["gpu"])


def test_min_constraints_check_reports_a_version_above_its_floor():
    module = _min_constraints()
    from importlib.metadata import version

    installed = version("pytest")
    assert module.check_installed({"pytest": installed}) == []
    assert module.check_installed({"pytest": "1.0"}) == [f"pytest: installed {installed}, floor 1.0"]
    assert module.check_installed({"no-such-package-here": "1"}) == ["no-such-package-here: not installed, floor 1"]


def test_every_declared_dependency_of_the_test_lanes_has_a_floor():
    floors = _min_constraints().floors(ROOT / "pyproject.toml", ["dev", "examples", "onnx"])
    assert {"torch", "lightning", "torchao", "transformers", "peft", "compressed-tensors", "onnxruntime"} <= set(floors)


# ---------------------------------------------------------------------- make mutation
def _mutation_score():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mutation_score", ROOT / "ci" / "mutation_score.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_run(tmp_path, codes, equivalent_lines):
    meta = tmp_path / "mutants" / "pkg" / "mod.py.meta"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"exit_code_by_key": codes}))
    (tmp_path / "ci").mkdir()
    (tmp_path / "ci" / "equivalent_mutants.txt").write_text("\n".join(equivalent_lines) + "\n")


def test_mutation_score_counts_kills_and_timeouts_and_leaves_out_equivalents(tmp_path, monkeypatch, capsys):
    module = _mutation_score()
    # 9 killed (exit 1), 1 timeout (36), 1 survivor, 1 equivalent survivor: 10 of 11 = 90.9%
    codes = {f"m{i}": 1 for i in range(9)} | {"slow": 36, "alive": 0, "same": 0}
    _fake_run(tmp_path, codes, ["# comment", "same  # the default is never read"])
    monkeypatch.setattr(module, "ROOT", tmp_path)
    monkeypatch.setattr(module, "EQUIVALENT_FILE", tmp_path / "ci" / "equivalent_mutants.txt")
    assert module.main([]) == 0
    out = capsys.readouterr().out
    assert "mutation score 90.9%: 10 killed of 11 mutants (12 made, 1 equivalent)" in out
    assert "survived: alive" in out and "survived: same" not in out
    assert module.main(["--minimum", "95"]) == 1


def test_mutation_score_fails_on_untested_mutants_stale_equivalents_and_no_run(tmp_path, monkeypatch, capsys):
    module = _mutation_score()
    _fake_run(tmp_path, {"a": 1, "b": 33, "c": None}, ["gone  # renamed since"])
    monkeypatch.setattr(module, "ROOT", tmp_path)
    monkeypatch.setattr(module, "EQUIVALENT_FILE", tmp_path / "ci" / "equivalent_mutants.txt")
    assert module.main(["--minimum", "0"]) == 1  # the stale name fails even at minimum 0
    captured = capsys.readouterr()
    assert "names gone, which this run did not make" in captured.err
    assert "mutation score 33.3%" in captured.out and "survived: b" in captured.out  # no tests is not a kill
    monkeypatch.setattr(module, "ROOT", tmp_path / "elsewhere")
    assert module.main([]) == 1
    assert "no results under mutants/" in capsys.readouterr().err


def test_mutation_score_record_keeps_the_figures_and_rewrites_benchmarks_md(tmp_path, monkeypatch, capsys):
    module = _mutation_score()
    codes = {f"m{i}": 1 for i in range(8)} | {"slow": 36, "cpu": -24, "alive": 0, "bare": 33, "same": 0}
    _fake_run(tmp_path, codes, ["same  # the default is never read"])
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(ROOT / "benchmarks" / "run_all.py", tmp_path / "benchmarks" / "run_all.py")
    kept = {"command": "python benchmarks/x.py", "date": "2026-01-02", "machine": "m", "seconds": 5,
            "heading": "x", "body": ["| a |"], "rows": [{"area": "file size", "metric": "x ratio", "figure": "2.00x",
                                                          "target": None}]}
    (tmp_path / "benchmarks" / "results.json").write_text(json.dumps({"x": kept}))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "ci"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "run"], check=True)
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    monkeypatch.setattr(module, "ROOT", tmp_path)
    monkeypatch.setattr(module, "EQUIVALENT_FILE", tmp_path / "ci" / "equivalent_mutants.txt")

    assert module.main(["--record", "--seconds", "5400"]) == 1  # 10 of 12 = 83.3%: recorded, and failed
    results = json.loads((tmp_path / "benchmarks" / "results.json").read_text())
    assert results["x"] == kept
    entry = results["mutation_score"]
    assert entry["command"] == "make mutation" and entry["seconds"] == 5400
    assert entry["heading"] == f"mutation testing of the numeric core at commit {commit}"
    assert entry["rows"] == [{"area": "test quality", "figure": "83.3% (10 of 12)", "target": ">= 90% (issue 15)",
                              "metric": "mutation score of the numeric core (killed of non-equivalent mutants)"}]
    table = "\n".join(entry["body"])
    for line in ("| killed by a failing test | 8 |", "| killed by a timeout | 2 |", "| survived | 1 |",
                 "| no test covers it | 1 |", "| other outcomes (not killed) | 0 |",
                 "| equivalent, left out (`ci/equivalent_mutants.txt`) | 1 |", "| made | 13 |"):
        assert line in table
    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Test quality" in report and "| x ratio | 2.00x |" in report
    assert "| mutation score of the numeric core (killed of non-equivalent mutants) | 83.3% (10 of 12) |" \
           " >= 90% (issue 15) | `make mutation` |" in report
    assert "Command: `make mutation` (5400 s," in report

    # a later edit to a tracked file: the commit is marked as not what ran
    (tmp_path / "ci" / "equivalent_mutants.txt").write_text("same  # the default is never read\n# edited\n")
    assert module.main(["--record", "--seconds", "1", "--minimum", "80"]) == 0
    entry = json.loads((tmp_path / "benchmarks" / "results.json").read_text())["mutation_score"]
    assert entry["heading"].endswith(f"{commit} + uncommitted changes")
    capsys.readouterr()


def test_mutation_score_records_only_a_whole_run(tmp_path, monkeypatch, capsys):
    module = _mutation_score()
    _fake_run(tmp_path, {"a": 1, "b": None}, [])
    monkeypatch.setattr(module, "ROOT", tmp_path)
    monkeypatch.setattr(module, "EQUIVALENT_FILE", tmp_path / "ci" / "equivalent_mutants.txt")
    assert module.main(["--record", "--seconds", "9", "--minimum", "0"]) == 1
    assert "not recorded: some mutants were never run" in capsys.readouterr().err
    assert not (tmp_path / "BENCHMARKS.md").exists()
    with pytest.raises(SystemExit):
        module.main(["--record"])  # how long the run took is part of the record
    assert "--record needs --seconds" in capsys.readouterr().err
    # --mutants reads a run made in another checkout
    elsewhere = tmp_path / "other"
    _fake_run(elsewhere, {"a": 1, "b": 0}, [])
    assert module.main(["--mutants", str(elsewhere / "mutants"), "--minimum", "50"]) == 0
    assert "mutation score 50.0%: 1 killed of 2 mutants" in capsys.readouterr().out


def test_a_benchmarks_markdown_keeps_one_blank_line_between_its_tables():
    """GitHub renders a line right under a table as one more row: run_all keeps the
    benchmark's blank lines (one of a run), and leaves out what is not markdown."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    printed = ["running...", "## heading", "", "| a |", "|---|", "", "", "| b |", "ROW {}", "", "Target: x", "", ""]
    assert module.markdown_section(printed) == ["## heading", "", "| a |", "|---|", "", "| b |", "", "Target: x"]
    assert module.markdown_section(["", "chatter", ""]) == []
