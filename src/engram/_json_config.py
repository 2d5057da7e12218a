"""A mixin that gives config dataclasses their JSON round trip, with unknown keys refused by name."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self


class JsonConfig:
    """``to_dict`` / ``from_dict`` / ``to_json`` / ``from_json`` / ``load`` for a dataclass."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__} must be given a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid keys are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Self:
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """Read a JSON config file, naming the file in any error."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            return cls.from_json(path.read_text())
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{path}: {exc}") from exc
