"""The BentoML stores of lesionflow models and Bentos: where they are, what they hold, and what a
tag names.

The stores live under ``$BENTOML_HOME`` (every entry point defaults it to the project's
``.lesionflow/bentoml``; tests use a temporary folder). It is read from the environment at every
call, so a process can switch homes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipeline.core.errors import LesionflowError
from pipeline.model.bundle import RECORD_FILE

MODEL_NAME = "lesionflow-classifier"
BENTO_NAME = "lesionflow"


class RegistryError(LesionflowError, RuntimeError):
    """A registry operation that cannot be done; the message says what and why."""


def bentoml_home() -> Path:
    """``$BENTOML_HOME`` (BentoML's default ``~/bentoml`` when unset)."""
    return Path(os.path.expanduser(os.environ.get("BENTOML_HOME", os.path.join("~", "bentoml"))))


def model_store() -> Any:
    """BentoML's model store under :func:`bentoml_home` (created when missing)."""
    from bentoml._internal.models.model import ModelStore

    path = bentoml_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return ModelStore(str(path))


def bento_store() -> Any:
    """BentoML's Bento store under :func:`bentoml_home` (created when missing)."""
    from bentoml._internal.bento.bento import BentoStore

    path = bentoml_home() / "bentos"
    path.mkdir(parents=True, exist_ok=True)
    return BentoStore(str(path))


def models() -> list[Any]:
    """Every stored lesionflow model, oldest first."""
    from bentoml.exceptions import NotFound

    try:
        found = model_store().list(MODEL_NAME)
    except NotFound:
        return []
    return sorted(found, key=lambda m: (m.info.creation_time, str(m.tag.version)))


def plain(obj: Any) -> Any:
    """JSON round trip: plain dicts/lists/str/numbers/None."""
    return json.loads(json.dumps(obj, default=str))


def model_record(model: Any) -> dict[str, Any]:
    """``{"tag", "path", "labels", "metadata", "created_at"}`` of a stored model; ``metadata`` is its
    full lineage record (``lesionflow.json``; BentoML's own metadata drops None values)."""
    info = model.info
    record_file = Path(model.path) / RECORD_FILE
    if record_file.exists():
        metadata = json.loads(record_file.read_text())
        metadata.pop("tag", None)
    else:
        metadata = plain(dict(info.metadata))
    return {
        "tag": str(model.tag),
        "path": str(model.path),
        "labels": dict(info.labels),
        "metadata": metadata,
        "created_at": info.creation_time.isoformat(timespec="seconds"),
    }


def known_tags() -> str:
    """The newest model and Bento tags and the store, for an error message about a tag."""
    tags = [str(m.tag) for m in models()][-5:]
    try:
        bentos = [str(b.tag) for b in bento_store().list(BENTO_NAME)][-5:]
    except Exception:  # NotFound when there is none
        bentos = []
    return (
        f"known models: {', '.join(tags) or 'none'}; known bentos: {', '.join(bentos) or 'none'} "
        f"(store: {bentoml_home()})"
    )


def get_bento(tag: str) -> Any:
    """The stored Bento of ``tag``, or :class:`RegistryError` listing the known tags."""
    from bentoml.exceptions import BentoMLException, NotFound

    try:
        return bento_store().get(tag)
    except (NotFound, BentoMLException):
        raise RegistryError(f"unknown bento {tag!r}; {known_tags()}") from None


def _parse(tag: str) -> Any:
    from bentoml._internal.tag import Tag
    from bentoml.exceptions import BentoMLException

    if not isinstance(tag, str) or not tag.strip():
        raise RegistryError(f"empty tag; {known_tags()}")
    try:
        return Tag.from_taglike(tag.strip())
    except (ValueError, BentoMLException) as exc:
        raise RegistryError(f"{tag.strip()!r} is not a valid tag ({exc}); {known_tags()}") from None


def resolve(tag: str) -> tuple[Any, str | None]:
    """(the stored model, the Bento tag or None) of a model tag or a Bento tag; :class:`RegistryError`
    for an empty, malformed or unknown tag."""
    from bentoml._internal.models.model import ModelStore
    from bentoml.exceptions import BentoMLException, NotFound

    parsed = _parse(tag)
    if parsed.name == MODEL_NAME:
        try:
            return model_store().get(parsed), None
        except (NotFound, BentoMLException):
            raise RegistryError(f"unknown tag {tag!r}: no such model in the BentoML store; {known_tags()}") from None
    try:
        bento = bento_store().get(parsed)
    except (NotFound, BentoMLException):
        raise RegistryError(
            f"unknown tag {tag!r}: no such model or bento in the BentoML store; {known_tags()}"
        ) from None
    refs = [m for m in bento.info.all_models if m.tag.name == MODEL_NAME]
    if not refs:
        raise RegistryError(f"bento {bento.tag} holds no {MODEL_NAME} model")
    try:
        return model_store().get(refs[0].tag), str(bento.tag)
    except (NotFound, BentoMLException):  # an imported bento carries its models inside
        return ModelStore(str(Path(bento.path) / "models")).get(refs[0].tag), str(bento.tag)
