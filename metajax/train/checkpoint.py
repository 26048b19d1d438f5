"""What a run keeps on disk.

- :func:`save_params` / :func:`load_params`: parameters alone with flax's msgpack
  serialization (never pickle), written atomically: the portable export
  (``meta_params.msgpack``) that ``metajax evaluate`` reads.
- :class:`Checkpoints`: the whole training state (parameters, optimiser state, RNG key and
  a JSON record of the step, the configuration fingerprint and the loop's counters) with
  orbax, so a killed run resumes exactly. Orbax writes each checkpoint into a temporary
  directory and renames it when complete, so a kill mid-save leaves the previous ones.

Nothing non-finite is ever saved: both raise :class:`NonFiniteState` instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from metajax._files import atomic_write
from metajax._tree import dtype_of
from metajax.types import PyTree

CHECKPOINT_DIR = "checkpoints"


class NonFiniteState(ValueError):
    """A state holding NaN or infinity was about to be saved; nothing was written."""


def _nonfinite_leaves(tree: PyTree) -> list[str]:
    bad = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        value = np.asarray(leaf)
        # jnp.issubdtype knows bfloat16 and the float8 types (np.issubdtype does not).
        if jnp.issubdtype(value.dtype, jnp.inexact) and not np.isfinite(value).all():
            bad.append(jax.tree_util.keystr(path))
    return bad


def check_finite(tree: PyTree, what: str) -> None:
    """Raise :class:`NonFiniteState` naming the leaves of ``tree`` that hold NaN or inf."""
    bad = _nonfinite_leaves(tree)
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise NonFiniteState(f"{what}: non-finite values in {shown}; not saved")


def save_params(path: str | os.PathLike, tree: PyTree) -> Path:
    """Write ``tree`` to ``path`` through a temporary file and an atomic rename.

    Raises:
      NonFiniteState: a leaf holds NaN or infinity (nothing is written).
    """
    tree = jax.device_get(tree)
    check_finite(tree, str(path))
    data = flax.serialization.to_bytes(tree)
    return atomic_write(path, lambda f: f.write(data))


def load_params(path: str | os.PathLike, template: PyTree) -> PyTree:
    """Read parameters saved by :func:`save_params` into the structure of ``template``.

    Every leaf must be an array of the template's shape and dtype, and finite.

    Raises:
      ValueError: naming the file, when the file is not msgpack parameters, its structure,
        a leaf's type, shape or dtype does not match, or a value is not finite.
    """
    path = Path(path)
    try:
        restored = flax.serialization.from_bytes(template, path.read_bytes())
    except Exception as err:  # msgpack raises many types on crafted bytes; all mean "bad file"
        raise ValueError(f"{path}: not saved parameters of this run's model "
                         f"({type(err).__name__}: {err})") from None
    saved_leaves = jax.tree.leaves(restored)
    expected_leaves = jax.tree.leaves(template)
    if len(saved_leaves) != len(expected_leaves):
        raise ValueError(f"{path}: {len(saved_leaves)} saved arrays, the model has "
                         f"{len(expected_leaves)}")
    for saved, expected in zip(saved_leaves, expected_leaves, strict=True):
        if not isinstance(saved, np.ndarray | jax.Array):
            raise ValueError(f"{path}: a saved parameter is a {type(saved).__name__}, not an "
                             "array")
        if saved.shape != expected.shape:
            raise ValueError(
                f"{path}: saved parameter of shape {saved.shape}, the model expects "
                f"{expected.shape}"
            )
        if saved.dtype != expected.dtype:
            raise ValueError(f"{path}: saved parameter of dtype {saved.dtype}, the model "
                             f"expects {expected.dtype}")
    bad = _nonfinite_leaves(restored)
    if bad:
        raise ValueError(f"{path}: non-finite values in {', '.join(bad[:4])}")
    return restored


class Checkpoints:
    """The training-state checkpoints of one run, in ``run_dir/checkpoints`` (orbax).

    Each checkpoint holds a pytree ``state`` (arrays) and a JSON ``record`` (the step, the
    configuration fingerprint, counters). The latest ``keep`` are kept, and with
    ``best_mode`` (``"max"`` or ``"min"``) also the one of the best ``metric`` given to
    :meth:`save`. Saves are synchronous: when :meth:`save` returns, the checkpoint is on
    disk, complete.

    Args:
      run_dir: the run directory.
      keep: how many of the latest checkpoints to keep (>= 1).
      best_mode: keep the best checkpoint by metric too: ``"max"``, ``"min"`` or None.
    """

    def __init__(self, run_dir: str | os.PathLike, keep: int = 3, best_mode: str | None = None):
        import orbax.checkpoint as ocp

        policies = ocp.checkpoint_managers
        keep_rules = [policies.LatestN(max(int(keep), 1))]
        if best_mode is not None:
            keep_rules.append(policies.BestN(
                get_metric_fn=lambda metrics: metrics["score"], reverse=best_mode == "min",
                n=1, keep_checkpoints_without_metrics=False,
            ))
        self._ocp = ocp
        self.directory = Path(run_dir).absolute() / CHECKPOINT_DIR
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                enable_async_checkpointing=False,
                preservation_policy=policies.AnyPreservationPolicy(keep_rules),
                cleanup_tmp_directories=True,
            ),
        )

    def steps(self) -> list[int]:
        """The steps with a complete checkpoint, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: PyTree, record: dict[str, Any],
             metric: float | None = None) -> None:
        """Write the checkpoint of ``step``.

        Raises:
          NonFiniteState: ``state`` holds NaN or infinity; nothing is written.
        """
        ocp = self._ocp
        state = jax.device_get(state)
        check_finite(state, f"checkpoint of step {step}")
        metrics = None
        if metric is not None and np.isfinite(metric):
            metrics = {"score": float(metric)}
        self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    record=ocp.args.JsonSave(record)),
            metrics=metrics, force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, step: int, template: PyTree) -> tuple[PyTree, dict[str, Any]]:
        """The ``(state, record)`` of ``step``, ``state`` in the structure of ``template``.

        Raises:
          ValueError: naming the checkpoint, when it cannot be read or does not match the
            template (structure, shapes, dtypes).
        """
        ocp = self._ocp
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        where = self.directory / str(step)
        try:
            restored = self._manager.restore(
                int(step),
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                        record=ocp.args.JsonRestore()),
            )
            leaves = jax.tree.leaves(restored.state)
            treedef = jax.tree.structure(template)
            state = jax.tree.unflatten(treedef, leaves)
        except Exception as err:  # orbax/tensorstore raise many types for a damaged checkpoint
            raise ValueError(f"{where}: checkpoint unreadable or not of this run "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:200]})"
                             ) from None
        for got, want in zip(leaves, jax.tree.leaves(template), strict=True):
            if np.shape(got) != np.shape(want) or dtype_of(got) != dtype_of(want):
                raise ValueError(f"{where}: checkpoint array {np.shape(got)} {dtype_of(got)} "
                                 f"where the run has {np.shape(want)} {dtype_of(want)}")
        record = restored.record
        if not isinstance(record, dict):
            raise ValueError(f"{where}: checkpoint record is not a JSON object")
        return state, record

    def close(self) -> None:
        """Finish pending work and release orbax's resources."""
        self._manager.close()
