"""Experience replay (ER) with a reservoir buffer.

Chaudhry, Rohrbach, Elhoseiny, Ajanthan, Dokania, Torr and Ranzato, 2019, "On Tiny Episodic
Memories in Continual Learning" (ER-Reservoir).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from metajax._checks import check_int
from metajax.continual.learners import (
    ContinualLearner,
    ExampleLossFn,
    batch_size_of,
    check_optimizer,
    example_losses,
    float_metrics,
    weighted_mean,
    with_replay,
)
from metajax.continual.memory import (
    ReservoirBuffer,
    buffer_sample,
    reservoir_add_batch,
    reservoir_init,
)
from metajax.types import Batch, PyTree


class ERState(NamedTuple):
    """State of :func:`er`.

    Attributes:
      params: the model parameters.
      opt_state: the optimiser state.
      memory: the :class:`ReservoirBuffer` of past stream examples.
      key: PRNG key for replay draws and reservoir decisions.
      step: ``[]`` int32, updates so far.
    """

    params: PyTree
    opt_state: PyTree
    memory: ReservoirBuffer
    key: jax.Array
    step: jax.Array


def er(
    loss_fn: ExampleLossFn,
    optimizer: optax.GradientTransformation,
    memory_size: int,
    replay_batch: int,
) -> ContinualLearner:
    """Experience replay with reservoir sampling (ER-Reservoir; Chaudhry et al., 2019).

    For each incoming batch ``B_n`` (their Algorithm 1): draw ``B_M`` of ``replay_batch``
    examples uniformly from the memory (with replacement), take one optimiser step on the mean
    loss over ``B_n u B_M``, then offer ``B_n`` to the reservoir (Vitter's Algorithm R), so
    the memory stays a uniform sample of the whole stream seen so far. The draw comes before
    the write, so replay never repeats the batch being learned. While the memory is empty
    the replay rows are placeholders with weight 0 and the step is plain fine-tuning.
    Replayed rows keep the task id they were stored with, which a task-aware loss uses.

    Args:
      loss_fn: per-example loss ``loss_fn(params, (x, y), task) -> [b]``
        (:mod:`metajax.continual.learners`).
      optimizer: any optax transformation (``optax.sgd(lr)`` in the paper).
      memory_size: reservoir capacity, in examples (Python int >= 1).
      replay_batch: examples drawn from memory per update (Python int >= 1; the paper uses
        the incoming batch size, 10).

    Returns:
      A :class:`ContinualLearner` with :class:`ERState`; metrics ``"loss"`` (the mean over
      ``B_n u B_M``, the objective), ``"incoming_loss"`` and ``"replay_loss"`` (0 while the
      memory is empty), all before the step.
    """
    check_optimizer(optimizer)
    check_int("memory_size", memory_size)
    check_int("replay_batch", replay_batch)

    def init(params, key, example, num_tasks):
        check_int("num_tasks", num_tasks)
        memory = reservoir_init(memory_size, *example)
        return ERState(params, optimizer.init(params), memory, key, jnp.zeros((), jnp.int32))

    def update(state: ERState, batch: Batch, task_id):
        b = batch_size_of(batch)
        key, sample_key, add_key = jax.random.split(state.key, 3)
        replay = buffer_sample(state.memory, sample_key, replay_batch)
        joint, task, weights = with_replay(batch, task_id, replay)

        def objective(params):
            losses = example_losses(loss_fn, params, joint, task)
            return weighted_mean(losses, weights), losses

        (loss, losses), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        memory = reservoir_add_batch(state.memory, add_key, *batch, task_id, after=grads)
        metrics = {
            "loss": loss,
            "incoming_loss": jnp.mean(losses[:b]),
            "replay_loss": weighted_mean(losses[b:], replay.valid),
        }
        return ERState(params, opt_state, memory, key, state.step + 1), float_metrics(metrics)

    return ContinualLearner(init, update)
