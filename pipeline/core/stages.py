"""The pipeline's stages: the one list, read from ``dvc.yaml``, and what each stage reads and writes.

``dvc.yaml`` is the owner: its stages, in file order, are the pipeline (the retraining flow runs
them in that order, the code map checks their deps, the docs list them). A stage's command line
takes its paths from the same entry, so a path is written once, in ``dvc.yaml``:

* an input flag for each path of :data:`INPUTS` that a dep names (or lies inside: ``data`` holds
  both the metadata table and the images);
* ``--out`` for the stage's output folder under ``artifacts/`` (an output that is itself a known
  input of later stages, such as the validate stage's image index, keeps that input's flag);
* ``--reports`` for the folder of its outputs under ``reports/``.

Adding a stage means its entry in ``dvc.yaml``, its module ``pipeline/stages/<name>.py`` and its
section of ``params.yaml``. Standard library and PyYAML only.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.layout import Layout

_CMD = re.compile(r"python -m ([\w.]+)")
#: The gate stage: the retraining flow exports the champion before it and reads its verdict after.
GATE_STAGE = "evaluate"
#: What a person opens of a stage's outputs (Prefect links them after a run).
REPORT_SUFFIXES = (".md", ".html", ".png")


def inputs(layout: Layout) -> dict[str, Path]:
    """The paths stages read, by the flag that names them (:mod:`pipeline.core.stagecli`)."""
    return {
        "metadata": layout.metadata_csv,
        "images": layout.images_dir,
        "index": layout.validation_index,
        "decisions": layout.label_decisions,
        "splits": layout.splits_dir,
        "eda": layout.eda_dir,
        "model": layout.model_dir,
        "retrieval": layout.retrieval_dir,
    }


@lru_cache(maxsize=8)
def _read(dvc_yaml: Path, mtime: float) -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(dvc_yaml.read_text()) or {}
    return dict(doc.get("stages") or {})


def specs(root: Path | str = ".") -> dict[str, dict[str, Any]]:
    """The stages of ``<root>/dvc.yaml`` as DVC reads them, in file order."""
    path = Path(root) / "dvc.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (the pipeline's stages are defined there)")
    return _read(path.resolve(), path.stat().st_mtime)


def names(root: Path | str = ".") -> tuple[str, ...]:
    """The stage names, in pipeline order."""
    return tuple(specs(root))


def module(spec: dict[str, Any]) -> str:
    """The module a stage runs (``python -m <module>``)."""
    m = _CMD.search(spec.get("cmd", ""))
    if not m:
        raise ValueError(f"stage command {spec.get('cmd')!r} does not run `python -m <module>`")
    return m.group(1)


def entries(spec: dict[str, Any], *keys: str) -> list[str]:
    """A stage's paths under ``keys`` (``deps``, ``outs``, ``metrics``, ``plots``); entries may be
    strings or one-key mappings."""
    return [e if isinstance(e, str) else next(iter(e)) for key in keys for e in spec.get(key) or []]


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def paths(stage: str, root: Path | str = ".") -> dict[str, Path]:
    """The default of each path flag of ``stage``'s command line, relative to the project root (see
    the module docstring); ``KeyError`` naming the known stages for an unknown one."""
    table = specs(root)
    if stage not in table:
        raise KeyError(f"no stage {stage!r} in dvc.yaml (stages: {', '.join(table)})")
    spec, known = table[stage], inputs(Layout())
    deps = [Path(d) for d in entries(spec, "deps")]
    outs = [Path(o) for o in entries(spec, "outs", "metrics", "plots")]
    flags = {flag: path for flag, path in known.items() if any(_inside(path, d) for d in deps)}
    by_path = {path: flag for flag, path in known.items()}
    for out in outs:
        if out.parts[0] == "artifacts" and len(out.parts) > 2 and out in by_path:
            flags[by_path[out]] = out  # a file that later stages read under its own flag
        elif out.parts[0] in ("artifacts", "reports"):
            flags.setdefault("out" if out.parts[0] == "artifacts" else "reports", Path(*out.parts[:2]))
    return flags


def report_files(stage: str, root: Path | str = ".") -> list[Path]:
    """The outputs of ``stage`` a person opens (Markdown, HTML, PNG files under ``reports/``)."""
    found = entries(specs(root)[stage], "outs", "metrics", "plots")
    return [Path(o) for o in found if o.startswith("reports/") and o.endswith(REPORT_SUFFIXES)]
