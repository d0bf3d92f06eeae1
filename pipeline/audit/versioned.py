"""Reading a file exactly as a recorded version had it, from the workspace's DVC cache.

A packaged model records the md5 of its data version (``data.dvc``) and of every stage output
(``dvc.lock``); DVC keeps each version's files in its cache under their md5. So the metadata CSV
a model was trained on, its split files or its model card are found by md5, whatever the workspace
holds today:

    cache = VersionedFiles(Path("."))
    files = cache.listing("60aa2b6d237d319124b599881c54bd69.dir")   # {relpath: md5}
    text = cache.read(files["HAM10000_metadata.csv"])

A missing object raises :class:`VersionError` saying how to bring it back (``dvc fetch``).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.errors import LesionflowError


class VersionError(LesionflowError):
    """A recorded version whose files are not in the local DVC cache."""


class VersionedFiles:
    """The DVC cache of the workspace at ``root`` (its configured ``cache.dir``)."""

    def __init__(self, root: Path | str):
        from dvc.repo import Repo

        self.root = Path(root)
        try:
            with Repo(str(self.root)) as repo:
                self.cache = Path(repo.cache.local.path)
        except Exception as exc:  # not a DVC repository, unreadable config
            raise VersionError(f"{self.root}: no DVC repository to read recorded versions from ({exc})") from None

    def path(self, md5: str) -> Path:
        """Where the object ``md5`` (``...dir`` for a folder's listing) lives in the cache."""
        md5 = str(md5)
        return self.cache / md5[:2] / md5[2:]

    def read(self, md5: str, what: str = "file") -> bytes:
        """The bytes of the object ``md5``; ``what`` names it in the error."""
        path = self.path(md5)
        try:
            return path.read_bytes()
        except OSError:
            raise VersionError(
                f"{what} (md5 {md5}) is not in the DVC cache {self.cache}: fetch that version first "
                "(git checkout <its commit> && dvc fetch), or pull it from the DVC remote"
            ) from None

    def listing(self, dir_md5: str, what: str = "folder") -> dict[str, str]:
        """``{relpath: md5}`` of a folder version (its ``.dir`` object)."""
        if not str(dir_md5).endswith(".dir"):
            raise VersionError(f"{what}: md5 {dir_md5} is a file's, not a folder's (no .dir suffix)")
        try:
            entries = json.loads(self.read(dir_md5, what))
        except ValueError as exc:
            raise VersionError(f"{what} (md5 {dir_md5}): the cached listing is not JSON ({exc})") from None
        return {str(e["relpath"]): str(e["md5"]) for e in entries}

    def read_in(self, dir_md5: str, relpath: str, what: str) -> bytes:
        """The bytes of ``relpath`` inside the folder version ``dir_md5``."""
        files = self.listing(dir_md5, what)
        if relpath not in files:
            raise VersionError(f"{what} (md5 {dir_md5}) has no {relpath}")
        return self.read(files[relpath], f"{what}/{relpath}")


def stage_output(dvc_lock: dict, stage: str, path: str) -> str | None:
    """The md5 ``dvc.lock`` (as recorded with a model: ``{stage: {"outs": {path: md5}}}``) gives
    the output ``path`` of ``stage``; None when not recorded."""
    return ((dvc_lock or {}).get(stage) or {}).get("outs", {}).get(path)
