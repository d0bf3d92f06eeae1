"""The one place that reads ``params.yaml``.

Every section of ``params.yaml`` is a typed dataclass registered with :func:`section`. Loading is
strict: an unknown key, a missing key, a value of the wrong type or out of range fails with a
:class:`ParamsError` whose message names the file, the dotted key and the offending value, e.g.::

    params.yaml: split.val_fraction: must be in (0, 1), got 1.5

Stages read only their own section (``load_section("split")``), as in DVC's example-get-started,
so that ``dvc.yaml`` can declare exactly the parameters each stage depends on. The module needs
only the standard library and PyYAML, so ``python -m pipeline.train`` runs on a bare GPU machine.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from pipeline import taxonomy

DEFAULT_PARAMS = Path("params.yaml")

T = TypeVar("T")


class ParamsError(ValueError):
    """A bad ``params.yaml``: the message names the key and the value."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)

    def under(self, prefix: str) -> "ParamsError":
        key = f"{prefix}.{self.key}" if self.key else prefix
        return ParamsError(key, self.message)


def fail(key: str, message: str) -> typing.NoReturn:
    """Raise a :class:`ParamsError` for ``key`` (relative to the dataclass being checked)."""
    raise ParamsError(key, message)


_SECTIONS: dict[str, type] = {}


def section(name: str):
    """Class decorator: register a dataclass as the schema of ``params.yaml``'s section ``name``."""

    def register(cls: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass")
        _SECTIONS[name] = cls
        return cls

    return register


def sections() -> dict[str, type]:
    """The registered section names and their schema classes."""
    return dict(_SECTIONS)


# ----------------------------------------------------------------------------------------------
# strict conversion of plain YAML values into typed dataclasses


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    args = get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ParamsError as exc:
                errors.append(exc.message)
        fail(key, f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            fail(key, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            fail(key, f"expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            fail(key, f"expected a mapping, got {value!r}")
        k_tp, v_tp = args if args else (Any, Any)
        return {_convert(k, k_tp, key): _convert(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            fail(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail(key, f"expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    fail(key, f"expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type[T], data: Any, key: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, strictly; errors name ``key`` + the field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        fail(key, f"expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        where = f"{key}." if key else ""
        raise ParamsError(
            f"{where}{unknown[0]}", f"unknown key (known keys: {', '.join(sorted(known))})"
        )
    kwargs = {}
    for name, fld in known.items():
        sub = f"{key}.{name}" if key else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], sub)
        elif fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
            fail(sub, "missing required key")
    try:
        return cls(**kwargs)
    except ParamsError as exc:
        raise exc.under(key) if key else exc


def to_dict(obj: Any) -> Any:
    """A dataclass (or nested structure of them) as plain JSON/YAML-ready values."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


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
        raise ParamsError(
            f"{path}: {unknown[0]}", f"unknown section (known: {', '.join(sorted(schemas))})"
        )
    return {name: load_section(name, path) for name in schemas if name in data}


def load_taxonomy(path: Path | str = DEFAULT_PARAMS) -> taxonomy.Taxonomy:
    """The label taxonomy configured in the ``labels`` section."""
    return load_section("labels", path).taxonomy()


# ----------------------------------------------------------------------------------------------
# the sections


@section("labels")
@dataclasses.dataclass(frozen=True)
class LabelsParams:
    """Diagnoses and their mapping to risk classes and to binary benign/malignant."""

    diagnoses: list[str]
    risk: dict[str, list[str]]
    binary: dict[str, list[str]]
    binary_positive: str = "malignant"

    def __post_init__(self) -> None:
        try:
            self.taxonomy()
        except taxonomy.TaxonomyError as exc:
            fail(exc.key, exc.message)

    def taxonomy(self) -> taxonomy.Taxonomy:
        return taxonomy.Taxonomy.from_mapping(
            self.diagnoses, self.risk, self.binary, binary_positive=self.binary_positive
        )


@section("validate")
@dataclasses.dataclass(frozen=True)
class ValidateParams:
    """The data contract: what the metadata and the image files must satisfy."""

    image_id_pattern: str = r"^ISIC_\d{7}$"
    required_columns: list[str] = dataclasses.field(
        default_factory=lambda: ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
    )
    dx_types: list[str] = dataclasses.field(
        default_factory=lambda: ["histo", "follow_up", "consensus", "confocal"]
    )
    sexes: list[str] = dataclasses.field(default_factory=lambda: ["male", "female", "unknown"])
    localizations: list[str] = dataclasses.field(default_factory=list)
    age_min: float = 0.0
    age_max: float = 120.0
    min_width: int = 64
    min_height: int = 64
    image_extensions: list[str] = dataclasses.field(default_factory=lambda: [".jpg"])
    require_rgb: bool = True
    workers: int = 0
    max_examples: int = 5

    def __post_init__(self) -> None:
        try:
            re.compile(self.image_id_pattern)
        except re.error as exc:
            fail("image_id_pattern", f"not a valid regular expression ({exc}): {self.image_id_pattern!r}")
        if not 0 <= self.age_min < self.age_max:
            fail("age_max", f"must be greater than age_min >= 0, got {self.age_min}..{self.age_max}")
        if self.min_width < 1 or self.min_height < 1:
            fail("min_width", "min_width and min_height must be at least 1")
        if self.workers < 0:
            fail("workers", f"must be 0 (all cores) or a positive count, got {self.workers}")
        if self.max_examples < 1:
            fail("max_examples", f"must be at least 1, got {self.max_examples}")
        for ext in self.image_extensions:
            if not ext.startswith("."):
                fail("image_extensions", f"extensions start with a dot, got {ext!r}")


@section("split")
@dataclasses.dataclass(frozen=True)
class SplitParams:
    """Train/val/test split grouped by lesion (and patient), stratified by diagnosis."""

    seed: int = 42
    train_fraction: float = 0.70
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    group_column: str = "lesion_id"
    patient_column: str = "patient_id"
    stratify_column: str = "dx"

    def __post_init__(self) -> None:
        for name in ("train_fraction", "val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                fail(name, f"must be in (0, 1), got {value}")
        total = self.train_fraction + self.val_fraction + self.test_fraction
        if abs(total - 1.0) > 1e-6:
            fail("test_fraction", f"train + val + test fractions must sum to 1, got {total:.4f}")
