"""Run logs: ``metrics.jsonl`` (one JSON object a line) and a progress bar."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from metajax._files import atomic_write


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append ``record`` as one line of JSON and flush it, so a crash loses no written line."""
    with open(path, "a") as f:
        f.write(dumps(record, sort_keys=True) + "\n")
        f.flush()


def dumps(value, **kwargs) -> str:
    """``json.dumps`` of :func:`to_jsonable` ``(value)``: always valid JSON (no bare NaN)."""
    return json.dumps(to_jsonable(value), allow_nan=False, **kwargs)


def _nonfinite_name(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _nonfinite_note(value) -> str | None:
    """What a value's nulls stand for: ``"nan"`` for a scalar, ``"nan at [0, 2]; inf at
    [1]"``-style positions for an array or list; None when all is finite."""
    if isinstance(value, dict):
        return None
    if isinstance(value, float | np.floating) or (
        isinstance(value, np.ndarray | jax.Array) and np.ndim(value) == 0
    ):
        scalar = float(value)
        return None if math.isfinite(scalar) else _nonfinite_name(scalar)
    if isinstance(value, list | tuple | np.ndarray | jax.Array):
        try:
            array = np.asarray(value, np.float64)
        except (TypeError, ValueError):
            return None  # ragged or not numbers: nested dicts carry their own notes
        bad = ~np.isfinite(array)
        if not bad.any():
            return None
        parts = []
        for name, mask in (("nan", np.isnan(array)), ("inf", np.isposinf(array)),
                           ("-inf", np.isneginf(array))):
            where = np.argwhere(mask).tolist()
            if where:
                shown = ", ".join(str(w if len(w) > 1 else w[0]) for w in where[:8])
                more = f" and {len(where) - 8} more" if len(where) > 8 else ""
                parts.append(f"{name} at {shown}{more}")
        return "; ".join(parts)
    return None


def to_jsonable(value, digits: int | None = None):
    """Scalars of numpy/JAX as Python numbers, ready for strict JSON.

    A NaN or infinite float becomes ``null``; in a dict, the key ``<key>_nonfinite`` then
    says what it was (``"nan"``, ``"inf"``, ``"-inf"``; for an array or list, which values
    at which positions), so a file never holds a bare ``NaN`` and never hides one. Arrays
    become (nested) lists, 0-d arrays and numpy scalars Python numbers. With ``digits``,
    every float is rounded to that many decimals (the continual run files).
    """
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out[str(k)] = to_jsonable(v, digits)
            note = _nonfinite_note(v)
            if note is not None:
                out[f"{k}_nonfinite"] = note
        return out
    if isinstance(value, list | tuple):
        return [to_jsonable(v, digits) for v in value]
    if isinstance(value, np.ndarray | jax.Array) and np.ndim(value) > 0:
        array = np.asarray(value)
        if digits is not None or jnp.issubdtype(array.dtype, jnp.inexact):
            array = np.asarray(array, np.float64)
            if digits is not None:
                array = array.round(digits)
        return to_jsonable(array.tolist(), digits)
    if hasattr(value, "item") and np.ndim(value) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if digits is not None and isinstance(value, float):
        return round(value, digits)
    return value


def progress_bar(total: int, enabled: bool = True) -> tqdm:
    """A progress bar on stderr counting meta-steps (shows steps/s and the postfix metrics)."""
    return tqdm(total=total, unit="step", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, mininterval=1.0)


def truncate_jsonl(path: str | os.PathLike, key: str, last: int) -> None:
    """Rewrite ``path`` (atomically; created when missing) with only its records whose
    integer ``key`` is at most ``last``: on resume, later lines came from work done again.
    A torn (unparsable) line is dropped."""
    path = Path(path)
    kept = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get(key), int) \
                    and record[key] <= last:
                kept.append(line)
    text = "".join(line + "\n" for line in kept)
    atomic_write(path, lambda f: f.write(text.encode()))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a JSONL file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
