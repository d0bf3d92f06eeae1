"""The project's layout: the one owner of where things live, relative to the project root.

``data/`` is the DVC-tracked input (never written), ``artifacts/<stage>/`` the stages' outputs for
machines, ``reports/<stage>/`` their outputs for people (both DVC outputs, git-ignored),
``.lesionflow/`` the local state (the BentoML and Prefect homes, the last run, the workspace
lock, caches) and ``logs/`` the service's inference log. ``dvc.yaml`` names the same paths (DVC
needs them written out); a test checks that the two agree.

    LAYOUT.splits_dir            # artifacts/splits (relative: entry points run from the root)
    Layout(root).last_run        # <root>/.lesionflow/last_run.json
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: The split names, in order.
SPLITS: tuple[str, ...] = ("train", "val", "test")


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

    # -- what each DVC stage reads and writes ---------------------------------------------------------
    def stage_paths(self, stage: str) -> dict[str, Path]:
        """The default of each path flag of a DVC stage's command line (:mod:`pipeline.core.stagecli`):
        the paths ``dvc.yaml`` gives the stage as deps and outs (a test checks that they agree)."""
        table = {
            "validate": {
                "metadata": self.metadata_csv,
                "images": self.images_dir,
                "index": self.validation_index,
                "reports": self.reports("validation"),
            },
            "split": {
                "metadata": self.metadata_csv,
                "index": self.validation_index,
                "out": self.splits_dir,
                "reports": self.reports("split"),
            },
            "eda": {
                "metadata": self.metadata_csv,
                "splits": self.splits_dir,
                "images": self.images_dir,
                "out": self.eda_dir,
                "reports": self.reports("eda"),
            },
            "train": {
                "splits": self.splits_dir,
                "images": self.images_dir,
                "out": self.model_dir,
                "reports": self.reports("train"),
            },
            "retrieval": {
                "model": self.model_dir,
                "splits": self.splits_dir,
                "images": self.images_dir,
                "out": self.retrieval_dir,
            },
            "reference": {
                "model": self.model_dir,
                "splits": self.splits_dir,
                "images": self.images_dir,
                "eda": self.eda_dir,
                "out": self.reference_dir,
            },
            "evaluate": {
                "model": self.model_dir,
                "splits": self.splits_dir,
                "images": self.images_dir,
                "eda": self.eda_dir,
                "retrieval": self.retrieval_dir,
                "out": self.evaluate_dir,
                "reports": self.reports("evaluate"),
            },
        }
        if stage not in table:
            raise KeyError(f"no stage {stage!r} (stages: {', '.join(table)})")
        return table[stage]


#: The layout relative to the working directory (entry points make it the project root).
LAYOUT = Layout()
