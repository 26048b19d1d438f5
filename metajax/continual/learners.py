"""Continual learners: the contract they share, the loss they see, and plain fine-tuning.

A continual learner is a ``NamedTuple`` of two pure functions, in the shape of an optax
``GradientTransformation``::

    cl = mj.continual.er(loss_fn, optax.sgd(0.1), memory_size=200, replay_batch=10)
    state = cl.init(params, key, example=(x[0], y[0]), num_tasks=stream.num_tasks)
    state, metrics = cl.update(state, (x, y), task_id)    # x [b, ...], y [b], task_id int32 []

The state is a ``NamedTuple`` pytree whose first field is ``params`` (the model), followed by
whatever the algorithm carries (optimiser state, replay memory, PRNG key, counters, learned
learning rates). Its structure, shapes and dtypes never change, so a task's stream runs in one
``lax.scan`` over ``update`` and several seeds in one ``vmap`` over ``init`` and ``update``.
``task_id`` may be traced: one compiled update serves every task.

``init`` takes the shape of one example and the number of tasks because replay memories are
fixed-shape arrays allocated up front; the learner itself stays independent of the data, so
the same learner runs on any stream (:func:`metajax.continual.run` fills both in).

The loss a continual learner sees
---------------------------------
Replay mixes examples of several tasks in one batch, and some rows of a replay batch are
placeholders (``ReplaySample.valid`` is ``False`` while a memory is empty; GEM's per-task
memories are partly filled). A learner therefore needs one loss per example, and the task of
every example::

    loss_fn(params, (x [b, ...], y [b]), task [b] int32) -> losses [b]

Learners average these with weights (1 for real rows, 0 for placeholders), so a placeholder
never reaches a gradient. ``task`` is what makes task-aware ("multi-head") settings work
without the learners knowing about heads: :func:`cross_entropy_loss` with the stream's
``class_mask`` restricts each row's softmax to the classes of that row's own task, for
incoming and replayed rows alike, as the reference code of GEM, A-GEM, MER and La-MAML does on
split CIFAR-100. A task-agnostic loss ignores ``task``; :func:`per_example_loss` turns the
library's batch loss ``loss_fn(params, batch) -> loss`` into one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metajax._checks import check_int
from metajax.types import Batch, LossFn, PyTree

ExampleLossFn = Callable[[PyTree, Batch, jax.Array], jax.Array]
"""``loss_fn(params, (x [b, ...], y [b]), task [b] int32) -> losses [b]``: one loss per
example; ``task`` holds each example's task id."""

# Logits of classes outside a row's task: finite, so that a zero-weighted placeholder row
# whose label is masked gives a large but finite loss and 0 * loss stays 0 (no NaN).
_MASKED_LOGIT = -1e9


class ContinualLearner(NamedTuple):
    """A continual learner: two pure functions, like an optax transformation.

    Attributes:
      init: ``init(params, key, example, num_tasks) -> state``. ``example`` is one training
        example ``(x, y)`` without a batch axis (arrays or ``jax.ShapeDtypeStruct``; only
        shapes and dtypes are used) and ``num_tasks`` the number of tasks of the stream (a
        Python int; task ids are in ``[0, num_tasks)``).
      update: ``update(state, batch, task_id) -> (state, metrics)`` for one incoming batch
        ``(x [b, ...], y [b])`` of task ``task_id`` (an int32 scalar, may be traced);
        ``metrics`` is a dict of float32 scalars with fixed keys.
      end_task: optional ``end_task(state, task_id) -> state``, called once after the last
        update of each task (:func:`metajax.continual.run` calls it inside the task's
        compiled function), for methods that consolidate at a task boundary; ``None`` (the
        default) for learners that need nothing there.

    Every state is a ``NamedTuple`` whose ``params`` field holds the model parameters.
    """

    init: Callable[[PyTree, jax.Array, Batch, int], Any]
    update: Callable[[Any, Batch, Any], tuple[Any, dict[str, jax.Array]]]
    end_task: Callable[[Any, Any], Any] | None = None


# --- losses ---------------------------------------------------------------------------------


def cross_entropy_loss(
    apply_fn: Callable[[PyTree, Any], jax.Array], class_mask: Any = None
) -> ExampleLossFn:
    """Per-example softmax cross-entropy of ``apply_fn(params, x) -> logits [b, classes]``.

    With ``class_mask [num_tasks, classes]`` (a stream's ``class_mask``), row ``i`` competes
    only among the classes of its task ``task[i]``: the other logits are set to a large
    negative constant before the softmax (task-aware training, as the ``compute_offsets``
    masking in the reference code of GEM, Lopez-Paz and Ranzato, 2017, and of La-MAML, Gupta
    et al., 2020). ``class_mask=None`` is a single head over all classes.

    Args:
      apply_fn: the model, ``apply_fn(params, x [b, ...]) -> logits [b, classes]``.
      class_mask: optional bool ``[num_tasks, classes]`` (numpy or jax).

    Returns:
      ``loss_fn(params, (x, y), task) -> losses [b]`` for the continual learners.
    """
    mask = None if class_mask is None else jnp.asarray(class_mask, bool)
    if mask is not None and mask.ndim != 2:
        raise ValueError(
            f"class_mask must be [num_tasks, classes] (a stream's class_mask), got shape "
            f"{mask.shape}; pass None for a single head"
        )

    def loss_fn(params: PyTree, batch: Batch, task: jax.Array) -> jax.Array:
        x, y = batch
        logits = apply_fn(params, x)
        if mask is not None:
            if logits.shape[-1] != mask.shape[1]:
                raise ValueError(
                    f"apply_fn gives {logits.shape[-1]} logits but class_mask has "
                    f"{mask.shape[1]} classes; they must match"
                )
            logits = jnp.where(mask[task], logits, jnp.asarray(_MASKED_LOGIT, logits.dtype))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    return loss_fn


def per_example_loss(loss_fn: LossFn) -> ExampleLossFn:
    """The library's batch loss ``loss_fn(params, (x, y)) -> loss`` as a per-example loss.

    Each example is passed to ``loss_fn`` as a batch of one (``vmap`` over the examples);
    the task ids are ignored (a task-agnostic, single-head setting). A loss that depends on
    batch statistics (batch norm in training mode) sees batches of one.
    """

    def example_loss(params: PyTree, batch: Batch, task: jax.Array) -> jax.Array:
        del task
        one = jax.tree.map(lambda leaf: leaf[:, None], batch)
        return jax.vmap(loss_fn, in_axes=(None, 0))(params, one)

    return example_loss


# --- shared pieces of the learners ----------------------------------------------------------


def check_optimizer(optimizer) -> None:
    """Reject anything that is not an optax transformation (an ``init`` and an ``update``)."""
    if not (
        callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))
    ):
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation (e.g. optax.sgd(0.03)), got "
            f"{optimizer!r}"
        )


def batch_size_of(batch: Batch) -> int:
    """The leading size shared by every leaf of ``batch = (x, y)``; raises when they differ."""
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(batch)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"batch must be (x [b, ...], y [b]) with one leading batch axis on every leaf, got "
            f"leading sizes {sorted(sizes, key=str)}"
        )
    return sizes.pop()


def task_vector(task_id, size: int) -> jax.Array:
    """``task_id`` (int scalar, may be traced) as an int32 ``[size]`` vector."""
    task_id = jnp.asarray(task_id)
    if task_id.ndim != 0 or not jnp.issubdtype(task_id.dtype, jnp.integer):
        raise ValueError(f"task_id must be an int scalar, got {task_id.dtype}{list(task_id.shape)}")
    return jnp.full((size,), task_id, jnp.int32)


def example_losses(loss_fn: ExampleLossFn, params: PyTree, batch: Batch, task) -> jax.Array:
    """``loss_fn(params, batch, task)``, checked to be one loss per example."""
    losses = loss_fn(params, batch, task)
    if jnp.shape(losses) != jnp.shape(task):
        raise ValueError(
            f"loss_fn must return one loss per example, shape {list(jnp.shape(task))}, got "
            f"{list(jnp.shape(losses))}; wrap a mean batch loss with per_example_loss or use "
            "cross_entropy_loss"
        )
    return losses


def weighted_mean(losses: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum(w * l) / sum(w)`` for a 0/1 mask ``w`` (bool or float), and 0 when every weight
    is 0 (an empty replay batch); rows of weight 0 reach neither the value nor the gradient."""
    weights = weights.astype(losses.dtype)
    total = jnp.sum(weights * jnp.where(weights > 0, losses, 0.0))
    return total / jnp.maximum(jnp.sum(weights), 1.0)


def concat(a: PyTree, b: PyTree) -> PyTree:
    """Concatenate two batches leaf by leaf along the leading axis."""
    return jax.tree.map(lambda u, v: jnp.concatenate([u, jnp.asarray(v, u.dtype)]), a, b)


def with_replay(batch: Batch, task, replay) -> tuple[Batch, jax.Array, jax.Array]:
    """The incoming rows and a replay sample as one weighted batch.

    Args:
      batch: the incoming ``(x, y)``, leaves ``[b, ...]``.
      task: the incoming rows' task id, an int scalar or a ``[b]`` array.
      replay: a :class:`~metajax.continual.memory.ReplaySample` (``x``, ``y``, ``task``,
        ``valid``).

    Returns:
      ``((x, y), task [b + r], weights [b + r])``: the incoming rows first (weight 1), then
      the replayed ones, weighted by ``replay.valid`` (0 for placeholders drawn from an empty
      memory), each with the task id it was stored with. :func:`weighted_mean` of the
      per-example losses with these weights is the replay objective.
    """
    b = batch_size_of(batch)
    tasks = jnp.concatenate([jnp.broadcast_to(jnp.asarray(task, jnp.int32), (b,)),
                             replay.task.astype(jnp.int32)])
    weights = jnp.concatenate([jnp.ones((b,), bool), replay.valid])
    return concat(batch, (replay.x, replay.y)), tasks, weights


def float_metrics(metrics: dict[str, Any]) -> dict[str, jax.Array]:
    """Every metric as a float32 scalar (booleans become 0.0 / 1.0)."""
    return {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}


# --- fine-tuning ----------------------------------------------------------------------------


class FinetuneState(NamedTuple):
    """State of :func:`finetune`: ``params``, the optimiser state and the update count."""

    params: PyTree
    opt_state: PyTree
    step: jax.Array


def finetune(loss_fn: ExampleLossFn, optimizer: optax.GradientTransformation) -> ContinualLearner:
    """Fine-tuning: one optimiser step on each incoming batch, nothing remembered.

    The lower bound of continual learning ("single" in GEM, Lopez-Paz and Ranzato, 2017,
    "Gradient Episodic Memory for Continual Learning"; "VAN" in A-GEM, Chaudhry et al., 2019):
    every update minimises the mean loss of the incoming batch only.

    Args:
      loss_fn: per-example loss ``loss_fn(params, (x, y), task) -> [b]`` (module docstring).
      optimizer: any optax transformation (``optax.sgd(lr)`` in the papers).

    Returns:
      A :class:`ContinualLearner`; metrics ``{"loss"}``, the incoming batch's mean loss
      before the step.
    """
    check_optimizer(optimizer)

    def init(params, key, example, num_tasks):
        del key, example
        check_int("num_tasks", num_tasks)
        return FinetuneState(params, optimizer.init(params), jnp.zeros((), jnp.int32))

    def update(state: FinetuneState, batch: Batch, task_id):
        task = task_vector(task_id, batch_size_of(batch))

        def objective(params):
            return jnp.mean(example_losses(loss_fn, params, batch, task))

        loss, grads = jax.value_and_grad(objective)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return FinetuneState(params, opt_state, state.step + 1), float_metrics({"loss": loss})

    return ContinualLearner(init, update)
