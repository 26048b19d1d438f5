"""Configurations read from files: ``metajax train --config FILE`` and ``metajax continual
--config FILE``.

A file is a run directory's ``config.json`` (or the directory itself), or any JSON object or
TOML document of configuration fields (``.toml`` is read as TOML, ``.json`` as JSON, any
other name as JSON, else TOML). Fields the file leaves out come from the preset it names
(``preset = "omniglot-5w1s-maml"``), or from the schema's defaults when it names none (or
``custom``). ``metajax presets NAME`` prints a preset's configuration in this TOML form.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from metajax.presets import PRESETS, get_preset
from metajax.presets.config import Config
from metajax.presets.continual import CONTINUAL_PRESETS, ContinualConfig, get_continual_preset
from metajax.train.config import ConfigError, did_you_mean

KINDS = ("train", "continual")
"""The commands a configuration file can start: ``metajax train`` (:class:`Config`) and
``metajax continual`` (:class:`ContinualConfig`)."""

_SCHEMAS = {
    "train": (Config, PRESETS, get_preset),
    "continual": (ContinualConfig, CONTINUAL_PRESETS, get_continual_preset),
}


def read_config_file(path: str | Path) -> tuple[Path, dict]:
    """The file (``DIR/config.json`` for a directory) and the mapping it holds.

    Raises:
      ConfigError: naming the file: missing, unreadable, not JSON or TOML, or not an object.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"--config {path.parent}: a directory holding no config.json "
                              "(give a run directory or a JSON or TOML file)")
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {path}: not readable ({err})") from None
    data = _parse(path, text)
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: a configuration is an object of fields, got "
                          f"{type(data).__name__}")
    return path, data


def _parse(path: Path, text: str):
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"--config {path}: not valid TOML ({err})") from None
    try:
        return json.loads(text)
    except ValueError as json_err:
        if suffix == ".json":
            raise ConfigError(f"--config {path}: not valid JSON ({json_err})") from None
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            raise ConfigError(f"--config {path}: neither JSON ({json_err}) nor TOML") from None


def config_from_file(path: str | Path, kind: str) -> Config | ContinualConfig:
    """The configuration ``path`` describes, for ``metajax KIND`` (``train`` or
    ``continual``); types are checked, ranges are left to ``validate`` (so that ``--set``
    can still change a field).

    Raises:
      ConfigError: naming the file and the key: a key that is not a field of ``kind``'s
        schema (with the closest one), a file of the other kind, a value of the wrong type,
        or a partial file naming no known preset.
    """
    if kind not in _SCHEMAS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path, data = read_config_file(path)
    schema, presets, get = _SCHEMAS[kind]
    other = "continual" if kind == "train" else "train"
    other_schema, other_presets, _ = _SCHEMAS[other]
    fields = set(schema.field_names())
    unknown = [key for key in data if key not in fields]
    preset = data.get("preset")
    named_other = isinstance(preset, str) and preset in other_presets and preset not in presets
    if (unknown and all(key in other_schema.field_names() for key in unknown)) or named_other:
        what = f"preset {preset!r}" if named_other else "keys " + ", ".join(unknown[:4])
        raise ConfigError(f"--config {path} is a `metajax {other}` configuration ({what}); "
                          f"run `metajax {other} --config {path}`")
    if unknown:
        key = unknown[0]
        raise ConfigError(f"--config {path}: unknown configuration key {key!r}"
                          f"{did_you_mean(key, fields)}; the {kind} keys are those "
                          "`metajax presets NAME` prints")
    if isinstance(preset, str) and preset in presets:
        base = get(preset)
    elif preset is None or preset == "custom" or fields <= set(data):
        base = schema()
    else:
        missing = sorted(fields - set(data))
        raise ConfigError(
            f"--config {path}: preset {preset!r} is not a {kind} preset"
            f"{did_you_mean(str(preset), presets)}, and the file leaves out {len(missing)} "
            f"field(s) (e.g. {', '.join(missing[:3])}) that a preset would fill in: name a "
            "preset from `metajax presets`, or give every field"
        )
    try:
        return schema.from_mapping(data, base=base)
    except ConfigError as err:
        raise ConfigError(f"--config {path}: {err}") from None
