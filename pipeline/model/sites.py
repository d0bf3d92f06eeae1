"""A model's operating points per site: ``sites/<name>.json`` in its folder.

At another clinic (other dermoscopes, other patients) the model's threshold may no longer reach the
target sensitivity. ``lesionflow site add`` (:mod:`pipeline.audit.sites`) measures the model on that
site's labelled images and records the threshold that restores it there; this module owns those
records: their names and fields, reading and writing them, and what a request naming a site is
answered with (:meth:`Site.point`, :attr:`Site.suitable`). A site whose specificity at the target
sensitivity is below ``serving.min_site_specificity`` is recorded as not suitable: the service gives
probabilities there, but no decision.

A record names the ``model_md5`` it was measured with; a folder whose weights differ refuses it
(:func:`load`), so a site's threshold never silently applies to another model. NumPy-free and
torch-free: the service reads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core import fsutil
from pipeline.core.errors import LesionflowError
from pipeline.model import bundle

#: A site's name: letters, digits, '.', '_' and '-', at most 64 characters (it is a file name).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: The request field (form field or query parameter) and header naming a site.
FIELD = "site"
HEADER = "x-lesionflow-site"


class SiteError(LesionflowError, ValueError):
    """A site name that is malformed or unknown to the model; the message names it and the known ones."""


@dataclass(frozen=True)
class Site:
    """One site's operating point, as recorded with the model (the full record in ``record``)."""

    name: str
    threshold: float
    target_sensitivity: float
    suitable: bool
    reason: str | None
    record: dict[str, Any]

    def point(self, positive_class: str) -> bundle.OperatingPoint:
        """The operating point decisions at this site are made at."""
        return bundle.OperatingPoint(self.threshold, positive_class, self.target_sensitivity, self.record)

    @property
    def message(self) -> str | None:
        """Why there is no decision at this site (None where it is suitable)."""
        if self.suitable:
            return None
        return f"no decision at site {self.name!r}: not suitable for this model ({self.reason})"

    def summary(self) -> dict[str, Any]:
        """What ``/model`` and ``lesionflow site list`` show of it."""
        r = self.record
        keys = ("created_at", "n_images", "n_malignant", "specificity", "sensitivity", "threshold_interval")
        return {
            "name": self.name,
            "threshold": self.threshold,
            "target_sensitivity": self.target_sensitivity,
            "suitable": self.suitable,
            "reason": self.reason,
            **{k: r.get(k) for k in keys},
        }


def check_name(name: str) -> str:
    """``name`` when it is a valid site name; :class:`SiteError` otherwise."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise SiteError(
            f"site name {name!r}: use letters, digits, '.', '_' and '-' (at most 64, starting with a letter or digit)"
        )
    return name


def path(folder: Path | str, name: str) -> Path:
    """Where site ``name``'s record lives in a model folder."""
    return Path(folder) / bundle.SITES_DIR / f"{check_name(name)}.json"


def from_record(record: dict[str, Any], source: Path | str) -> Site:
    """A :class:`Site` from its record; :class:`bundle.ModelLoadError` naming ``source`` and the
    field when one is missing or invalid."""
    try:
        name = check_name(record["name"])
        threshold = float(record["threshold"])
        target = float(record["target_sensitivity"])
        suitable = record["suitable"]
    except (KeyError, TypeError, ValueError, SiteError) as exc:
        raise bundle.ModelLoadError(f"{source}: not a site record ({type(exc).__name__}: {exc})") from None
    if not 0.0 <= threshold <= 1.0 or not isinstance(suitable, bool):
        raise bundle.ModelLoadError(f"{source}: field 'threshold' outside [0, 1] or 'suitable' not true/false")
    return Site(name, threshold, target, suitable, record.get("reason"), dict(record))


def _model_md5(folder: Path) -> str | None:
    return (bundle.read_metadata(folder) or {}).get("model_md5") or bundle.model_md5(folder, missing_ok=True)


def load(folder: Path | str) -> dict[str, Site]:
    """The sites recorded with the model in ``folder``, by name; :class:`bundle.ModelLoadError`
    naming the file of a malformed record or of one measured with other weights."""
    d = Path(folder)
    files = sorted((d / bundle.SITES_DIR).glob("*.json"))
    if not files:
        return {}
    md5, found = _model_md5(d), {}
    for f in files:
        record = fsutil.read_json(f)
        site = from_record(record if isinstance(record, dict) else {}, f)
        if site.name != f.stem:
            raise bundle.ModelLoadError(f"{f}: records site {site.name!r}, not {f.stem!r}")
        if record.get("model_md5") != md5:
            raise bundle.ModelLoadError(
                f"{f}: measured with model md5 {record.get('model_md5')}, not this model's {md5}: "
                "run `lesionflow site add` again for this model"
            )
        found[site.name] = site
    return found


def write(folder: Path | str, record: dict[str, Any]) -> Path:
    """Record a site with the model in ``folder`` (``sites/<name>.json``); returns the file. The
    record must name this folder's weights (``model_md5``)."""
    d = Path(folder)
    site = from_record(record, "the new site record")
    if record.get("model_md5") != _model_md5(d):
        raise SiteError(f"site {site.name!r} was measured with model md5 {record.get('model_md5')}, not {d}'s")
    target = path(d, site.name)
    fsutil.write_json(target, record)
    return target


def choose(sites: dict[str, Site], name: str | None) -> Site | None:
    """The site a request names (None when it names none); :class:`SiteError` for a name the model
    has no record of, listing those it has."""
    if name is None or name == "":
        return None
    if name in sites:
        return sites[name]
    known = ", ".join(sorted(sites)) or "none (lesionflow site add)"
    shown = name if len(name) <= 64 else name[:64] + "..."
    raise SiteError(f"unknown site {shown!r}; this model's sites: {known}")
