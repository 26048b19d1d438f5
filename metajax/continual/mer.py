"""Meta-Experience Replay (MER).

Riemer, Cases, Ajemian, Liu, Rish, Tu and Tesauro, 2019, "Learning to Learn without
Forgetting by Maximizing Transfer and Minimizing Interference".
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from metajax._checks import check_int, check_number
from metajax.continual.learners import (
    ContinualLearner,
    ExampleLossFn,
    batch_size_of,
    example_losses,
    float_metrics,
    task_vector,
    with_replay,
)
from metajax.continual.memory import (
    ReservoirBuffer,
    buffer_sample,
    reservoir_add,
    reservoir_init,
)
from metajax.types import Batch, PyTree


class MERState(NamedTuple):
    """State of :func:`mer`.

    Attributes:
      params: the model parameters.
      memory: the :class:`ReservoirBuffer` of past stream examples.
      key: PRNG key for replay draws and reservoir decisions.
      step: ``[]`` int32, updates (incoming batches) so far.
    """

    params: PyTree
    memory: ReservoirBuffer
    key: jax.Array
    step: jax.Array


def _interpolate(start: PyTree, end: PyTree, rate) -> PyTree:
    """Reptile's meta-update ``start + rate * (end - start)``."""
    return jax.tree.map(lambda a, b: a + rate * (b - a), start, end)


def mer(
    loss_fn: ExampleLossFn,
    lr: float,
    beta: float,
    gamma: float,
    batches_per_example: int,
    memory_size: int,
    replay_batch: int,
) -> ContinualLearner:
    """MER (Riemer et al., 2019), the paper's Algorithm 1: Reptile within and across batches
    over reservoir replay.

    The examples of an incoming batch are processed one after the other, as in the paper
    (whose stream has batch size 1) and the MER baseline of La-MAML's comparisons (the
    authors' ``meralg1.py``, which loops over the rows of a batch). For each example
    ``(x, y)``, with ``theta_A = theta``:

    * ``batches_per_example`` (``s``) times: draw a batch of the current example followed by
      ``replay_batch`` (``k - 1``) memories; from ``theta_W = theta`` take one plain SGD step
      of rate ``lr`` (``alpha``) on each of its ``k`` examples in turn, ending at ``theta'``;
      then the within-batch Reptile update ``theta = theta_W + beta * (theta' - theta_W)``;
    * the across-batch Reptile update ``theta = theta_A + gamma * (theta - theta_A)``;
    * offer ``(x, y)`` to the reservoir (Vitter's Algorithm R).

    Choices where the paper leaves room: the current example comes first in every batch and
    the memories are drawn uniformly with replacement (as ``meralg1.py``, which draws
    ``min(replay_batch, stored)`` of them); while the memory is empty a batch is the current
    example alone (the placeholder rows take no step). There is no optimiser argument: MER's
    inner steps are plain SGD and its outer steps Reptile interpolations.

    Args:
      loss_fn: per-example loss ``loss_fn(params, (x, y), task) -> [b]``, called on one row
        at a time; replayed rows carry their own task id.
      lr: SGD rate of every example step (``alpha``; the paper's MNIST runs use 0.03-0.1).
      beta: within-batch Reptile rate (0.01-0.03 in the authors' MNIST scripts).
      gamma: across-batch Reptile rate (1.0 in the paper's runs of Algorithm 1).
      batches_per_example: ``s``, batches per incoming example (5-10 in the paper's runs).
      memory_size: reservoir capacity, in examples.
      replay_batch: memories per batch, ``k - 1`` (5-100 in the paper's runs).

    Returns:
      A :class:`ContinualLearner` with :class:`MERState`; metric ``"loss"``, the mean over
      the incoming examples of each one's loss just before its own processing.
    """
    for name, value in (("lr", lr), ("beta", beta), ("gamma", gamma)):
        check_number(name, value)
    check_int("batches_per_example", batches_per_example)
    check_int("memory_size", memory_size)
    check_int("replay_batch", replay_batch)

    def init(params, key, example, num_tasks):
        check_int("num_tasks", num_tasks)
        memory = reservoir_init(memory_size, *example)
        return MERState(params, memory, key, jnp.zeros((), jnp.int32))

    def row_loss(params, row):
        x, y, task = row
        one = jax.tree.map(lambda leaf: leaf[None], (x, y))
        return example_losses(loss_fn, params, one, task[None])[0]

    def sgd_on_row(params, row):
        *example, valid = row
        loss, grads = jax.value_and_grad(row_loss)(params, tuple(example))
        rate = lr * valid.astype(jnp.float32)
        params = jax.tree.map(lambda p, g: p - rate.astype(p.dtype) * g, params, grads)
        return params, loss

    def one_example(carry, inputs):
        params, memory = carry
        x, y, task, key = inputs
        keys = jax.random.split(key, batches_per_example + 1)
        batch_keys, add_key = keys[:-1], keys[-1]

        def one_batch(weights, batch_key):
            replay = buffer_sample(memory, batch_key, replay_batch)
            (rows_x, rows_y), rows_task, rows_weight = with_replay(
                jax.tree.map(lambda leaf: leaf[None], (x, y)), task, replay
            )
            rows = (rows_x, rows_y, rows_task, rows_weight)
            fast, losses = jax.lax.scan(sgd_on_row, weights, rows)
            return _interpolate(weights, fast, beta), losses[0]

        after, losses = jax.lax.scan(one_batch, params, batch_keys)
        params = _interpolate(params, after, gamma)
        memory = reservoir_add(memory, add_key, x, y, task, after=losses)
        return (params, memory), losses[0]

    def update(state: MERState, batch: Batch, task_id):
        b = batch_size_of(batch)
        key, example_key = jax.random.split(state.key)
        inputs = (*batch, task_vector(task_id, b), jax.random.split(example_key, b))
        (params, memory), losses = jax.lax.scan(one_example, (state.params, state.memory), inputs)
        metrics = float_metrics({"loss": jnp.mean(losses)})
        return MERState(params, memory, key, state.step + 1), metrics

    return ContinualLearner(init, update)
