"""Parameters on disk with flax's msgpack serialization (never pickle), written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import flax.serialization
import jax

from metajax._files import atomic_write
from metajax.types import PyTree


def save_params(path: str | os.PathLike, tree: PyTree) -> Path:
    """Write ``tree`` to ``path`` through a temporary file and an atomic rename."""
    data = flax.serialization.to_bytes(jax.device_get(tree))
    return atomic_write(path, lambda f: f.write(data))


def load_params(path: str | os.PathLike, template: PyTree) -> PyTree:
    """Read parameters saved by :func:`save_params` into the structure of ``template``.

    Raises ``ValueError`` naming the file when its structure or shapes do not match.
    """
    path = Path(path)
    try:
        restored = flax.serialization.from_bytes(template, path.read_bytes())
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: saved parameters do not match this run's model: {err}") from err
    for saved, expected in zip(jax.tree.leaves(restored), jax.tree.leaves(template), strict=True):
        if saved.shape != expected.shape:
            raise ValueError(
                f"{path}: saved parameter of shape {saved.shape}, the model expects "
                f"{expected.shape}"
            )
    return restored
