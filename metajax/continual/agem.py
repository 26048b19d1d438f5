"""Averaged Gradient Episodic Memory (A-GEM).

Chaudhry, Ranzato, Rohrbach and Elhoseiny, 2019, "Efficient Lifelong Learning with A-GEM".
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from metajax._checks import check_int
from metajax._tree import vdot
from metajax.continual.learners import (
    ContinualLearner,
    ExampleLossFn,
    batch_size_of,
    check_optimizer,
    example_losses,
    float_metrics,
    task_vector,
    weighted_mean,
)
from metajax.continual.memory import (
    EpisodicMemory,
    episodic_add,
    episodic_init,
    episodic_sample,
)
from metajax.continual.projections import project_agem
from metajax.types import Batch, PyTree


class AGEMState(NamedTuple):
    """State of :func:`agem`.

    Attributes:
      params: the model parameters.
      opt_state: the optimiser state.
      memory: the per-task :class:`EpisodicMemory`.
      key: PRNG key for the reference-batch draws.
      step: ``[]`` int32, updates so far.
    """

    params: PyTree
    opt_state: PyTree
    memory: EpisodicMemory
    key: jax.Array
    step: jax.Array


def agem(
    loss_fn: ExampleLossFn,
    optimizer: optax.GradientTransformation,
    memory_per_task: int,
    ref_batch: int = 256,
) -> ContinualLearner:
    """A-GEM (Chaudhry et al., 2019): project the step so the memory's average loss does not
    rise to first order.

    Each update, for incoming batch ``(x, y)`` of task ``t``:

    1. ``g``: gradient of the incoming batch's mean loss;
    2. ``g_ref``: gradient of the mean loss on ``ref_batch`` examples drawn uniformly (with
       replacement) from the episodic memory of tasks ``0 .. t-1`` (A-GEM's ``M``, which
       never holds the current task);
    3. ``g~ = project_agem(g, g_ref)``: ``g - (g.g_ref / g_ref.g_ref) g_ref`` when
       ``g.g_ref < 0``, else ``g``;
    4. one optimiser step on ``g~`` (plain SGD in the paper).

    On task 0 the memory of past tasks is empty: the reference rows are placeholders of
    weight 0, ``g_ref = 0`` and ``project_agem`` returns ``g`` unchanged (no projection).

    When the memory is written: A-GEM's algorithm fills task ``t``'s share of the memory with
    examples of ``D_t`` once task ``t`` is over, and only later tasks read it. Here ``update``
    does not know where a task ends, so every incoming batch is ring-written into task ``t``'s
    ``memory_per_task`` slots (after the step), and reads are restricted to tasks ``< t``.
    Because task ``t``'s slots are never read while ``t`` is being learned, what later tasks
    see is the same as with A-GEM's end-of-task write, except which examples are kept: the
    last ``memory_per_task`` examples of the task rather than a random subset. The streams
    of :mod:`metajax.data.streams` present each task's rows in random order, so the last
    ones are themselves a uniformly random subset (of the last epoch, with several).

    Args:
      loss_fn: per-example loss ``loss_fn(params, (x, y), task) -> [b]``; reference rows
        carry their own task id (for task-aware masks).
      optimizer: any optax transformation; it receives ``g~``.
      memory_per_task: episodic memory slots per task (Python int >= 1).
      ref_batch: examples in the reference batch (256 in the paper's MNIST and CIFAR runs).

    Returns:
      A :class:`ContinualLearner` with :class:`AGEMState`; metrics ``"loss"`` (incoming batch,
      before the step), ``"ref_loss"`` (0 on task 0) and ``"projected"`` (1.0 when
      ``g.g_ref < 0``).
    """
    check_optimizer(optimizer)
    check_int("memory_per_task", memory_per_task)
    check_int("ref_batch", ref_batch)

    def init(params, key, example, num_tasks):
        check_int("num_tasks", num_tasks)
        memory = episodic_init(num_tasks, memory_per_task, *example)
        return AGEMState(params, optimizer.init(params), memory, key, jnp.zeros((), jnp.int32))

    def update(state: AGEMState, batch: Batch, task_id):
        task = task_vector(task_id, batch_size_of(batch))
        key, sample_key = jax.random.split(state.key)
        ref = episodic_sample(state.memory, sample_key, ref_batch, up_to_task=task_id)

        def incoming(params):
            return jnp.mean(example_losses(loss_fn, params, batch, task))

        def reference(params):
            losses = example_losses(loss_fn, params, (ref.x, ref.y), ref.task)
            return weighted_mean(losses, ref.valid)

        loss, g = jax.value_and_grad(incoming)(state.params)
        ref_loss, g_ref = jax.value_and_grad(reference)(state.params)
        projected = project_agem(g, g_ref)
        updates, opt_state = optimizer.update(projected, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        memory = episodic_add(state.memory, *batch, task_id, after=g_ref)
        metrics = {"loss": loss, "ref_loss": ref_loss, "projected": vdot(g, g_ref) < 0}
        return AGEMState(params, opt_state, memory, key, state.step + 1), float_metrics(metrics)

    return ContinualLearner(init, update)
