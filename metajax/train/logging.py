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
        f.write(json.dumps(to_jsonable(record), sort_keys=True) + "\n")
        f.flush()


def to_jsonable(value, digits: int | None = None):
    """Scalars of numpy/JAX as Python numbers; NaN and infinities as strings (valid JSON).

    With ``digits``, every array becomes a (nested) list of floats and every float is rounded
    to that many decimals (the continual run files); without, values are kept as they are.
    """
    if isinstance(value, dict):
        return {str(k): to_jsonable(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v, digits) for v in value]
    if digits is not None and isinstance(value, np.ndarray | jax.Array):
        return to_jsonable(np.asarray(value, np.float64).round(digits).tolist(), digits)
    if hasattr(value, "item") and getattr(value, "size", 1) == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
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
