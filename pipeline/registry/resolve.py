"""Which model a command means: the champion, a registry tag (model or Bento) or a model folder.

m = resolve_model(None)                 # the champion
m = resolve_model("lesionflow:abc")     # a Bento's model
m = resolve_model("artifacts/model")    # a folder (its threshold: its own operating point, else
                                        # the evaluate stage's when it judged this very model)
m.path, m.label, m.threshold            # threshold None: the model was never evaluated
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.core.fsutil import read_json
from pipeline.core.layout import Layout
from pipeline.model import bundle
from pipeline.registry.champions import champion
from pipeline.registry.store import RegistryError
from pipeline.registry.trace import describe


@dataclass(frozen=True)
class ResolvedModel:
    """A model folder, the name a person knows it by, and its operating threshold (if known)."""

    path: Path
    label: str
    threshold: float | None
    packaged: bool


def _folder_threshold(folder: Path, project_root: Path | None) -> float | None:
    op = bundle.operating_point(folder)
    if op is not None:
        return op.threshold
    if project_root is None:
        return None
    # an unpackaged model: the evaluate stage's operating point, if it judged this very model
    candidate = read_json(Layout(project_root).evaluate_dir / bundle.OPERATING_POINT_FILE)
    if candidate and candidate.get("model_md5") == bundle.model_md5(folder, missing_ok=True):
        return bundle.OperatingPoint.from_record(candidate, Layout(project_root).evaluate_dir).threshold
    return None


def resolve_model(model: str | None, project_root: Path | None = None) -> ResolvedModel:
    """The model of ``model`` (None: the champion; a folder; a model or Bento tag); raises
    :class:`RegistryError` saying what exists when there is no such model."""
    if model is None:
        champ = champion()
        if champ is None:
            raise RegistryError("no champion yet: run `lesionflow run` first, or pass --model DIR_OR_TAG")
        return ResolvedModel(Path(champ["path"]), champ["tag"], champ["metadata"].get("threshold"), True)
    if Path(model).is_dir():
        folder = Path(model)
        return ResolvedModel(folder, str(folder), _folder_threshold(folder, project_root), False)
    try:
        d = describe(model)
    except RegistryError as exc:
        raise RegistryError(f"--model {model}: not a directory, and {exc}") from None
    return ResolvedModel(Path(d["path"]), d["tag"], d.get("threshold"), True)
