"""Strict conversion of plain YAML/JSON values into typed dataclasses.

:func:`from_dict` builds a (frozen) dataclass from a mapping and refuses an unknown key, a missing
required key, a value of the wrong type and, through the dataclass's own ``__post_init__`` checks
(:func:`fail`), a value out of range, with a :class:`ParamsError` that names the dotted key and the
value, e.g. ``split.val_fraction: must be in (0, 1), got 1.5``. :func:`to_dict` is the inverse.
Used for ``params.yaml`` (:mod:`pipeline.core.params`) and for the configurations stored in JSON
beside artefacts. Standard library only.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from pipeline.core.errors import LesionflowError

T = TypeVar("T")


class ParamsError(LesionflowError, ValueError):
    """A bad parameter: the message names the (dotted) key and the value."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)

    def under(self, prefix: str) -> ParamsError:
        key = f"{prefix}.{self.key}" if self.key else prefix
        return ParamsError(key, self.message)


def fail(key: str, message: str) -> typing.NoReturn:
    """Raise a :class:`ParamsError` for ``key`` (relative to the dataclass being checked)."""
    raise ParamsError(key, message)


# ----------------------------------------------------------------------------------------------
# strict conversion of plain YAML values into typed dataclasses


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


#: Scalar types: (what a value must be, what it must not be, the words of the error, conversion).
_SCALARS: dict[type, tuple[type | tuple[type, ...], type | None, str, Any]] = {
    bool: (bool, None, "true or false", lambda v: v),
    int: (int, bool, "an integer", lambda v: v),
    float: ((int, float), bool, "a number", float),
    str: (str, None, "a string", lambda v: v),
}


def _convert_union(value: Any, args: tuple, key: str) -> Any:
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(value, arg, key)
        except ParamsError:
            continue
    fail(key, f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")


def _convert_container(value: Any, origin: Any, args: tuple, key: str) -> Any:
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            fail(key, f"expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if not isinstance(value, dict):
        fail(key, f"expected a mapping, got {value!r}")
    k_tp, v_tp = args if args else (Any, Any)
    return {_convert(k, k_tp, key): _convert(v, v_tp, f"{key}.{k}") for k, v in value.items()}


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, args, key)
    if origin is Literal:
        if value not in args:
            fail(key, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple, dict):
        return _convert_container(value, origin, args, key)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp in _SCALARS:
        accepted, refused, words, convert = _SCALARS[tp]
        if not isinstance(value, accepted) or (refused is not None and isinstance(value, refused)):
            fail(key, f"expected {words}, got {value!r}")
        return convert(value)
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
        raise ParamsError(f"{where}{unknown[0]}", f"unknown key (known keys: {', '.join(sorted(known))})")
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
        if key:
            raise exc.under(key) from None
        raise


def to_dict(obj: Any) -> Any:
    """A dataclass (or nested structure of them) as plain JSON/YAML-ready values."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(
    section: dict[str, Any], override_file: Path | None, sets: Sequence[str], name: str = "train"
) -> dict[str, Any]:
    """Merge an override YAML (its ``<name>:`` section) and ``--set <name>.a.b=value`` into a copy
    of the section ``name`` as read from params.yaml."""
    out = copy.deepcopy(section)

    def merge(dst: dict, src: dict) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = v

    if override_file is not None:
        doc = yaml.safe_load(Path(override_file).read_text()) or {}
        if name not in doc:
            raise ParamsError(f"{override_file}", f"expected a '{name}:' section")
        merge(out, doc[name])
    for item in sets:
        if "=" not in item:
            raise ParamsError(item, f"expected --set {name}.key=value")
        key, raw = item.split("=", 1)
        parts = key.split(".")
        if parts[0] != name or len(parts) < 2:
            raise ParamsError(key, f"only {name}.* keys can be set here")
        d = out
        for k in parts[1:-1]:
            d = d.setdefault(k, {})
        d[parts[-1]] = yaml.safe_load(raw)
    return out
