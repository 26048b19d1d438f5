"""The base of run configurations: one flat, typed record whose field names are the ``--set``
keys (:class:`FlatConfig`), and :class:`ConfigError`. The schemas themselves, which name
algorithms and data sets, are presets: :class:`metajax.presets.config.Config` (meta-learning)
and :class:`metajax.presets.continual.ContinualConfig`."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path


class ConfigError(ValueError):
    """A configuration a run cannot start from; the message says what to change."""


class FlatConfig:
    """Shared behaviour of flat, typed, frozen dataclass configurations.

    Field names are the ``--set`` keys; values are int, float, str or bool. Subclasses are
    frozen dataclasses and define ``validate``.
    """

    def check_types(self) -> None:
        """Raise :class:`ConfigError` when a field's value does not have the field's type."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = _field_type(type(self), f)
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{f.name} must be an integer, got {value!r}")
            if kind is float and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ConfigError(f"{f.name} must be a number, got {value!r}")
            if kind is bool and not isinstance(value, bool):
                raise ConfigError(f"{f.name} must be true or false, got {value!r}")
            if kind is str and not isinstance(value, str):
                raise ConfigError(f"{f.name} must be a string, got {value!r}")

    def check_bounds(
        self,
        positive: tuple[str, ...] = (),
        non_negative: tuple[str, ...] = (),
        choices: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        """Raise :class:`ConfigError` for the first field out of its range or choices."""
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name, allowed in (choices or {}).items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}"
                )

    def with_overrides(self, pairs: list[str]):
        """A copy with ``key=value`` strings applied, each value parsed to the field's type."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        changes = {}
        for pair in pairs:
            key, sep, raw = pair.partition("=")
            key = key.strip()
            if not sep:
                raise ConfigError(f"--set expects key=value, got {pair!r}")
            if key not in fields:
                raise ConfigError(
                    f"unknown --set key {key!r}; valid keys: {', '.join(sorted(fields))}"
                )
            changes[key] = parse_value(key, _field_type(type(self), fields[key]), raw.strip())
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        """The configuration as stable, indented JSON (what ``config.json`` holds)."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | Path):
        """Read a ``config.json`` written by :meth:`to_json`; unknown keys are an error."""
        data = json.loads(Path(path).read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{path}: unknown configuration keys {unknown}")
        return cls(**data).validate()


def _field_type(cls: type, field: dataclasses.Field) -> type:
    hints = typing.get_type_hints(cls)
    kind = hints[field.name]
    if isinstance(kind, types.UnionType):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def parse_value(key: str, kind: type, raw: str):
    """Parse ``raw`` as ``kind`` (int, float, str or bool), or raise :class:`ConfigError`."""
    try:
        if kind is bool:
            lowered = raw.lower()
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError
            return lowered in ("true", "1")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError:
        raise ConfigError(
            f"--set {key}={raw!r}: expected {kind.__name__}, e.g. {key}="
            + {int: "5", float: "0.01", bool: "true"}[kind]
        ) from None
    return raw
