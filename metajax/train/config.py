"""The base of run configurations: one flat, typed record whose field names are the ``--set``
keys (:class:`FlatConfig`), and :class:`ConfigError`. The schemas themselves, which name
algorithms and data sets, are presets: :class:`metajax.presets.config.Config` (meta-learning)
and :class:`metajax.presets.continual.ContinualConfig`."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from pathlib import Path


class ConfigError(ValueError):
    """A configuration a run cannot start from; the message says what to change."""


INT_RANGE = (-(2**31), 2**31 - 1)
FLOAT32_MAX = 3.4028234663852886e38


class FlatConfig:
    """Shared behaviour of flat, typed, frozen dataclass configurations.

    Field names are the ``--set`` keys; values are int, float, str or bool. Subclasses are
    frozen dataclasses and define ``validate``. Integers must fit in int32 and numbers must
    be finite and representable in float32 (what the device computes with), so no value can
    overflow later inside a compiled function. :attr:`RUN_CONTROL` names the fields that do
    not change a run's result (stopping criteria, paths, checkpoint cadence): they are left
    out of :meth:`fingerprint`, so a resumed run may change them.
    """

    RUN_CONTROL: tuple[str, ...] = ()
    # Fields added after runs were already written, newest first: each entry is one
    # generation of ``(field, default)`` pairs. A run written before a generation existed
    # was fingerprinted without its fields, so :meth:`fingerprints` also accepts the hash
    # that leaves them out while they hold those defaults (the result is the same).
    LATER_FIELDS: tuple[tuple[tuple[str, object], ...], ...] = ()

    def check_types(self) -> None:
        """Raise :class:`ConfigError` when a field's value does not have the field's type."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = _field_type(type(self), f)
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{f.name} must be an integer, got {value!r}")
            if kind is int and not INT_RANGE[0] <= value <= INT_RANGE[1]:
                raise ConfigError(f"{f.name}={value} is out of range: integers must lie in "
                                  f"[{INT_RANGE[0]}, {INT_RANGE[1]}]")
            if kind is float and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ConfigError(f"{f.name} must be a number, got {value!r}")
            if kind is float and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
                raise ConfigError(f"{f.name}={value!r} is not a finite float32 number "
                                  f"(|x| <= {FLOAT32_MAX:.4g})")
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
                    f"unknown --set key {key!r}{did_you_mean(key, fields)}; valid keys: "
                    f"{', '.join(sorted(fields))}"
                )
            changes[key] = parse_value(key, _field_type(type(self), fields[key]), raw.strip())
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        """The configuration as stable, indented JSON (what ``config.json`` holds)."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    def run_control(self) -> tuple[str, ...]:
        """The fields a resumed run may change: :attr:`RUN_CONTROL` (a subclass narrows it
        when a field matters to this configuration, e.g. ``steps`` under a decaying
        learning-rate schedule)."""
        return self.RUN_CONTROL

    def fingerprint(self) -> str:
        """A hash of every field that changes the run's result (all but :meth:`run_control`)."""
        return self._hash(set())

    def fingerprints(self) -> set[str]:
        """:meth:`fingerprint` and the fingerprints the same configuration had before the
        fields of :attr:`LATER_FIELDS` existed (each generation left out in turn, while its
        fields hold their defaults): what a checkpoint of this run may carry."""
        out, omitted = {self.fingerprint()}, set()
        values = dataclasses.asdict(self)
        for generation in self.LATER_FIELDS:
            if any(values[name] != default for name, default in generation):
                break
            omitted |= {name for name, _ in generation}
            out.add(self._hash(omitted))
        return out

    def _hash(self, omitted: set[str]) -> str:
        control = self.run_control()
        fields = {k: v for k, v in dataclasses.asdict(self).items()
                  if k not in control and k not in omitted}
        text = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def differences(self, other: FlatConfig) -> list[str]:
        """``key: this -> other`` for every result-changing field that differs."""
        mine, theirs = dataclasses.asdict(self), dataclasses.asdict(other)
        control = set(self.run_control()) & set(other.run_control())
        return [f"{k}: {mine[k]!r} -> {theirs.get(k)!r}" for k in sorted(mine)
                if k not in control and mine[k] != theirs.get(k)]

    @classmethod
    def from_json_file(cls, path: str | Path):
        """Read a ``config.json`` written by :meth:`to_json`.

        Raises:
          ConfigError: naming the file, when it is not JSON, not an object, has unknown keys
            or a value the schema rejects.
        """
        try:
            data = json.loads(Path(path).read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not a readable configuration ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a configuration is a JSON object, got "
                              f"{type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{path}: unknown configuration keys {unknown}")
        try:
            return cls.from_mapping(data).validate()
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The configuration's field names (the ``--set`` keys), in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, data: dict, base: FlatConfig | None = None):
        """``base`` (default: the schema's defaults) with the fields of ``data`` replaced.

        Integers given for float fields become floats (a file's ``inner_lr = 1`` is the
        ``1.0`` a preset holds, with the same :meth:`fingerprint`). Types are checked
        (:meth:`check_types`), ranges are not: call ``validate`` once every override is in.

        Raises:
          ConfigError: a key that is not a field (naming the closest one), or a value whose
            type the field does not take.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in data:
            if key not in fields:
                raise ConfigError(f"unknown configuration key {key!r}"
                                  f"{did_you_mean(key, fields)}")
        changes = {}
        for key, value in data.items():
            if _field_type(cls, fields[key]) is float and isinstance(value, int) \
                    and not isinstance(value, bool):
                try:
                    value = float(value)
                except OverflowError:
                    raise ConfigError(f"{key}={value} is not a finite float32 number "
                                      f"(|x| <= {FLOAT32_MAX:.4g})") from None
            changes[key] = value
        config = dataclasses.replace(base if base is not None else cls(), **changes)
        config.check_types()
        return config


def did_you_mean(name: str, choices) -> str:
    """`` (did you mean 'x'?)`` naming the choices closest to ``name``, or ``""`` when none
    is close."""
    close = difflib.get_close_matches(name, sorted(choices), n=3, cutoff=0.6)
    if not close:
        return ""
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)"


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
