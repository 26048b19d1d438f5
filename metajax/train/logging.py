"""Run logs: ``metrics.jsonl`` (one JSON object a line) and a progress bar."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm


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


def to_jsonable(value, digits: int | None = None):
    """Scalars of numpy/JAX as Python numbers, ready for strict JSON.

    A NaN or infinite float becomes ``null``; in a dict, the key ``<key>_nonfinite`` then
    says which value it was (``"nan"``, ``"inf"``, ``"-inf"``), so a file never holds a
    bare ``NaN`` and never hides one. With ``digits``, every array becomes a (nested) list
    of floats and every float is rounded to that many decimals (the continual run files);
    without, values are kept as they are.
    """
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            converted = to_jsonable(v, digits)
            out[str(k)] = converted
            scalar = v.item() if hasattr(v, "item") and getattr(v, "size", 1) == 1 else v
            if converted is None and isinstance(scalar, float) and not math.isfinite(scalar):
                out[f"{k}_nonfinite"] = _nonfinite_name(scalar)
        return out
    if isinstance(value, list | tuple):
        return [to_jsonable(v, digits) for v in value]
    if isinstance(value, np.ndarray | jax.Array) and getattr(value, "size", 1) != 1 or (
        digits is not None and isinstance(value, np.ndarray | jax.Array)
    ):
        array = np.asarray(value)
        if digits is not None or np.issubdtype(array.dtype, np.inexact):
            array = np.asarray(array, np.float64)
            if digits is not None:
                array = array.round(digits)
        return to_jsonable(array.tolist(), digits)
    if hasattr(value, "item") and getattr(value, "size", 1) == 1:
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


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a JSONL file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
