"""Config dataclasses: JSON round trip, every value checked against its declared type and range.

A config class is a ``@dataclass`` deriving from ``JsonConfig``. On construction, in Python or from
JSON, each field is converted to its annotation (an ``int`` given for a ``float`` becomes a float, a
list for a ``tuple[float, float]`` a tuple, a dict for a nested config that config) or refused;
then the class's ``validate`` checks ranges and the relations between fields, mostly through
``require``. Every problem raises ``ConfigError``, whose message names the key path from the top of
the document and, for a file, the file: ``configs/run.json: model.moe.top_k: must be between 1 and
n_routed_experts (4), got 9``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import numbers
import operator
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

if TYPE_CHECKING:
    from typing_extensions import Self


class ConfigError(ValueError):
    """A config value of the wrong type or out of range, an unknown or missing key, or an unreadable file.

    ``str(error)`` reads ``file: key.path: problem``; the file and the key appear when known.
    """

    def __init__(self, key: str, problem: str, file: str | None = None) -> None:
        super().__init__(key, problem, file)  # all three in args, so that the error survives pickling
        self.key, self.problem, self.file = key, problem, file

    def __str__(self) -> str:
        return ": ".join(part for part in (self.file, self.key, self.problem) if part)

    def under(self, parent: str) -> ConfigError:
        """The same error seen from the config that holds this one at key ``parent``."""
        return ConfigError(f"{parent}.{self.key}" if self.key else parent, self.problem, self.file)


class JsonConfig:
    """``to_dict`` / ``from_dict`` / ``to_json`` / ``from_json`` / ``load``, and type checks, for a dataclass.

    Subclasses put their range and cross-field checks in ``validate`` (not ``__post_init__``), which
    runs once every field has its declared type.
    """

    def __post_init__(self) -> None:
        for name, hint in _field_types(type(self)).items():
            setattr(self, name, _convert(getattr(self, name), hint, name))
        self.validate()

    def validate(self) -> None:
        """Check ranges and relations between fields; raise ``ConfigError`` naming the key."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """The config of a dict (parsed JSON); nested configs may be dicts too."""
        if not isinstance(data, dict):
            raise ConfigError(
                "", f"the top level must be a JSON object of {cls.__name__} keys, got {type(data).__name__}"
            )
        types_ = _field_types(cls)
        unknown = sorted(set(data) - set(types_))
        if unknown:
            raise ConfigError("", f"unknown {cls.__name__} keys {unknown}; valid keys are {sorted(types_)}")
        for field in dataclasses.fields(cls):
            required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            if required and field.name not in data:
                raise ConfigError(field.name, f"missing; expected {_describe(types_[field.name])}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Self:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError("", f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """Read a JSON config file, naming the file in any error."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError("", f"not UTF-8 text (byte {exc.start})", str(path)) from None
        except ConfigError as exc:
            raise ConfigError(exc.key, exc.problem, str(path)) from None


def require(
    config: JsonConfig,
    name: str,
    *,
    ge: float | str | None = None,
    gt: float | str | None = None,
    le: float | str | None = None,
    lt: float | str | None = None,
) -> None:
    """Raise ``ConfigError`` unless field ``name`` (every item of it, for a list) lies within the bounds.

    A bound is a number or the name of another field of ``config``, e.g.
    ``require(self, "top_k", ge=1, le="n_routed_experts")``. A field left at ``None`` is not checked.
    """
    value = getattr(config, name)
    if value is None:
        return
    limits = _limits(config, ge=ge, gt=gt, le=le, lt=lt)
    is_list = isinstance(value, (list, tuple))
    for item in value if is_list else [value]:
        problem = _range_problem(item, limits)
        if problem:
            raise ConfigError(name, f"{'every item ' if is_list else ''}{problem}, got {value!r}")


def option_type(
    kind: type[int] | type[float],
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Callable[[str], Any]:
    """An argparse ``type=`` that reads a command-line value as ``kind`` and checks the bounds as ``require`` does.

    argparse reports a refused value against its option (``argument --top-p: must be > 0 and <= 1,
    got 1.5``) and exits with code 2 before the command runs.
    """
    limits = _limits(None, ge=ge, gt=gt, le=le, lt=lt)

    def parse(text: str) -> Any:
        try:
            value = _coerce(kind(text), kind)
        except (ValueError, _WrongType):
            raise argparse.ArgumentTypeError(f"expected {_describe(kind)}, got {text!r}") from None
        problem = _range_problem(value, limits)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {text}")
        return value

    return parse


_OPERATORS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def _limits(config: JsonConfig | None, **bounds: float | str | None) -> dict[str, tuple[float, str]]:
    """Operator name -> (bound, how a message names it) for the bounds given; a str bound is a field of ``config``."""
    limits = {}
    for op, bound in bounds.items():
        if isinstance(bound, str):
            limits[op] = (getattr(config, bound), f"{bound} ({getattr(config, bound)})")
        elif bound is not None:
            limits[op] = (bound, str(bound))
    return limits


def _range_problem(value: float, limits: dict[str, tuple[float, str]]) -> str | None:
    """``None`` if ``value`` meets every limit, else what it must be (``must be >= 0 and < 1``)."""
    if all(_OPERATORS[op][0](value, bound) for op, (bound, _) in limits.items()):
        return None
    if limits.keys() == {"ge", "le"}:
        return f"must be between {limits['ge'][1]} and {limits['le'][1]}"
    return "must be " + " and ".join(f"{_OPERATORS[op][1]} {label}" for op, (_, label) in limits.items())


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation (the modules use ``from __future__ import annotations``)."""
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)}


class _WrongType(Exception):
    """A value that does not fit a type; ``_convert`` reports it with the key and the expected type."""


def _convert(value: Any, hint: Any, key: str) -> Any:
    """``value`` as field type ``hint``, or a ``ConfigError`` at ``key``."""
    try:
        return _coerce(value, hint)
    except _WrongType:
        raise ConfigError(key, f"expected {_describe(hint)}, got {value!r}") from None
    except ConfigError as exc:  # inside a nested config given as a dict
        raise exc.under(key) from None


def _coerce(value: Any, hint: Any) -> Any:
    """``value`` as type ``hint``; ``_WrongType`` if it is not one."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if any(type(value) is type(choice) and value == choice for choice in args):  # True is not 1
            return value
    elif origin in (Union, types.UnionType):
        for arm in args:
            try:
                return _coerce(value, arm)
            except _WrongType:
                pass
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):  # JSON has lists only; Python callers may give tuples
            if origin is list:
                return [_coerce(item, args[0]) for item in value]
            if len(value) == len(args):
                return tuple(_coerce(item, arm) for item, arm in zip(value, args, strict=True))
    elif hint is bool or hint is str or hint is type(None):
        if isinstance(value, hint):
            return value
    elif hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):  # numpy integers too
            return int(value)
    elif hint is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif isinstance(hint, type) and issubclass(hint, JsonConfig):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            return hint.from_dict(value)
    else:
        raise TypeError(f"config fields of type {hint} are not supported")
    raise _WrongType


_NAMES = {
    int: ("an integer", "integers"),
    float: ("a finite number", "finite numbers"),
    bool: ("true or false", "true or false values"),
    str: ("a string", "strings"),
    type(None): ("null", "nulls"),
}


def _describe(hint: Any, plural: bool = False) -> str:
    """What a value of type ``hint`` looks like, in words: ``a list of integers``, ``'adamw' or 'muon'``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        choices = [repr(choice) for choice in args]
        return choices[0] if len(choices) == 1 else f"{', '.join(choices[:-1])} or {choices[-1]}"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arm, plural) for arm in args)
    if origin is list:
        return f"a list of {_describe(args[0], plural=True)}"
    if origin is tuple:  # fixed length, one item type
        return f"a list of {len(args)} {_describe(args[0], plural=True)}"
    if isinstance(hint, type) and issubclass(hint, JsonConfig):
        return f"{hint.__name__} objects" if plural else f"a {hint.__name__} object"
    return _NAMES[hint][plural]
