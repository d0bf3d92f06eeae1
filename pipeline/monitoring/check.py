"""One drift check of a workspace, from what a user or a schedule gives: a folder of images (with
an optional metadata/label CSV) or the last hours of the service's inference log. What the
monitoring flow and ``lesionflow monitor`` run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core import params
from pipeline.core.layout import Layout
from pipeline.model.bundle import REFERENCE_DIR
from pipeline.monitoring import batch, drift, inferencelog, logstore, profile


def resolve_reference(root: Path, model_dir: Path, reference_dir: str | Path | None) -> Path:
    """The profile to compare with: the given one, else the one packaged with the model
    (its ``reference/`` folder), else the ``reference`` stage's."""
    if reference_dir:
        return root / reference_dir
    packaged = root / model_dir / REFERENCE_DIR
    return packaged if packaged.exists() else Layout(root).reference_dir


def preflight(
    root: Path,
    folder: str | None = None,
    metadata_csv: str | None = None,
    model_dir: str | None = None,
    reference_dir: str | None = None,
) -> None:
    """What a check needs, read before it starts: the folder holds images, the metadata table is
    one, the reference profile is there; a :class:`~pipeline.core.errors.LesionflowError` naming
    the file or folder otherwise."""
    from pipeline.core import images
    from pipeline.core.metadata import read_metadata_csv

    if folder is not None:
        if not Path(folder).is_dir():
            raise profile.MonitorError(f"{folder}: not a folder of images")
        if not images.list_images([folder])[0]:
            raise profile.MonitorError(f"{folder}: holds no image files ({', '.join(images.IMAGE_EXTENSIONS)})")
    if metadata_csv is not None:
        read_metadata_csv(metadata_csv)
    mdir = Path(model_dir) if model_dir else Layout(root).model_dir
    profile.load_reference(resolve_reference(root, mdir, reference_dir))


def check_workspace(
    root: Path,
    folder: str | None = None,
    metadata_csv: str | None = None,
    hours: float | None = None,
    model_dir: str | None = None,
    reference_dir: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build the current batch (``folder``, else the inference log's last ``hours``) and run the
    check against the reference profile; returns the summary (its ``report_dir`` holds the reports)."""
    layout = Layout(root)
    p = params.load_section("monitor", layout.params_file)
    mdir = Path(model_dir) if model_dir else layout.model_dir
    ref = profile.load_reference(resolve_reference(root, mdir, reference_dir))
    if folder is not None:
        from pipeline.model.inference import load_model

        profile.check_model_matches(ref, root / mdir)
        current, skipped = batch.current_from_folder(
            folder,
            ref,
            load_model(root / mdir, device="cpu"),
            metadata_csv=metadata_csv,
            taxonomy=params.load_taxonomy(layout.params_file),
            workers=p.workers,
            chunk_size=p.chunk_size,
            batch_size=p.batch_size,
            progress=progress,
        )
        source = {"kind": "folder", "path": str(folder), "metadata_csv": metadata_csv}
    else:
        start, end = inferencelog.window(hours or p.window_hours)
        location = logstore.location(root)
        if location is None:
            raise profile.MonitorError(f"the inference log is off (${logstore.LOCATION_ENV}=off): nothing to check")
        current, skipped = batch.current_from_log(location, start, end), []
        source = {"kind": "log", "path": location, "window": [start.isoformat(), end.isoformat()]}
    return drift.run_check(ref, current, p, layout.monitoring_reports, source, skipped_images=skipped)
