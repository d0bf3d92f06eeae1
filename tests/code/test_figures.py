"""Figures quoted in README and docs against the JSON that produced them (tools/figures.py): every
marked number and checked table of this project agrees with its source, and the check notices a
figure, a table cell, a key, a source or a copied evaluation that does not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT
from tools import figures


def test_every_quoted_figure_agrees_with_the_file_that_produced_it():
    assert figures.problems(PROJECT_ROOT) == []  # README's table of sources too
    assert figures.sources_table(PROJECT_ROOT) in (PROJECT_ROOT / "README.md").read_text()


@pytest.mark.parametrize(
    "text, value, agrees",
    [("152", 152.07, True), ("152", 152.6, False), ("0.93", 0.9261, True), ("0.93", 0.9361, False),
     ("9,834", 9834, True), ("1.3", 1.27, True), ("297", 296.657047, True), ("61", 60.78, True)],
)  # fmt: skip
def test_a_figure_agrees_when_its_source_rounds_to_it(text, value, agrees):
    assert figures.agrees(text, value) is agrees


@pytest.fixture()
def project(tmp_path) -> Path:
    """A small project: a README quoting a result and a doc holding a checked table, the results,
    and a copied evaluation of the run its dvc.lock records."""
    root = tmp_path / "p"
    (root / "benchmarks/results").mkdir(parents=True)
    (root / "docs").mkdir()
    shutil.copy(PROJECT_ROOT / "benchmarks/results/ood_scores.json", root / "benchmarks/results")
    (root / "benchmarks/results/load.json").write_text(
        json.dumps(
            {
                "machine": {"cpu": "x", "cpu_count": 2, "measured_at": "2026-12-07T00:00:00+00:00"},
                "model_md5": "abc",
                "results": {"rps": [151.65, 163.76]},
            }
        )  # fmt: skip
    )
    (root / "README.md").write_text(
        "It answers 152 requests/s<!-- from load.json: results.rps.0 --> against 164<!-- from load.json: "
        "results.rps.1 --> (`load.json`).\n"
    )
    table = figures.importlib.import_module("benchmarks.ood_scores").report_table(
        json.loads((root / "benchmarks/results/ood_scores.json").read_text())
    )
    (root / "docs/trust.md").write_text(
        f"Held out:\n\n<!-- table from ood_scores.json: benchmarks.ood_scores:report_table -->\n{table}"
        "<!-- end table -->\n\nAfter.\n"
    )
    snap = root / figures.SNAPSHOT
    snap.mkdir(parents=True)
    outs, md5s = [], {}
    for rel in figures.SNAPSHOT_FILES:
        data = json.dumps({"file": rel}).encode()
        (snap / Path(rel).name).write_bytes(data)
        md5s[rel] = figures.hashlib.md5(data).hexdigest()
        outs.append(f"    - path: {rel}\n      md5: {md5s[rel]}\n")
    (snap / "source.json").write_text(json.dumps({"dvc_lock_md5": md5s}))
    (root / "dvc.lock").write_text("schema: '2.0'\nstages:\n  evaluate:\n    outs:\n" + "".join(outs))
    return root


def test_the_check_passes_a_project_whose_figures_agree_and_keeps_readme_s_table_of_sources(project):
    assert figures.problems(project) == []
    readme = project / "README.md"
    readme.write_text(readme.read_text() + f"\nSources:\n\n{figures.TABLE_HEADER}\n|---|\n| old |\n\nAfter.\n")
    assert figures.problems(project) == [
        "README.md: the table of sources differs from the files (python -m tools.figures --table)"
    ]
    figures.write_table(project)
    assert figures.problems(project) == []
    text = readme.read_text()
    assert "| `benchmarks/results/load.json` | abc | 2026-12-07T00:00:00+00:00 | x, 2 cores |\n\nAfter.\n" in text


def test_a_figure_that_differs_from_its_source_is_named_with_its_line(project):
    readme = project / "README.md"
    readme.write_text(readme.read_text().replace("against 164", "against 170"))
    assert figures.problems(project) == ["README.md:1: load.json: results.rps.1: the text says 170, the file 163.76"]


def test_a_missing_key_or_source_is_named(project):
    readme = project / "README.md"
    text = readme.read_text().replace("results.rps.0", "results.rpm.0")
    readme.write_text(text.replace("from load.json: results.rps.1", "from gone.json: x"))
    found = figures.problems(project)
    assert found[0] == "README.md:1: load.json: results.rpm.0: no key 'rpm'"
    assert found[1].startswith("README.md:1: gone.json: unreadable")


def test_a_table_cell_that_differs_from_its_source_is_found(project):
    doc = project / "docs/trust.md"
    doc.write_text(doc.read_text().replace("| 50.8 % (48.3-54.4) |", "| 58.0 % (48.3-54.4) |"))
    (found,) = figures.problems(project)
    assert found.startswith("docs/trust.md:3: the table differs from benchmarks.ood_scores:report_table")
    assert "58.0" in found


def test_a_result_that_does_not_say_where_and_when_it_was_measured_is_refused(project):
    src = project / "benchmarks/results/load.json"
    doc = json.loads(src.read_text())
    del doc["machine"]["measured_at"]
    src.write_text(json.dumps(doc))
    assert figures.problems(project) == [
        "benchmarks/results/load.json: does not say on which machine and when it was measured"
    ]


def test_a_copied_evaluation_of_another_run_than_dvc_lock_s_is_refused(project):
    lock = project / "dvc.lock"
    source = json.loads((project / figures.SNAPSHOT / "source.json").read_text())
    md5 = source["dvc_lock_md5"][figures.SNAPSHOT_FILES[0]]
    lock.write_text(lock.read_text().replace(md5, "0" * 32))
    (found,) = figures.problems(project)
    assert "a copy of another run than the committed dvc.lock's" in found and figures.SNAPSHOT_FILES[0] in found
    (project / figures.SNAPSHOT / Path(figures.SNAPSHOT_FILES[1]).name).write_text("{}")
    assert any("not the copy of" in p for p in figures.problems(project))
