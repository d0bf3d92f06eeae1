"""The project's layout: the one owner of where things live, relative to the project root.

``data/`` is the DVC-tracked input (never written), ``artifacts/<stage>/`` the stages' outputs for
machines, ``reports/<stage>/`` their outputs for people (both DVC outputs, git-ignored),
``.lesionflow/`` the local state (the BentoML and Prefect homes, the last run, the workspace
lock, caches) and ``logs/`` the service's inference log. ``dvc.yaml`` names the same paths (DVC
needs them written out) and each stage's command line takes its defaults from there
(:mod:`pipeline.core.stages`); a test checks that the two agree.

    LAYOUT.splits_dir            # artifacts/splits (relative: entry points run from the root)
    Layout(root).last_run        # <root>/.lesionflow/last_run.json
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: The split names, in order.
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Where the service's inference log goes unless ``monitor.log_url`` or ``$LESIONFLOW_INFERENCE_LOG``
#: says otherwise (relative to the folder of params.yaml; :func:`pipeline.monitoring.logstore.location`).
INFERENCE_LOG = "logs/inference"


@dataclass(frozen=True)
class Layout:
    """Every path of a project rooted at ``root`` (default ``.``: the working directory, which the
    entry points make the project root)."""

    root: Path = Path(".")

    # -- input (DVC-tracked) ---------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def metadata_csv(self) -> Path:
        return self.data_dir / "HAM10000_metadata.csv"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def data_pointer(self) -> Path:
        """``data.dvc``: the data version."""
        return self.root / "data.dvc"

    @property
    def params_file(self) -> Path:
        return self.root / "params.yaml"

    @property
    def dvc_lock(self) -> Path:
        return self.root / "dvc.lock"

    # -- stage outputs for machines ---------------------------------------------------------------
    def artifacts(self, stage: str) -> Path:
        return self.root / "artifacts" / stage

    @property
    def validation_index(self) -> Path:
        """One row per image: file, md5, format, size (stage ``validate``)."""
        return self.artifacts("validation") / "images.csv"

    @property
    def label_decisions(self) -> Path:
        """Label-review decisions (git-tracked; read by the ``split`` and ``review`` stages)."""
        return self.root / "labels" / "decisions.csv"

    @property
    def splits_dir(self) -> Path:
        return self.artifacts("splits")

    def split_file(self, name: str, splits_dir: Path | None = None) -> Path:
        return (splits_dir or self.splits_dir) / f"{name}.csv"

    @property
    def eda_dir(self) -> Path:
        return self.artifacts("eda")

    @property
    def image_cache_dir(self) -> Path:
        """Training's uint8 tensor cache (not a DVC output: keyed by data version and resolution)."""
        return self.artifacts("cache")

    @property
    def model_dir(self) -> Path:
        return self.artifacts("model")

    @property
    def reference_dir(self) -> Path:
        return self.artifacts("reference")

    @property
    def retrieval_dir(self) -> Path:
        """The retrieval index of the training split (stage ``retrieval``, packaged with the model)."""
        return self.artifacts("retrieval")

    @property
    def evaluate_dir(self) -> Path:
        return self.artifacts("evaluate")

    @property
    def champion_dir(self) -> Path:
        """The champion exported by the flow for ``evaluate``'s no-regression gates (not a DVC
        dependency of ``evaluate``; see flows/retrain.py)."""
        return self.artifacts("champion")

    # -- stage outputs for people -------------------------------------------------------------------
    def reports(self, stage: str) -> Path:
        return self.root / "reports" / stage

    @property
    def monitoring_reports(self) -> Path:
        return self.reports("monitoring")

    # -- local state ----------------------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return self.root / ".lesionflow"

    @property
    def last_run(self) -> Path:
        """The last retraining run's record (``lesionflow status``)."""
        return self.state_dir / "last_run.json"

    @property
    def workspace_lock(self) -> Path:
        return self.state_dir / "retrain.lock"

    @property
    def prediction_cache(self) -> Path:
        """``evaluate``'s cache of predictions (model + images -> probabilities)."""
        return self.state_dir / "cache" / "evaluate"


#: The layout relative to the working directory (entry points make it the project root).
LAYOUT = Layout()
