"""The one place that reads ``params.yaml``.

Every section of ``params.yaml`` is a typed dataclass registered with :func:`section`. Loading is
strict: an unknown key, a missing key, a value of the wrong type or out of range fails with a
:class:`ParamsError` whose message names the file, the dotted key and the offending value, e.g.::

    params.yaml: split.val_fraction: must be in (0, 1), got 1.5

Stages read only their own section (``load_section("split")``), as in DVC's example-get-started,
so that ``dvc.yaml`` can declare exactly the parameters each stage depends on. The schemas of the
sections are :mod:`pipeline.core.sections` and :mod:`pipeline.core.servicesections` (importable
from here too: ``params.TrainParams``); the
strict conversion is :mod:`pipeline.core.strict`. The module needs only the standard library and
PyYAML, so ``python -m pipeline.stages.train`` runs on a bare GPU machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.core import taxonomy
from pipeline.core.sections import (
    AugmentParams,
    EdaParams,
    EvaluateParams,
    GatesParams,
    LabelsParams,
    MetadataParams,
    RetrievalParams,
    ReviewParams,
    SplitParams,
    TrainParams,
    TrustParams,
    ValidateParams,
    section,
    sections,
)
from pipeline.core.servicesections import MonitorParams, QueueParams, ServingParams
from pipeline.core.statsconfig import ABCD_COLOURS, ColourRules, FeatureConfig
from pipeline.core.strict import ParamsError, apply_overrides, fail, from_dict, to_dict

__all__ = [
    "ABCD_COLOURS",
    "AugmentParams",
    "EdaParams",
    "EvaluateParams",
    "GatesParams",
    "LabelsParams",
    "MetadataParams",
    "MonitorParams",
    "QueueParams",
    "RetrievalParams",
    "ReviewParams",
    "ServingParams",
    "SplitParams",
    "TrainParams",
    "TrustParams",
    "ValidateParams",
    "ColourRules",
    "FeatureConfig",
    "ParamsError",
    "fail",
    "from_dict",
    "to_dict",
    "load_section",
    "load_all",
    "load_taxonomy",
    "read_yaml",
    "section",
    "sections",
    "apply_overrides",
]

DEFAULT_PARAMS = Path("params.yaml")

# ----------------------------------------------------------------------------------------------
# reading the file


def read_yaml(path: Path | str = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ParamsError("", f"{path}: file not found (run from the project root)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError("", f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ParamsError("", f"{path}: expected a mapping of sections at the top level")
    return data


def load_section(name: str, path: Path | str = DEFAULT_PARAMS) -> Any:
    """Load and check one section, e.g. ``load_section("split")`` -> :class:`SplitParams`."""
    schemas = sections()
    if name not in schemas:
        raise ParamsError(name, f"no such section (known: {', '.join(sorted(schemas))})")
    data = read_yaml(path)
    if name not in data:
        raise ParamsError(f"{path}: {name}", "section missing from the file")
    try:
        return from_dict(schemas[name], data[name], name)
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc.key}", exc.message) from None


def load_all(path: Path | str = DEFAULT_PARAMS) -> dict[str, Any]:
    """Load and check every section of the file; unknown sections are an error."""
    data = read_yaml(path)
    schemas = sections()
    unknown = sorted(set(data) - set(schemas))
    if unknown:
        raise ParamsError(f"{path}: {unknown[0]}", f"unknown section (known: {', '.join(sorted(schemas))})")
    return {name: load_section(name, path) for name in schemas if name in data}


def load_taxonomy(path: Path | str = DEFAULT_PARAMS) -> taxonomy.Taxonomy:
    """The label taxonomy configured in the ``labels`` section."""
    return load_section("labels", path).taxonomy()
