"""Gradient Episodic Memory (GEM).

Lopez-Paz and Ranzato, 2017, "Gradient Episodic Memory for Continual Learning".
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from metajax._checks import check_int, check_number
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
    episodic_valid,
)
from metajax.continual.projections import past_task_dots, project_gem, row_buckets
from metajax.types import Batch, PyTree


class GEMState(NamedTuple):
    """State of :func:`gem`.

    Attributes:
      params: the model parameters.
      opt_state: the optimiser state.
      memory: the per-task :class:`EpisodicMemory`.
      step: ``[]`` int32, updates so far.
    """

    params: PyTree
    opt_state: PyTree
    memory: EpisodicMemory
    step: jax.Array


def gem(
    loss_fn: ExampleLossFn,
    optimizer: optax.GradientTransformation,
    memory_per_task: int,
    memory_strength: float = 0.5,
    *,
    ridge: float = 0.0,
) -> ContinualLearner:
    """GEM (Lopez-Paz and Ranzato, 2017): a step that raises no past task's memory loss.

    Each update follows the paper's Algorithm 1 for incoming batch ``(x, y)`` of task ``t``:

    1. ``M_t <- M_t u (x, y)``: ring-write the batch into task ``t``'s ``memory_per_task``
       slots (the reference code writes before computing gradients, as here);
    2. ``g``: gradient of the incoming batch's mean loss;
    3. ``G [r, ...]``: row ``k`` the gradient of the mean loss over every stored example
       of task ``k`` (the whole ``M_k``, not a sample), for ``k < t``. The rows are taken
       at once (a ``vmap`` over tasks) for the first ``r`` tasks, ``r`` the smallest of
       :func:`~metajax.continual.projections.row_buckets` covering ``t`` (0-4, 6, 8, 12,
       ...: one compiled branch per size, chosen by ``lax.switch``); the rows of tasks
       ``>= t`` among them and empty slots get weight 0 and come out zero, so
       :func:`project_gem` sees no constraint from them. One compiled update serves every
       task, and neither the gradients nor the dual cost anything for tasks not yet seen
       beyond the rounding of ``r``;
    4. ``g~ = project_gem(g, G, margin=memory_strength, ridge=ridge)``: the closest update
       with ``G g~ >= 0``, only when some ``(G g)_k < 0`` (as the reference code);
    5. one optimiser step on ``g~`` (plain SGD in the paper).

    Args:
      loss_fn: per-example loss ``loss_fn(params, (x, y), task) -> [b]``; memory rows of
        task ``k`` get task id ``k`` (for task-aware masks).
      optimizer: any optax transformation; it receives ``g~``.
      memory_per_task: slots per task, GEM's ``n_memories`` (256 in the paper's MNIST runs).
      memory_strength: GEM's margin, the lower bound on the dual variables in the reference
        code's ``project2cone2`` (see :func:`project_gem`; 0.5 in the paper's runs).
      ridge: added to the diagonal of the dual's ``G G^T``. The reference code's
        ``project2cone2`` adds ``eps=1e-3`` (``quadprog`` needs a positive definite
        matrix); it shrinks the dual variables ``v``, so the constraints hold up to it
        (``G g~ >= -ridge v``). The default ``0`` is the exact projection; ``1e-3``
        reproduces the reference (the presets' choice). May be traced (swept).

    Returns:
      A :class:`ContinualLearner` with :class:`GEMState`; metrics ``"loss"`` (incoming batch,
      before the step) and ``"violated"`` (1.0 when some ``(G g)_k < 0``, i.e. a projection
      happened).
    """
    check_optimizer(optimizer)
    check_int("memory_per_task", memory_per_task)
    check_number("memory_strength", memory_strength, positive=False)
    check_number("ridge", ridge, positive=False)

    def init(params, key, example, num_tasks):
        del key
        check_int("num_tasks", num_tasks)
        memory = episodic_init(num_tasks, memory_per_task, *example)
        return GEMState(params, optimizer.init(params), memory, jnp.zeros((), jnp.int32))

    def update(state: GEMState, batch: Batch, task_id):
        task = task_vector(task_id, batch_size_of(batch))
        memory = episodic_add(state.memory, *batch, task_id)
        num_tasks = memory.count.shape[0]
        tasks = jnp.arange(num_tasks, dtype=jnp.int32)
        weights = episodic_valid(memory) & (tasks < task_id)[:, None]

        def incoming(params):
            return jnp.mean(example_losses(loss_fn, params, batch, task))

        def past_grad(x, y, w, k):
            def past_loss(params):
                losses = example_losses(loss_fn, params, (x, y), task_vector(k, w.shape[0]))
                return weighted_mean(losses, w)

            return jax.grad(past_loss)(state.params)

        def on_rows(r):
            # G [r, ...]: the gradients of tasks 0 .. r - 1, all at once; rows of tasks >= the
            # current one have weight 0 everywhere and come out zero, constraining nothing.
            def solve():
                if r == 0:
                    return g, jnp.zeros((), bool)
                rows = jax.tree.map(lambda leaf: leaf[:r], (memory.x, memory.y))
                G = jax.vmap(past_grad)(*rows, weights[:r], tasks[:r])
                violated = jnp.any(past_task_dots(g, G) < 0)
                return project_gem(g, G, margin=memory_strength, ridge=ridge), violated

            return solve

        loss, g = jax.value_and_grad(incoming)(state.params)
        # Only past tasks constrain the step, and the work is sized to them: G holds the
        # first r tasks' rows, r the smallest of a few sizes (0-4, 6, 8, 12, ...) covering
        # task_id, one compiled branch per size, so neither the gradients nor the dual's QR
        # cost anything for the tasks not yet seen.
        sizes = row_buckets(num_tasks)
        past = jnp.clip(task_id, 0, num_tasks)
        index = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), past, side="left")
        projected, violated = jax.lax.switch(index, [on_rows(r) for r in sizes])
        updates, opt_state = optimizer.update(projected, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "violated": violated}
        return GEMState(params, opt_state, memory, state.step + 1), float_metrics(metrics)

    return ContinualLearner(init, update)
